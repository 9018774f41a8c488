"""Backbones that return the last feature map (C5) for dense pre-training.

=============  ============  =========  =============  ====================================
name           out_channels  stride     parameters     output for a 224 x 224 input
=============  ============  =========  =============  ====================================
``resnet18``   512           32         11.2 M         (B, 512, 7, 7)
``resnet34``   512           32         21.3 M         (B, 512, 7, 7)
``resnet50``   2048          32 (16, 8) 23.5 M         (B, 2048, 7, 7)  (14 x 14, 28 x 28)
``resnet101``  2048          32 (16, 8) 42.5 M         (B, 2048, 7, 7)
``tiny``       128           16 (8)     0.43 M (0.28)  (B, 128, 14, 14)  (28 x 28)
=============  ============  =========  =============  ====================================

Every stride-2 layer uses padding so that an input of ``H x W`` gives a map of
``ceil(H / stride) x ceil(W / stride)`` (a 64-px demo view gives 2 x 2 with ResNets and
4 x 4 with ``tiny``; a 128-px evaluation image 4 x 4 and 8 x 8). ``tiny`` standardises each
input image per channel (zero mean, unit variance over its pixels) before its first
convolution, so its features do not change when an image is made brighter or darker or its
contrast is changed (up to clipping); see :class:`TinyConvNet`.

The ResNets are torchvision's, randomly initialised (never downloaded), with ``avgpool`` and
``fc`` removed; their ``state_dict`` keys are torchvision's, so
:func:`densecontrast.engine.checkpoint.export_backbone` output loads into ``torchvision.models``.

``"timm:<name>"`` builds any [timm](https://github.com/huggingface/pytorch-image-models) model
(an optional dependency: ``pip install 'densecontrast[timm]'``): CNNs through ``features_only``
(:class:`TimmFeatureMap`, the last stage), ViTs through their patch tokens reshaped to a map
(:class:`TimmTokenMap`, stride = patch size). Weights are downloaded only with ``pretrained=True``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from densecontrast._checks import check_choice, check_int, check_type

if TYPE_CHECKING:  # torchvision is imported lazily: it doubles the import time of the package
    import torchvision

__all__ = [
    "BACKBONES",
    "Backbone",
    "ResNetTrunk",
    "TIMM_PREFIX",
    "TimmFeatureMap",
    "TimmTokenMap",
    "TinyConvNet",
    "backbone_device",
    "build_backbone",
    "check_torchvision_keys",
    "convert_sync_batchnorm",
    "extract_features",
    "plain_state_dict",
]

BACKBONES: tuple[str, ...] = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "tiny")
"""Names accepted by :func:`build_backbone`, besides ``"timm:<model name>"``."""

TIMM_PREFIX = "timm:"
"""Prefix of the :func:`build_backbone` names that build a timm model: ``"timm:vit_small_patch16_224"``."""


class ResNetTrunk(nn.Module):
    """A torchvision ResNet without ``avgpool`` / ``fc``: image ``(B, 3, H, W)`` -> C5 ``(B, C, h, w)``.

    The submodules keep torchvision's names (``conv1``, ``bn1``, ``layer1`` ... ``layer4``), so
    ``state_dict`` keys match ``torchvision.models.resnet*`` minus ``fc.*``.

    Args:
        resnet: a ``torchvision.models.ResNet``; its stem and four stages are reused (not copied).

    Attributes:
        out_channels: channels of the output map (512 for ResNet-18/34, 2048 for 50/101/152).
        stride: input pixels per output cell (32, or 16 / 8 with dilation).

    Examples:
        >>> import torch, torchvision
        >>> trunk = ResNetTrunk(torchvision.models.resnet18())
        >>> trunk(torch.zeros(1, 3, 64, 96)).shape, trunk.stride
        (torch.Size([1, 512, 2, 3]), 32)
    """

    def __init__(self, resnet: torchvision.models.ResNet) -> None:
        import torchvision

        super().__init__()
        check_type(resnet, "resnet", torchvision.models.ResNet, what="a torchvision.models.ResNet")
        self.conv1, self.bn1, self.relu, self.maxpool = resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4
        last = resnet.layer4[-1]
        self.out_channels: int = last.bn3.num_features if hasattr(last, "bn3") else last.bn2.num_features
        self.stride: int = 4 * _stage_stride(self.layer2) * _stage_stride(self.layer3) * _stage_stride(self.layer4)

    def forward(self, x: Tensor) -> Tensor:
        """Map images ``(B, 3, H, W)`` to the C5 feature map ``(B, out_channels, ceil(H/s), ceil(W/s))``."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


