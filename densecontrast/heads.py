"""Projection heads, predictors and PixPro's pixel propagation module (PPM).

Global heads act on pooled ``(B, C)`` vectors; dense heads act on ``(B, C, h, w)`` feature maps
cell by cell (1x1 convolutions). The factories return an :class:`torch.nn.ModuleDict` with the
head dimensions each method uses by default; every factory takes overrides, so for a ResNet-18
(512 backbone channels) pass ``in_dim=512``.

Default dimensions of the factories (``in -> hidden -> out``; ``C = in_dim``, 2048 for a
ResNet-50 C5 map):

| factory | key | module | dims |
|---|---|---|---|
| `pixcon_heads` | `projector` | `ProjectionMLP` (BN) | C -> 2048 -> 128 |
| | `dense_projector` | `DenseProjection` (BN) | C -> 2048 -> 128 |
| | `predictor` | `ProjectionMLP` (BN) | 128 -> 2048 -> 128 |
| | `dense_predictor` | `DensePredictor` (BN) | 128 -> 2048 -> 128 |
| `densecl_heads` | `projector` | `ProjectionMLP` (no BN) | C -> 2048 -> 128 |
| | `dense_projector` | `DenseProjection` (no BN) | C -> 2048 -> 128 |
| `pixpro_heads` | `dense_projector` | `DenseProjection` (BN) | C -> 4096 -> 256 |
| | `ppm` | `PixelPropagation` | 256, gamma = 2, g = 1x1 conv |
| | `instance_projector` (optional) | `DenseProjection` (BN) | C -> 4096 -> 256 |
| | `instance_predictor` (optional) | `DensePredictor` (BN) | 256 -> 4096 -> 256 |
| `lc_heads` | `projector` | `ProjectionMLP` (BN) | C -> 4096 -> 256 |
| | `predictor` | `ProjectionMLP` (BN) | 256 -> 4096 -> 256 |
| | `dense_projector` | `DenseProjection` (BN) | C -> 2048 -> 256 |
| `densesiam_heads` | `projector` | `ProjectionMLP` (BN, last BN) | C -> 2048 -> 2048 |
| | `predictor` | `ProjectionMLP` (BN) | 2048 -> 512 -> 2048 |
| | `dense_projector` | `DenseProjection` (BN) | C -> 2048 -> 2048 |
| | `dense_predictor` | `DensePredictor` (BN) | 2048 -> 512 -> 2048 |
| | `region_logits` (optional) | `DenseProjection` (BN) + BN without affine | C -> 2048 -> K |
| | `region_projector` (optional) | `ProjectionMLP` (BN) | C -> 2048 -> 256 |
| | `region_predictor` (optional) | `ProjectionMLP` (BN) | 256 -> 512 -> 256 |

PixCon, DenseCL, PixPro and LC-loss dimensions follow the methods' released configurations or
papers. DenseSiam's pre-training heads were not released; its defaults follow the SimSiam recipe
(projector 2048-d, bottleneck predictor 512-d) and should be treated as a reasonable starting point.

Convention:
    Dense heads keep the spatial layout: input ``(B, C, h, w)`` -> output ``(B, D, h, w)``.
    BatchNorm in a dense head pools its statistics over all ``B * h * w`` cells of the batch
    (exactly like BatchNorm1d on the flattened ``(B * h * w, D)`` pixel matrix). Convert to
    SyncBatchNorm with :meth:`torch.nn.SyncBatchNorm.convert_sync_batchnorm` for multi-GPU runs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from densecontrast._checks import check_choice, check_int, check_positive, check_shape, to_compute

__all__ = [
    "DensePredictor",
    "DenseProjection",
    "PixelPropagation",
    "ProjectionMLP",
    "densecl_heads",
    "densesiam_heads",
    "lc_heads",
    "pixcon_heads",
    "pixel_propagation",
    "pixpro_heads",
]


class ProjectionMLP(nn.Module):
    """Two-layer MLP ``Linear -> [BN] -> ReLU -> Linear [-> BN]`` on ``(B, C)`` vectors.

    The projector and the predictor (BYOL / SimSiam / PixCon) of every method: both have this
    layout, so the factories build both from this class.

    Args:
        in_dim: input features ``C``.
        hidden_dim: hidden features.
        out_dim: output features ``D``.
        batch_norm: BatchNorm1d after the first linear layer (False: DenseCL's head).
        last_bn: an affine-free BatchNorm1d after the last layer (SimSiam projector style).

    Shapes:
        ``(B, in_dim)`` -> ``(B, out_dim)``.

    Examples:
        >>> _ = torch.manual_seed(0)
        >>> head = ProjectionMLP(512, 1024, 128)
        >>> head(torch.randn(4, 512)).shape
        torch.Size([4, 128])
    """

    def __init__(
        self, in_dim: int, hidden_dim: int, out_dim: int, batch_norm: bool = True, last_bn: bool = False
    ) -> None:
        super().__init__()
        for name, value in (("in_dim", in_dim), ("hidden_dim", hidden_dim), ("out_dim", out_dim)):
            check_int(value, name, 1)
        self.in_dim, self.hidden_dim, self.out_dim = in_dim, hidden_dim, out_dim
        layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dim)]
        if batch_norm:
            layers.append(nn.BatchNorm1d(hidden_dim))
        layers += [nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim)]
        if last_bn:
            layers.append(nn.BatchNorm1d(out_dim, affine=False))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """Project ``(B, in_dim)`` -> ``(B, out_dim)``."""
        check_shape(x, "x", ("B", "C"), sizes={"C": self.in_dim})
        return self.net(x)


class DenseProjection(nn.Module):
    """Dense head ``Conv1x1 -> [BN] -> ReLU -> Conv1x1`` applied at every feature cell.

    Args:
        in_dim: input channels ``C``.
        hidden_dim: hidden channels.
        out_dim: output channels ``D``.
        batch_norm: BatchNorm2d after the first convolution (statistics over ``B * h * w``
            cells); False gives DenseCL's head.

    Shapes:
        ``(B, in_dim, h, w)`` -> ``(B, out_dim, h, w)``.

    Examples:
        >>> _ = torch.manual_seed(0)
        >>> head = DenseProjection(512, 1024, 128)
        >>> head(torch.randn(2, 512, 7, 7)).shape
        torch.Size([2, 128, 7, 7])
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, batch_norm: bool = True) -> None:
        super().__init__()
        for name, value in (("in_dim", in_dim), ("hidden_dim", hidden_dim), ("out_dim", out_dim)):
            check_int(value, name, 1)
        self.in_dim, self.hidden_dim, self.out_dim = in_dim, hidden_dim, out_dim
        layers: list[nn.Module] = [nn.Conv2d(in_dim, hidden_dim, 1)]
        if batch_norm:
            layers.append(nn.BatchNorm2d(hidden_dim))
        layers += [nn.ReLU(inplace=True), nn.Conv2d(hidden_dim, out_dim, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """Project ``(B, in_dim, h, w)`` -> ``(B, out_dim, h, w)``."""
        check_shape(x, "x", ("B", "C", "h", "w"), sizes={"C": self.in_dim})
        return self.net(x)


class DensePredictor(nn.Module):
    """Per-pixel predictor that runs on the flattened ``(B * h * w, D)`` pixel matrix.

    ``Linear -> BatchNorm1d -> ReLU -> Linear`` applied to every pixel vector, so the BatchNorm
    statistics pool over **all pixels of the batch** (PixCon's dense predictor). It computes the
    same function as a :class:`DenseProjection` with the same weights, but keeps PixCon's
    parameter layout (``Linear`` weights ``(out, in)`` under ``mlp.net.*``), so its ``state_dict``
    is that of a :class:`ProjectionMLP`.

    Args:
        in_dim: input channels ``D``.
        hidden_dim: hidden features.
        out_dim: output channels.
        batch_norm: BatchNorm1d after the first layer.

    Shapes:
        ``(B, in_dim, h, w)`` -> ``(B, out_dim, h, w)``.

    Examples:
        >>> _ = torch.manual_seed(0)
        >>> pred = DensePredictor(128, 512, 128)
        >>> pred(torch.randn(2, 128, 7, 7)).shape
        torch.Size([2, 128, 7, 7])
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, batch_norm: bool = True) -> None:
        super().__init__()
        self.mlp = ProjectionMLP(in_dim, hidden_dim, out_dim, batch_norm=batch_norm)
        self.in_dim, self.hidden_dim, self.out_dim = in_dim, hidden_dim, out_dim

    def forward(self, x: Tensor) -> Tensor:
        """Predict ``(B, in_dim, h, w)`` -> ``(B, out_dim, h, w)``."""
        b, _, h, w = check_shape(x, "x", ("B", "D", "h", "w"), sizes={"D": self.in_dim})
        out = self.mlp(rearrange(x, "b d h w -> (b h w) d"))
        return rearrange(out, "(b h w) d -> b d h w", b=b, h=h, w=w)


def pixel_propagation(x: Tensor, gx: Tensor, gamma: float = 2.0) -> Tensor:
    """Pixel propagation ``y_i = sum_j max(cos(x_i, x_j), 0)^gamma * gx_j`` (functional PPM).

    Args:
        x: ``(B, D, h, w)`` features that define the similarities.
        gx: ``(B, D', h, w)`` transformed features to propagate (already normalized if wanted).
        gamma: sharpness exponent (> 0).

    Returns:
        ``(B, D', h, w)`` float32 (float64 for float64 inputs). No normalization by
        ``sum_j s_ij``. The ``(N, N)`` similarity (``N = h * w``) and the propagation are computed
        in float32, also under autocast.

    Examples:
        >>> x = torch.tensor([[[[1.0, -1.0]]]])  # (1, 1, 1, 2): two opposite pixels
        >>> pixel_propagation(x, torch.tensor([[[[1.0, 2.0]]]]))  # negative cosine clamps to 0
        tensor([[[[1., 2.]]]])
    """
    dims: dict[str, int] = {}
    check_shape(x, "x", ("B", "D", "h", "w"), sizes=dims)
    check_shape(gx, "gx", ("B", "D'", "h", "w"), sizes=dims, of="x")
    gamma = check_positive(gamma, "gamma")
    with torch.autocast(device_type=x.device.type, enabled=False):
        xn = F.normalize(rearrange(to_compute(x), "b d h w -> b d (h w)"), dim=1)  # (B, D, N)
        sim = torch.bmm(xn.transpose(1, 2), xn).clamp_min(0)  # (B, N, N), s_ij
        if gamma < 1:  # d/ds s^gamma is infinite at 0
            sim = sim + 1e-6
        sim = sim.pow(gamma)
        g = rearrange(to_compute(gx), "b d h w -> b d (h w)")
        y = torch.bmm(g, sim.transpose(1, 2))  # (B, D', N): y_i = sum_j s_ij g_j
    return rearrange(y, "b d (h w) -> b d h w", h=dims["h"], w=dims["w"])


class PixelPropagation(nn.Module):
    """PixPro's pixel propagation module (PPM).

    ``s_ij = max(cos(x_i, x_j), 0)^gamma``, ``y_i = sum_j s_ij * normalize(g(x_j))`` where ``g`` is
    the identity (``transform_layers=0``), a 1x1 convolution with bias (``1``, PixPro's default) or
    ``Conv1x1 -> BN -> ReLU -> Conv1x1`` (``2``). ``g(x)`` is L2-normalized per pixel before
    propagation; ``y`` is not normalized by ``sum_j s_ij`` (the consistency loss uses cosines, so
    the scale of ``y`` does not matter). Cost: ``O(B * N^2 * D)`` with ``N = h * w``.

    Args:
        dim: channels ``D`` of the projection.
        gamma: sharpness exponent (> 0; PixPro uses 2).
        transform_layers: 0, 1 or 2, the depth of ``g``.

    Shapes:
        ``(B, D, h, w)`` -> ``(B, D, h, w)`` float32 (float64 for float64 input); the similarity
        and the sum run in float32, also under autocast.

    Examples:
        >>> _ = torch.manual_seed(0)
        >>> ppm = PixelPropagation(256)
        >>> ppm(torch.randn(2, 256, 7, 7)).shape
        torch.Size([2, 256, 7, 7])
    """

    def __init__(self, dim: int, gamma: float = 2.0, transform_layers: int = 1) -> None:
        super().__init__()
        self.dim = check_int(dim, "dim", 1)
        self.gamma = check_positive(gamma, "gamma")
        self.transform_layers = check_choice(transform_layers, "transform_layers", (0, 1, 2))
        if transform_layers == 0:
            self.transform: nn.Module = nn.Identity()
        elif transform_layers == 1:
            self.transform = nn.Conv2d(dim, dim, 1)
        else:
            self.transform = nn.Sequential(
                nn.Conv2d(dim, dim, 1), nn.BatchNorm2d(dim), nn.ReLU(inplace=True), nn.Conv2d(dim, dim, 1)
            )

    def forward(self, x: Tensor) -> Tensor:
        """Propagate ``(B, D, h, w)`` -> ``(B, D, h, w)``."""
        check_shape(x, "x", ("B", "D", "h", "w"), sizes={"D": self.dim})
        gx = F.normalize(to_compute(self.transform(x)), dim=1)
        return pixel_propagation(x, gx, self.gamma)


# ----------------------------------------------------------------------------------------------
# factories


def pixcon_heads(
    in_dim: int = 2048, hidden_dim: int = 2048, out_dim: int = 128, pred_hidden_dim: int | None = None
) -> nn.ModuleDict:
    """PixCon heads: global + dense projectors (BN) and global + dense predictors.

    Args:
        in_dim: backbone channels (2048 for ResNet-50 C5, 512 for ResNet-18).
        hidden_dim: hidden width of the projectors.
        out_dim: projection dim ``D``.
        pred_hidden_dim: hidden width of the predictors (default ``hidden_dim``).

    Returns:
        ``ModuleDict`` with ``projector`` (C -> 2048 -> 128), ``dense_projector``
        (C -> 2048 -> 128, 1x1 conv), ``predictor`` (128 -> 2048 -> 128) and ``dense_predictor``
        (128 -> 2048 -> 128 on the flattened pixel matrix). The momentum target copies the
        projectors only (no predictors).

    Examples:
        >>> heads = pixcon_heads(in_dim=512)
        >>> sorted(heads.keys())
        ['dense_predictor', 'dense_projector', 'predictor', 'projector']
    """
    ph = hidden_dim if pred_hidden_dim is None else pred_hidden_dim
    return nn.ModuleDict(
        {
            "projector": ProjectionMLP(in_dim, hidden_dim, out_dim),
            "dense_projector": DenseProjection(in_dim, hidden_dim, out_dim),
            "predictor": ProjectionMLP(out_dim, ph, out_dim),
            "dense_predictor": DensePredictor(out_dim, ph, out_dim),
        }
    )


def densecl_heads(in_dim: int = 2048, hidden_dim: int = 2048, out_dim: int = 128) -> nn.ModuleDict:
    """DenseCL heads: global and dense projectors **without BatchNorm**.

    Args:
        in_dim: backbone channels.
        hidden_dim: hidden width.
        out_dim: projection dim ``D``.

    Returns:
        ``ModuleDict`` with ``projector`` (C -> 2048 -> 128) and ``dense_projector``
        (C -> 2048 -> 128, 1x1 conv).

    Examples:
        >>> heads = densecl_heads(in_dim=512)
        >>> proj = heads["dense_projector"]
        >>> proj(torch.zeros(1, 512, 7, 7)).shape
        torch.Size([1, 128, 7, 7])
    """
    return nn.ModuleDict(
        {
            "projector": ProjectionMLP(in_dim, hidden_dim, out_dim, batch_norm=False),
            "dense_projector": DenseProjection(in_dim, hidden_dim, out_dim, batch_norm=False),
        }
    )


def pixpro_heads(
    in_dim: int = 2048,
    hidden_dim: int = 4096,
    out_dim: int = 256,
    gamma: float = 2.0,
    transform_layers: int = 1,
    instance: bool = False,
) -> nn.ModuleDict:
    """PixPro heads: dense projector (BN) + pixel propagation module; optional instance branch.

    Args:
        in_dim: backbone channels.
        hidden_dim: hidden width (4096).
        out_dim: projection dim (256).
        gamma: PPM sharpness (2).
        transform_layers: depth of the PPM transform ``g`` (1: a 1x1 conv).
        instance: also build ``instance_projector`` (dense, C -> 4096 -> 256) and
            ``instance_predictor`` (dense, 256 -> 4096 -> 256), used per pixel and then pooled.

    Returns:
        ``ModuleDict`` with ``dense_projector`` and ``ppm`` (plus the instance heads). The
        momentum target copies ``dense_projector`` (and ``instance_projector``).

    Examples:
        >>> heads = pixpro_heads(in_dim=512, hidden_dim=1024)
        >>> proj, ppm = heads["dense_projector"], heads["ppm"]
        >>> ppm(proj(torch.randn(2, 512, 7, 7))).shape
        torch.Size([2, 256, 7, 7])
    """
    heads = {
        "dense_projector": DenseProjection(in_dim, hidden_dim, out_dim),
        "ppm": PixelPropagation(out_dim, gamma=gamma, transform_layers=transform_layers),
    }
    if instance:
        heads["instance_projector"] = DenseProjection(in_dim, hidden_dim, out_dim)
        heads["instance_predictor"] = DensePredictor(out_dim, hidden_dim, out_dim)
    return nn.ModuleDict(heads)


def lc_heads(
    in_dim: int = 2048,
    hidden_dim: int = 4096,
    out_dim: int = 256,
    dense_hidden_dim: int = 2048,
    dense_out_dim: int = 256,
) -> nn.ModuleDict:
    """LC-loss heads: a BYOL projector and predictor plus a local (dense) projector.

    Args:
        in_dim: backbone channels.
        hidden_dim: hidden width of the BYOL projector and predictor (4096).
        out_dim: BYOL projection dim (256).
        dense_hidden_dim: hidden channels of the local head (2048).
        dense_out_dim: output channels of the local head (256).

    Returns:
        ``ModuleDict`` with ``projector`` (C -> 4096 -> 256), ``predictor`` (256 -> 4096 -> 256) and
        ``dense_projector`` (C -> 2048 -> 256, Conv-BN-ReLU-Conv; the paper does not name the
        nonlinearity, a ReLU is assumed).

    Examples:
        >>> heads = lc_heads(in_dim=512, hidden_dim=1024, dense_hidden_dim=512)
        >>> proj = heads["dense_projector"]
        >>> proj(torch.randn(2, 512, 7, 7)).shape
        torch.Size([2, 256, 7, 7])
    """
    return nn.ModuleDict(
        {
            "projector": ProjectionMLP(in_dim, hidden_dim, out_dim),
            "predictor": ProjectionMLP(out_dim, hidden_dim, out_dim),
            "dense_projector": DenseProjection(in_dim, dense_hidden_dim, dense_out_dim),
        }
    )


def densesiam_heads(
    in_dim: int = 2048,
    hidden_dim: int = 2048,
    out_dim: int = 2048,
    pred_hidden_dim: int = 512,
    num_regions: int | None = None,
    region_dim: int = 256,
) -> nn.ModuleDict:
    """DenseSiam heads: SimSiam-style global and dense projector/predictor, optional region heads.

    Args:
        in_dim: backbone channels.
        hidden_dim: hidden width of the projectors (2048).
        out_dim: projection dim (2048).
        pred_hidden_dim: bottleneck width of the predictors (512).
        num_regions: ``K`` soft regions for RegionSim; when given, also builds ``region_logits``
            (dense, C -> hidden -> K, whose output is softmaxed over K by
            :func:`densecontrast.losses.dense_simsiam.region_embeddings`), ``region_projector``
            (C -> hidden -> region_dim) and ``region_predictor`` (region_dim -> 512 -> region_dim),
            applied to the ``(B * K, C)`` region embeddings.
        region_dim: output dim of the region projector.

    Returns:
        ``ModuleDict`` with ``projector``, ``predictor``, ``dense_projector``, ``dense_predictor``
        (plus the region heads). No momentum target (SimSiam uses stop-gradient).

    Examples:
        >>> heads = densesiam_heads(in_dim=512, hidden_dim=256, out_dim=256, pred_hidden_dim=64, num_regions=4)
        >>> region_logits = heads["region_logits"]
        >>> region_logits(torch.randn(2, 512, 7, 7)).shape
        torch.Size([2, 4, 7, 7])
    """
    heads = {
        "projector": ProjectionMLP(in_dim, hidden_dim, out_dim, last_bn=True),
        "predictor": ProjectionMLP(out_dim, pred_hidden_dim, out_dim),
        "dense_projector": DenseProjection(in_dim, hidden_dim, out_dim),
        "dense_predictor": DensePredictor(out_dim, pred_hidden_dim, out_dim),
    }
    if num_regions is not None:
        check_int(num_regions, "num_regions", 1)
        check_int(region_dim, "region_dim", 1)
        # the released DenseSiam ends the mask head with a BatchNorm without affine parameters
        heads["region_logits"] = nn.Sequential(
            DenseProjection(in_dim, hidden_dim, num_regions), nn.BatchNorm2d(num_regions, affine=False)
        )
        heads["region_projector"] = ProjectionMLP(in_dim, hidden_dim, region_dim)
        heads["region_predictor"] = ProjectionMLP(region_dim, pred_hidden_dim, region_dim)
    return nn.ModuleDict(heads)
