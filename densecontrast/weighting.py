"""Per-query weights for dense losses: PixCon semantic reweighting (PixCon-SR) and its ablations.

Convention:
    Weights are ``(B, N)`` over the queries of a :class:`~densecontrast.matching.Matches`
    (query cells of view 1, row-major). They carry no gradient and are computed in float32
    (float64 inputs stay float64) with autocast disabled. Losses reduce with
    ``sum(w * valid * loss) / max(sum(w * valid), eps)`` over the whole batch, as PixCon does.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from einops import reduce
from torch import Tensor, nn

from densecontrast._checks import (
    check_choice,
    check_geometry_pair,
    check_grid_shape,
    check_matches,
    check_number,
    check_positive,
    check_shape,
    compute_dtype,
)
from densecontrast.geometry import ViewGeometry, in_box_mask
from densecontrast.matching.matches import Matches

__all__ = ["SemanticReweighting", "semantic_reweighting"]

_MODES = ("sr", "spatial", "similarity")
_DEGENERATE = ("one", "zero")


def _check_options(gamma: object, mode: object, degenerate: object, eps: object) -> None:
    check_number(gamma, "gamma", 0)
    check_choice(mode, "mode", _MODES)
    check_choice(degenerate, "degenerate", _DEGENERATE)
    check_positive(eps, "eps")


def semantic_reweighting(
    similarity: Tensor | None,
    in_box: Tensor | None,
    gamma: float = 2.0,
    mode: Literal["sr", "spatial", "similarity"] = "sr",
    degenerate: Literal["one", "zero"] = "one",
    eps: float = 1e-6,
) -> Tensor:
    """PixCon semantic reweighting (Eq. 7 as released) and the "Spa." / "Sim." ablations.

    ``mode="sr"`` (PixCon-SR). Per image, with ``s`` the matched similarity of every query
    (the max cosine of :func:`~densecontrast.matching.similarity_match`) and ``M`` the in-box
    queries::

        w_i = 1                                                   if i in M
        w_i = ((s_i - min_{all j} s_j) / (max_{j not in M} s_j - min_{all j} s_j)) ** gamma   otherwise

    The min runs over **all** queries of the image, the max over **out-of-box** queries only,
    so out-of-box weights lie in ``[0, 1]`` and the most similar out-of-box query gets 1.
    Degenerate images, where the denominator is ``<= eps`` (all out-of-box ``s`` equal the
    minimum, e.g. a single out-of-box query that also holds the minimum; upstream this is
    ``0 / 0 = NaN`` and poisons the loss), give their out-of-box queries weight 1
    (``degenerate="one"``, treat them like plain PixCon-Sim) or 0 (``"zero"``, drop them).
    The denominator is also clamped to ``eps``. Images with no out-of-box query are all 1.

    ``mode="spatial"`` (Table 3 "Spa."): ``w = 1[in_box]``. ``mode="similarity"`` ("Sim.",
    upstream ``use_mask=False``): ``w = max(s, 0) ** gamma``. Negative similarities are
    **clamped to 0** here; upstream raises them to the power directly, so with an even
    ``gamma`` a cosine of -0.9 would weigh 0.81, rewarding dissimilar matches.

    Non-finite similarities (NaN or inf, e.g. of a query with NaN features, which
    :func:`~densecontrast.matching.similarity_match` marks invalid) give weight **0** in ``"sr"``
    and ``"similarity"``, in-box or not, and ``"sr"`` leaves them out of the image's min and
    max, so the other queries weigh as if they were absent (upstream, one NaN made the image
    "degenerate" and every weight 1). No error is raised and nothing is synchronized with the
    host. ``"spatial"`` does not read ``similarity``. With ``N = 0`` queries the result is an
    empty ``(B, 0)`` tensor.

    Args:
        similarity: ``(B, N)`` float matched similarities (not needed for ``"spatial"``); may hold NaN.
        in_box: ``(B, N)`` bool, query inside the key view (not needed for ``"similarity"``).
        gamma: sharpening exponent (PixCon default 2), ``>= 0``.
        mode: ``"sr"``, ``"spatial"`` or ``"similarity"``.
        degenerate: out-of-box weight for degenerate images in ``"sr"``: ``"one"`` or ``"zero"``.
        eps: denominator guard (> 0).

    Returns:
        ``(B, N)`` float32 weights (float64 for float64 similarity) in ``[0, 1]`` (``"sr"``,
        ``"spatial"``) or ``>= 0``, detached, finite.

    Raises:
        ValueError: bad shapes or dtypes, or an unknown ``mode`` / ``degenerate``.

    Examples:
        >>> s = torch.tensor([[0.9, 0.2, 0.6, 0.4]])
        >>> in_box = torch.tensor([[True, True, False, False]])
        >>> semantic_reweighting(s, in_box)  # out-of-box: ((0.6-0.2)/(0.6-0.2))^2, ((0.4-0.2)/0.4)^2
        tensor([[1.0000, 1.0000, 1.0000, 0.2500]])
        >>> semantic_reweighting(torch.tensor([[0.5, 0.1]]), torch.tensor([[True, False]]))  # 0/0 upstream
        tensor([[1., 1.]])
        >>> semantic_reweighting(torch.tensor([[float("nan"), 0.2, 0.6, 0.4]]), in_box)  # NaN: weight 0, ignored
        tensor([[0.0000, 1.0000, 1.0000, 0.2500]])
    """
    _check_options(gamma, mode, degenerate, eps)
    ref = similarity if similarity is not None else in_box
    if ref is None:
        raise ValueError("similarity and in_box must not both be None")
    dims: dict[str, int] = {}
    if similarity is not None:
        check_shape(similarity, "similarity", ("B", "N"), sizes=dims, floating=True)
    if in_box is not None:
        check_shape(in_box, "in_box", ("B", "N"), sizes=dims, of="similarity")
        if in_box.dtype != torch.bool:
            raise ValueError(f"in_box must be a bool tensor, but got dtype {in_box.dtype}")
    if mode != "spatial" and similarity is None:
        raise ValueError(f"similarity is required for mode={mode!r}, but got None")
    if mode != "similarity" and in_box is None:
        raise ValueError(f"in_box is required for mode={mode!r}, but got None")

    dtype = compute_dtype(similarity)
    with torch.no_grad(), torch.autocast(device_type=ref.device.type, enabled=False):
        if mode == "spatial":
            assert in_box is not None
            return in_box.to(dtype)
        assert similarity is not None
        s = similarity.detach().to(dtype)
        if s.shape[1] == 0:  # no queries: nothing to weigh (the min below needs one)
            return torch.ones_like(s)
        finite = torch.isfinite(s)
        zero = torch.zeros_like(s)
        if mode == "similarity":
            return torch.where(finite, s.clamp_min(0) ** gamma, zero)
        assert in_box is not None
        s_min = reduce(s.masked_fill(~finite, math.inf), "b n -> b 1", "min")  # +inf if no finite query
        # -inf if no finite out-of-box query
        s_max_out = reduce(s.masked_fill(in_box | ~finite, -math.inf), "b n -> b 1", "max")
        den = s_max_out - s_min
        degenerate_img = ~(den > eps)  # also True for -inf (empty out-of-box set)
        ratio = ((s - s_min) / den.clamp_min(eps)).clamp(0, 1) ** gamma
        fill = 1.0 if degenerate == "one" else 0.0
        out = torch.where(degenerate_img, torch.full_like(ratio, fill), ratio)
        out = torch.where(in_box, torch.ones_like(out), out)
        return torch.where(finite, out, zero)


class SemanticReweighting(nn.Module):
    """PixCon-SR weights as a module: multiplies ``matches.weight`` by :func:`semantic_reweighting`.

    Args:
        gamma: sharpening exponent (PixCon default 2).
        in_box_rule: ``"center"`` (cell center inside the key view) or ``"pixcon"`` (the
            upstream floor rule, for parity); used when geometry is passed to ``forward``.
        mode: ``"sr"``, ``"spatial"`` or ``"similarity"``.
        degenerate: out-of-box weight for degenerate images: ``"one"`` or ``"zero"``.
        eps: denominator guard.

    Examples:
        >>> from densecontrast.matching import similarity_match
        >>> size = torch.tensor([64.0, 64.0])
        >>> q = ViewGeometry.from_crops(torch.tensor([[0.0, 0.0, 64.0, 64.0]]), None, size)
        >>> k = ViewGeometry.from_crops(torch.tensor([[0.0, 0.0, 32.0, 64.0]]), None, size)
        >>> _ = torch.manual_seed(0)
        >>> m = similarity_match(torch.randn(1, 8, 2, 2), torch.randn(1, 8, 2, 2))
        >>> w = SemanticReweighting()(m, q, k, (2, 2)).weight
        >>> w[0, [0, 2]]  # the left column lies in the key view: weight 1
        tensor([1., 1.])
        >>> bool(((w >= 0) & (w <= 1)).all())
        True
    """

    def __init__(
        self,
        gamma: float = 2.0,
        in_box_rule: Literal["center", "pixcon"] = "center",
        mode: Literal["sr", "spatial", "similarity"] = "sr",
        degenerate: Literal["one", "zero"] = "one",
        eps: float = 1e-6,
    ) -> None:
        super().__init__()
        _check_options(gamma, mode, degenerate, eps)
        check_choice(in_box_rule, "in_box_rule", ("center", "pixcon"))
        self.gamma = float(gamma)
        self.in_box_rule = in_box_rule
        self.mode = mode
        self.degenerate = degenerate
        self.eps = float(eps)

    def forward(
        self,
        matches: Matches,
        query_geometry: ViewGeometry | None = None,
        key_geometry: ViewGeometry | None = None,
        query_shape: tuple[int, int] | None = None,
    ) -> Matches:
        """Reweight ``matches``.

        Args:
            matches: a :class:`Matches` with ``similarity`` (unless ``mode="spatial"``).
            query_geometry: query views; with ``key_geometry`` and ``query_shape`` the in-box
                mask is computed with :func:`~densecontrast.geometry.in_box_mask` and
                ``in_box_rule``. Without geometry, ``matches.in_box`` is used.
            key_geometry: key views.
            query_shape: ``(h_q, w_q)`` of the query grid (``h_q * w_q = N``).

        Returns:
            ``matches`` with ``weight`` multiplied by the new weights (detached) and ``in_box``
            set to the mask that was used. Queries with a non-finite ``similarity`` also become
            ``valid = False`` (unless ``mode="spatial"``, which does not read it).
        """
        check_matches(matches)
        in_box = matches.in_box
        if (query_geometry is None) != (key_geometry is None):
            raise ValueError("query_geometry and key_geometry must be given together, but got only one")
        if query_geometry is not None:
            assert key_geometry is not None
            if query_shape is None:
                raise ValueError("query_shape (h_q, w_q) is required with geometry, but got None")
            h, w = check_grid_shape(query_shape, "query_shape")
            b, n = matches.valid.shape
            if h * w != n:
                raise ValueError(f"query_shape must satisfy h * w = N = {n}, but got {tuple(query_shape)}")
            check_geometry_pair(query_geometry, key_geometry, batch=b)  # validation only: in_box_mask promotes
            in_box = in_box_mask(query_geometry, key_geometry, h, w, rule=self.in_box_rule).to(matches.valid.device)
        if self.mode != "similarity" and in_box is None:
            raise ValueError("matches.in_box is None: pass query_geometry, key_geometry and query_shape")
        weights = semantic_reweighting(
            matches.similarity, in_box, gamma=self.gamma, mode=self.mode, degenerate=self.degenerate, eps=self.eps
        )
        changes: dict[str, Tensor] = {"weight": (matches.weight.to(weights.dtype) * weights).detach()}
        if in_box is not None:
            changes["in_box"] = in_box
        if self.mode != "spatial" and matches.similarity is not None:
            changes["valid"] = matches.valid & torch.isfinite(matches.similarity)
        return matches.replace(**changes)

    def extra_repr(self) -> str:
        return (
            f"gamma={self.gamma}, in_box_rule={self.in_box_rule!r}, mode={self.mode!r}, "
            f"degenerate={self.degenerate!r}"
        )