def _stage_stride(stage: nn.Sequential) -> int:
    s = 1
    for m in stage[0].modules():
        if isinstance(m, nn.Conv2d):
            s = max(s, m.stride[0])
    return s


def _cbr(cin: int, cout: int, stride: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


STANDARDIZE_EPS = 1e-3
"""Variance floor of :class:`TinyConvNet`'s input standardisation (in ImageNet-normalised units)."""


class TinyConvNet(nn.Module):
    """A small conv-BN-ReLU network for CPU demos and tests: ``(B, 3, H, W)`` -> ``(B, 128, ceil(H/s), ceil(W/s))``.

    Six (stride 16, the default) or five (stride 8) 3x3 conv-BN-ReLU layers, widths
    32-64-64-128-128(-128), about 0.43 M (0.28 M) parameters: a few CPU minutes per demo run.

    With ``standardize=True`` (default) each image is first standardised per channel
    (``F.instance_norm``: zero mean and unit variance over its pixels, variance floor
    :data:`STANDARDIZE_EPS`), which makes the features invariant to brightness and contrast
    changes. Without it, BatchNorm in eval mode turns a brightness change of the input into an
    offset that a few hundred training steps do not learn to ignore: on real photographs the
    brightness jitter of the evaluation alone cost a trained demo network as much correspondence
    accuracy as everything it had learned (see the results page of the documentation). The flag
    is a buffer, so a checkpoint records how its inputs were treated.

    Args:
        stride: output stride, 16 or 8.
        in_channels: input channels (3 for RGB).
        width: channels of the first layer; later layers use 2x and 4x this (default 32).
        standardize: standardise each input image per channel first.

    Attributes:
        out_channels: ``4 * width``.
        stride: the output stride.
        standardize: 0-d bool buffer, the ``standardize`` flag.

    Examples:
        >>> import torch
        >>> net = TinyConvNet()
        >>> net(torch.zeros(2, 3, 96, 96)).shape, net.out_channels, net.stride
        (torch.Size([2, 128, 6, 6]), 128, 16)
        >>> x = torch.randn(1, 3, 64, 64)
        >>> torch.allclose(net.eval()(x), net(2 * x + 0.5), atol=1e-3)  # brightness and contrast
        True
        >>> 100_000 < sum(p.numel() for p in net.parameters()) < 500_000
        True
    """

    def __init__(self, stride: int = 16, in_channels: int = 3, width: int = 32, standardize: bool = True) -> None:
        super().__init__()
        check_choice(stride, "stride", (8, 16))
        check_int(in_channels, "in_channels", 1)
        check_int(width, "width", 1)
        check_type(standardize, "standardize", bool)
        w1, w2, w3 = width, 2 * width, 4 * width
        layers = [*_cbr(in_channels, w1, 2), *_cbr(w1, w2, 2), *_cbr(w2, w2, 1), *_cbr(w2, w3, 2), *_cbr(w3, w3, 1)]
        if stride == 16:
            layers += _cbr(w3, w3, 2)
        self.features = nn.Sequential(*layers)
        self.out_channels: int = w3
        self.stride: int = stride
        self.standardize: Tensor
        self.register_buffer("standardize", torch.tensor(standardize))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        """Map images ``(B, in_channels, H, W)`` to ``(B, out_channels, ceil(H/stride), ceil(W/stride))``."""
        standardized = F.instance_norm(x, eps=STANDARDIZE_EPS)
        return self.features(torch.where(self.standardize.bool(), standardized, x))


# ----------------------------------------------------------------------------------------------
# timm (optional)


def _import_timm(name: str) -> Any:
    try:
        import timm
    except ImportError as e:
        raise ImportError(
            f"build_backbone({name!r}) needs timm, an optional dependency: pip install 'densecontrast[timm]'"
        ) from e
    return timm


def _is_token_vit(model: nn.Module) -> bool:
    """A ViT-style model: patch embedding + a token sequence with ``num_prefix_tokens`` class/register tokens."""
    return hasattr(model, "patch_embed") and isinstance(getattr(model, "num_prefix_tokens", None), int)


class TimmFeatureMap(nn.Module):
    """A timm CNN built with ``features_only=True, out_indices=(-1,)``: image -> its last feature map.

    Args:
        model: the ``features_only`` timm model (a ``FeatureListNet`` or similar) returning a list
            with one map; channels-last (``NHWC``) outputs (Swin and others) are permuted to
            ``(B, C, h, w)``.

    Attributes:
        model: the timm model; ``state_dict`` keys are ``model.<timm key>``, so
            ``{k.removeprefix("model."): v}`` loads into ``timm.create_model(name, features_only=True,
            out_indices=(-1,))``.
        out_channels: channels of the map (``feature_info.channels()[-1]``).
        stride: input pixels per output cell (``feature_info.reduction()[-1]``).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        info = getattr(model, "feature_info", None)
        if info is None:
            raise ValueError(f"model must be a timm features_only model with feature_info, got {type(model).__name__}")
        self.model = model
        self.out_channels: int = int(info.channels()[-1])
        self.stride: int = int(info.reduction()[-1])
        self.channels_last: bool = "NHWC" in str(getattr(model, "output_fmt", "NCHW"))

    def forward(self, x: Tensor) -> Tensor:
        """Map images ``(B, 3, H, W)`` to the last feature map ``(B, out_channels, h, w)``."""
        out = self.model(x)
        out = out[-1] if isinstance(out, (list, tuple)) else out
        return out.permute(0, 3, 1, 2) if self.channels_last else out


class TimmTokenMap(nn.Module):
    """A timm ViT as a dense backbone: its patch tokens reshaped to a map ``(B, C, H / p, W / p)``.

    ``forward_features`` runs the transformer (with its final norm); the ``num_prefix_tokens``
    class, distillation and register tokens are dropped and the ``h * w`` patch tokens, in
    row-major order, become the cells of a ``(B, C, h, w)`` map: cell ``(i, j)`` is the patch at
    rows ``i p .. (i + 1) p`` and columns ``j p .. (j + 1) p`` of the input, so the stride is the
    patch size ``p`` and the geometry of the dense methods applies unchanged. Models pooled by
    averaging (``norm`` is the identity and ``fc_norm`` holds the final norm, e.g. EVA-02) get
    ``fc_norm`` on every token; an attention-pooling head is removed (it is unused).

    The input size is any size the model accepts: with ``dynamic_img_size=True`` (the default of
    :func:`build_backbone` where the model supports it) any multiple of the patch size, otherwise
    the model's ``img_size``.

    Args:
        model: a timm ViT-style model (``patch_embed``, ``num_prefix_tokens``, ``forward_features``).

    Attributes:
        model: the timm model; ``state_dict`` keys are ``model.<timm key>``, so
            ``{k.removeprefix("model."): v}`` loads into ``timm.create_model(name, num_classes=0)``.
        out_channels: token width (``embed_dim``).
        stride: the patch size (an ``int``; ``(p_h, p_w)`` for non-square patches).
        num_prefix_tokens: the tokens dropped before the patch tokens.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        if not _is_token_vit(model):
            raise ValueError(
                f"model must be a ViT-style timm model (patch_embed, num_prefix_tokens), got {type(model).__name__}"
            )
        if getattr(model, "attn_pool", None) is not None:
            model.attn_pool = None  # the attention-pooling head: not used by a dense backbone
        self.model = model
        patch = model.patch_embed.patch_size
        ph, pw = (patch, patch) if isinstance(patch, int) else (int(patch[0]), int(patch[-1]))
        self.patch_size: tuple[int, int] = (ph, pw)
        self.stride: int | tuple[int, int] = ph if ph == pw else (ph, pw)
        self.out_channels: int = int(getattr(model, "embed_dim", None) or model.num_features)
        self.num_prefix_tokens: int = int(model.num_prefix_tokens)
        norm, fc_norm = getattr(model, "norm", None), getattr(model, "fc_norm", None)
        self.token_norm = isinstance(norm, nn.Identity) and isinstance(fc_norm, nn.Module) and not isinstance(
            fc_norm, nn.Identity
        )

    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        """The token grid ``(h, w)`` of an ``height x width`` input."""
        ph, pw = self.patch_size
        if getattr(self.model.patch_embed, "dynamic_img_pad", False):
            return -(-height // ph), -(-width // pw)
        return height // ph, width // pw

    def forward(self, x: Tensor) -> Tensor:
        """Map images ``(B, 3, H, W)`` to the patch-token map ``(B, out_channels, H // p, W // p)``."""
        tokens = self.model.forward_features(x)
        if tokens.dim() != 3:
            raise ValueError(f"forward_features must return tokens (B, N, C), but returned {tuple(tokens.shape)}")
        tokens = tokens[:, self.num_prefix_tokens :]
        if self.token_norm:
            tokens = self.model.fc_norm(tokens)
        h, w = self.grid_size(x.shape[-2], x.shape[-1])
        if h * w != tokens.shape[1]:
            grid = getattr(self.model.patch_embed, "grid_size", None)  # a fixed-size model
            if grid is None or grid[0] * grid[1] != tokens.shape[1]:
                raise ValueError(
                    f"{tokens.shape[1]} patch tokens do not form the grid of a {tuple(x.shape[-2:])} input "
                    f"with patch size {self.patch_size}"
                )
            h, w = int(grid[0]), int(grid[1])
        return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], h, w)


def _build_timm(name: str, pretrained: bool, output_stride: int | None, **kwargs: Any) -> nn.Module:
    model_name = name[len(TIMM_PREFIX) :]
    timm = _import_timm(name)
    if not model_name or not timm.is_model(model_name):
        raise ValueError(
            f"name must be 'timm:<model name>' with a model of timm.list_models(), but got {name!r}"
        )
    try:  # the architecture's kind, without allocating memory or loading weights
        with torch.device("meta"):
            probe = timm.create_model(model_name, pretrained=False, num_classes=0, **kwargs)
    except Exception:  # a model that cannot be built on the meta device: build it for real
        probe = timm.create_model(model_name, pretrained=False, num_classes=0, **kwargs)
    if _is_token_vit(probe):
        if output_stride is not None:
            raise ValueError(f"output_stride must be None for {name} (a ViT: the stride is its patch size), "
                             f"but got {output_stride}")
        if hasattr(probe, "dynamic_img_size") and "img_size" not in kwargs:
            kwargs.setdefault("dynamic_img_size", True)
        return TimmTokenMap(timm.create_model(model_name, pretrained=pretrained, num_classes=0, **kwargs))
    if output_stride is not None:
        kwargs["output_stride"] = output_stride
    try:
        model = timm.create_model(model_name, pretrained=pretrained, features_only=True, out_indices=(-1,), **kwargs)
    except RuntimeError as e:
        raise ValueError(
            f"{name} has no features_only mode in timm ({e}); wrap the model in a module that returns a "
            f"(B, C, h, w) map instead (any such module works as a backbone)"
        ) from e
    return TimmFeatureMap(model)


def build_backbone(
    name: str = "resnet50", *, output_stride: int | None = None, pretrained: bool = False, **kwargs: Any
) -> tuple[nn.Module, int]:
    """Build a backbone returning its last feature map (randomly initialised unless ``pretrained``).

    Args:
        name: one of :data:`BACKBONES`: ``"resnet18"``, ``"resnet34"``, ``"resnet50"``,
            ``"resnet101"``, ``"resnet152"`` or ``"tiny"``; or ``"timm:<model name>"`` for any
            timm model (optional dependency, ``pip install 'densecontrast[timm]'``): a CNN gives
            its last ``features_only`` map (:class:`TimmFeatureMap`), a ViT its patch tokens as a
            map with stride = patch size (:class:`TimmTokenMap`; created with
            ``dynamic_img_size=True`` where the model supports it and no ``img_size`` is given).
        output_stride: 32 (default for ResNets), or 16 / 8 for the bottleneck ResNets
            (50/101/152; the last one or two stages use dilation instead of striding, as in
            DeepLab), or 8 (default) / 16 for ``"tiny"``; passed on to timm CNNs that support it;
            ``None`` for ViTs.
        pretrained: timm models only: download and load timm's pretrained weights. The default
            ``False`` never downloads anything.
        **kwargs: forwarded to the torchvision constructor (e.g. ``zero_init_residual=True``,
            ``norm_layer``), to :class:`TinyConvNet` (``in_channels``, ``width``) or to
            ``timm.create_model`` (e.g. ``img_size``, ``drop_path_rate``).

    Returns:
        ``(module, out_channels)``; the module maps ``(B, 3, H, W)`` to
        ``(B, out_channels, ceil(H / stride), ceil(W / stride))`` (``H // p, W // p`` for a ViT
        with patch size ``p``) and has attributes ``out_channels`` and ``stride``.

    Raises:
        ValueError: for an unknown name, an unsupported stride, or ``pretrained`` for a
            non-timm backbone.
        ImportError: for a ``"timm:"`` name when timm is not installed.

    Examples:
        >>> import torch
        >>> net, c = build_backbone("resnet18")
        >>> net(torch.zeros(1, 3, 96, 64)).shape, c, net.stride
        (torch.Size([1, 512, 3, 2]), 512, 32)
        >>> net, c = build_backbone("tiny", output_stride=16)
        >>> net(torch.zeros(1, 3, 96, 96)).shape
        torch.Size([1, 128, 6, 6])
    """
    if isinstance(name, str) and name.startswith(TIMM_PREFIX):
        net = _build_timm(name, pretrained, output_stride, **kwargs)
        return net, net.out_channels
    check_choice(name, "name", BACKBONES, note="or 'timm:<model name>'")
    if pretrained:
        raise ValueError(f"pretrained weights are only built in for 'timm:' backbones, not for {name!r}: load "
                         f"them into the returned module yourself")
    if name == "tiny":
        net = TinyConvNet(stride=16 if output_stride is None else output_stride, **kwargs)
        return net, net.out_channels
    os_ = check_choice(32 if output_stride is None else output_stride, "output_stride", (8, 16, 32), note=f"for {name}")
    if os_ != 32 and name in ("resnet18", "resnet34"):
        raise ValueError(f"output_stride must be 32 for {name} (its BasicBlock has no dilation), but got {os_}")
    dilate = {32: [False, False, False], 16: [False, False, True], 8: [False, True, True]}[os_]
    if os_ != 32:
        kwargs["replace_stride_with_dilation"] = dilate
    import torchvision

    resnet = getattr(torchvision.models, name)(weights=None, **kwargs)
    trunk = ResNetTrunk(resnet)
    return trunk, trunk.out_channels


def convert_sync_batchnorm(model: nn.Module, enabled: bool | None = None) -> nn.Module:
    """Replace every ``BatchNorm*d`` by ``SyncBatchNorm`` when it makes a difference.

    Args:
        model: the network (before wrapping it in DDP).
        enabled: convert or not; default: only when a process group with more than one process
            exists (on one process ``SyncBatchNorm`` would only add overhead) and CUDA is available
            (``SyncBatchNorm`` runs on GPUs only; on CPU a warning says BatchNorm stays per process).

    Returns:
        The converted model (a new root module if the root itself was a BatchNorm), or ``model``.

    Examples:
        >>> import torch
        >>> m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4))
        >>> type(convert_sync_batchnorm(m)[1]).__name__  # not distributed: unchanged
        'BatchNorm2d'
        >>> type(convert_sync_batchnorm(m, enabled=True)[1]).__name__
        'SyncBatchNorm'
    """
    if enabled is None:
        enabled = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if enabled and not torch.cuda.is_available():
            warnings.warn("SyncBatchNorm needs CUDA devices; keeping per-process BatchNorm on the CPU", stacklevel=2)
            return model
    return nn.SyncBatchNorm.convert_sync_batchnorm(model) if enabled else model


Backbone = nn.Module | Callable[[Tensor], Any]
"""Anything mapping images ``(B, 3, H, W)`` to a feature map ``(B, C, h, w)`` (or a tuple/dict ending in one)."""


def extract_features(backbone: Backbone, x: Tensor, normalize: bool = True) -> Tensor:
    """Run ``backbone`` on a ``(B, 3, H, W)`` ``[0, 1]`` batch and return its ``(B, C, h, w)`` feature map.

    A backbone returning a tuple/list uses its last element; a dict uses ``"out"`` (torchvision
    ``IntermediateLayerGetter`` style) or its last value.

    Examples:
        >>> extract_features(nn.Conv2d(3, 5, 4, stride=4), torch.rand(2, 3, 16, 16)).shape
        torch.Size([2, 5, 4, 4])
    """
    if normalize:
        from densecontrast.transforms import IMAGENET_MEAN, IMAGENET_STD  # torchvision, imported lazily

        mean = x.new_tensor(IMAGENET_MEAN)[:, None, None]
        std = x.new_tensor(IMAGENET_STD)[:, None, None]
        x = (x - mean) / std
    out = backbone(x)
    if isinstance(out, dict):
        out = out["out"] if "out" in out else list(out.values())[-1]
    if isinstance(out, (tuple, list)):
        out = out[-1]
    if not isinstance(out, Tensor) or out.dim() != 4:
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(f"backbone must return a (B, C, h, w) feature map, but returned {got}")
    return out


def backbone_device(backbone: Backbone, device: torch.device | str | None) -> torch.device:
    """The device of ``backbone``'s first parameter (or ``device`` when given; the CPU for a plain callable).

    Examples:
        >>> backbone_device(nn.Conv2d(3, 4, 1), None)
        device(type='cpu')
    """
    if device is not None:
        return torch.device(device)
    if isinstance(backbone, nn.Module):
        p = next(iter(backbone.parameters()), None)
        if p is not None:
            return p.device
    return torch.device("cpu")


def plain_state_dict(backbone: nn.Module | Mapping[str, Any]) -> dict[str, Tensor]:
    """A backbone's tensors on the CPU without ``module.`` / ``_orig_mod.`` prefixes (DDP, ``torch.compile``).

    Args:
        backbone: a module (possibly wrapped) or a state dict; non-tensor entries are dropped.

    Examples:
        >>> net = nn.Conv2d(3, 4, 1)
        >>> sorted(plain_state_dict(nn.parallel.DataParallel(net)))
        ['bias', 'weight']
    """
    if isinstance(backbone, nn.Module):
        backbone = backbone.state_dict()
    check_type(backbone, "backbone", Mapping, what="an nn.Module or a state dict")
    out = {}
    for k, v in backbone.items():
        for pre in ("module.", "_orig_mod."):
            while k.startswith(pre):
                k = k[len(pre) :]
        if isinstance(v, Tensor):
            out[k] = v.detach().cpu()
    return out


def check_torchvision_keys(state_dict: Mapping[str, Tensor], arch: str) -> None:
    """Check that ``state_dict`` loads into ``torchvision.models.<arch>()`` with only ``fc.*`` missing.

    The reference model is built on the meta device (shapes only: no memory, no download). Names
    that are not torchvision models (e.g. ``"tiny"``) pass without a check.

    Raises:
        ValueError: naming the unexpected, missing and mis-shaped keys (first 5 of each).

    Examples:
        >>> check_torchvision_keys(plain_state_dict(build_backbone("resnet18")[0]), "resnet18")
    """
    import torchvision

    try:
        builder = torchvision.models.get_model_builder(arch)
    except ValueError:
        return  # not a torchvision model name: nothing to compare against
    with torch.device("meta"):
        ref = builder(weights=None).state_dict()
    unexpected = sorted(set(state_dict) - set(ref))
    missing = sorted(k for k in set(ref) - set(state_dict) if not k.startswith("fc."))
    bad_shape = sorted(k for k in set(state_dict) & set(ref) if tuple(state_dict[k].shape) != tuple(ref[k].shape))
    if unexpected or missing or bad_shape:
        raise ValueError(
            f"backbone does not match torchvision.models.{arch}: unexpected keys {unexpected[:5]}, "
            f"missing keys {missing[:5]}, shape mismatches {bad_shape[:5]} (first 5 of each shown)"
        )
