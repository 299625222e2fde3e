"""Mixup variants (docs/method.md, Mixup variants): how a class-i sample ``a`` and its class-j partner ``b`` are mixed.

Every variant keeps the dominant label i unless it says otherwise, and returns the mixed tensor together
with ``lam_eff`` (B,), the fraction of the result that comes from ``a`` (the actual mixing weight for
feature variants, the area fraction for map variants). The engine draws ``lam`` ~ U(lambda_min, 1) and owns
the ``torch.Generator``; this module uses no other source of randomness, so a run resumes exactly.

- ``feature``: ``lam * a + (1 - lam) * b`` on pooled features (B, d); hard label i (the released method).
- ``feature_soft``: the same mixture; soft target ``lam e_i + (1 - lam) e_j``.
- ``cutmix``: on cached spatial maps (B, C, H, W): one axis-aligned box of positions is taken from ``b``,
  the rest from ``a``; hard label i. The box's area is the achievable rectangle area nearest to the target
  ``(1 - lam) H W``, rounded *stochastically* between the two nearest achievable areas so that its
  expectation equals the target, and the box is placed uniformly *inside* the map (original CutMix
  centres it anywhere and clips it at the borders, which shrinks the area on small maps: at 4 x 4 the
  clip would dominate). ``lam_eff = 1 - box area / (H W)`` is the true fraction of ``a``.
- ``puzzlemix``: on cached maps, a saliency-guided mask (below); hard label i.

PuzzleMix here, step by step (all on the ``H x W`` grid of map positions; every position is one cell):

1. Saliency: the channel-wise L2 norm of each map, ``s(p) = ||x[:, p]||_2``, divided by its mean over
   positions (all-zero maps give zero saliency).
2. Mask ``m`` (1 = take ``b``): the exact minimiser, by one binary s-t graph cut (PyMaxflow), of
   ``sum_p m_p (s_a(p) + rho ||p - c||^2 / (H W) + beta) + gamma * #{4-neighbour pairs with m_p != m_q}``.
   ``s_a`` makes the mask avoid ``a``'s salient cells; ``gamma`` is the smoothness term; the prior
   ``rho ||p - c||^2 / (H W)`` around a random centre ``c`` (drawn from the generator) breaks
   ties on flat saliency and makes the mask a compact blob there; ``beta`` is a per-sample offset found by
   bisection (the cut area is monotone in ``beta``) so that the area is the one nearest ``(1 - lam) H W``.
   The whole batch is one graph (samples unconnected), so each bisection step is a single max-flow.
3. Transport: ``b``'s cells are placed onto the mask's cells by optimal assignment
   (``scipy.optimize.linear_sum_assignment``), cost ``-s_b(q) + xi * |p - q|_1 / (H + W - 2)``: ``b``'s most
   salient cells fill the mask, preferring short moves. ``a`` stays in place.

Measured on this 2-core machine, batch 64, 16-32 channels: the mask area is within about one cell of the
target on average (no bias), and a batch costs about 7 ms on 4 x 4 maps and 20 ms on 8 x 8 maps.

How this differs from the original PuzzleMix (Kim, Choo and Song, ICML 2020):

- it mixes cached feature maps, and a cell is one map position, not an image block of random size;
- two inputs with a single mixing ratio: no multi-label mask over more than two labels, no search over the
  mixing ratio, and the label stays hard (label i), not lam-weighted;
- the mask comes from one binary graph cut plus an area bisection, not PuzzleMix's alternating
  optimisation of a multi-label mask with a label-smoothness prior and a mixing-ratio term; the area is
  controlled explicitly instead;
- only ``b`` is transported, by a hard assignment of whole cells (a permutation), not a transport plan
  with a saliency-and-distance cost on both inputs; there is no pixel-level transport, no adversarial
  perturbation, and no gradient saliency: saliency is the map's activation norm (no backward pass);
- the random centre prior is ours (PuzzleMix adds no location prior).

With a frozen trunk and a pooled linear head the layout of the last map is invisible to the head (pooling
forgets positions), so ``cutmix`` and ``puzzlemix`` differ from ``feature`` only through which cells are
mixed; they matter in top-block mode (docs/method.md, Top-block mode).

Decided here (issue 14): this module is the one home of the variant names (:data:`VARIANTS`,
:data:`MAP_VARIANTS`, :func:`needs_maps`), which the torch-free ``config`` and ``space`` read; so torch is
imported inside the functions that mix tensors, never at module level.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from .errors import ConfigError, DataError

if TYPE_CHECKING:
    import torch

__all__ = ["VARIANTS", "needs_maps", "mix", "targets"]

VARIANTS = ("feature", "feature_soft", "cutmix", "puzzlemix")
MAP_VARIANTS = ("cutmix", "puzzlemix")  # variants that mix cached spatial maps (B, C, H, W)

# PuzzleMix energy (saliency is normalised to mean 1 per map, so these are in units of mean saliency).
PUZZLE_SMOOTHNESS = 0.25  # gamma: cost per 4-neighbour pair with different mask values
PUZZLE_CENTRE_PRIOR = 4.0  # rho: weight of the squared distance (in cells) to a random centre, over H W
PUZZLE_BISECTION_STEPS = 14  # max-flow solves per batch to match the area
PUZZLE_MOVE_COST = 0.1  # xi: assignment cost of the longest L1 move, (H + W - 2) cells


def _check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise ConfigError(f"Unknown mixup variant {variant!r}. Available: {', '.join(VARIANTS)}.")


def needs_maps(variant: str) -> bool:
    """True when ``variant`` mixes cached spatial maps (B, C, H, W) rather than pooled features (B, d)."""
    _check_variant(variant)
    return variant in MAP_VARIANTS


def _uniform(size: int, generator: torch.Generator) -> torch.Tensor:
    """(size,) float64 U[0, 1) on the generator's device."""
    import torch

    return torch.rand(size, generator=generator, device=generator.device, dtype=torch.float64)


def mix(
    variant: str, a: torch.Tensor, b: torch.Tensor, lam: torch.Tensor, *, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mix ``a`` (class i) with its partner ``b`` (class j).

    Args:
        variant: one of :data:`VARIANTS`.
        a, b: same shape; (B, d) features for ``feature``/``feature_soft`` (any (B, ...) works), (B, C, H, W)
            cached maps for ``cutmix``/``puzzlemix``.
        lam: (B,) mixing weights in [0, 1], the weight of ``a`` (the engine draws U(lambda_min, 1)).
        generator: the engine's ``torch.Generator``, the only randomness used (cutmix box, puzzlemix centre).

    Returns:
        (mixed, lam_eff): ``mixed`` has ``a``'s shape, dtype and device; ``lam_eff`` (B,) is the actual
        fraction of ``a`` in each mixture (``lam`` itself for feature variants), dtype of ``lam``.
    """
    import torch

    _check_variant(variant)
    if a.shape != b.shape:
        raise DataError(f"mix needs a and b of the same shape, but got {tuple(a.shape)} and {tuple(b.shape)}.")
    if a.ndim < 2:
        raise DataError(f"mix needs a batch (B, ...) of at least 2 dimensions, but got shape {tuple(a.shape)}.")
    if lam.shape != (a.shape[0],):
        raise DataError(f"lam must have shape ({a.shape[0]},) (one weight per pair), but got {tuple(lam.shape)}.")
    if variant in MAP_VARIANTS:
        if a.ndim != 4:
            raise DataError(
                f"{variant} needs spatial maps (B, C, H, W), but got shape {tuple(a.shape)}: "
                "build features with keep_maps=True."
            )
        if variant == "cutmix":
            from_b = _cutmix_mask(a.shape, lam, generator).to(a.device)
            mixed = torch.where(from_b[:, None], b, a)
        else:
            mixed, from_b = _puzzlemix(a, b, lam, generator)
        lam_eff = 1.0 - from_b.flatten(1).to(torch.float64).mean(dim=1)
        return mixed, lam_eff.to(device=lam.device, dtype=lam.dtype)
    weight = lam.to(device=a.device, dtype=a.dtype).reshape((-1,) + (1,) * (a.ndim - 1))
    return weight * a + (1.0 - weight) * b, lam


def targets(
    variant: str, i: torch.Tensor, j: torch.Tensor, lam_eff: torch.Tensor, n_classes: int
) -> torch.Tensor:
    """Training targets (B, K), each row summing to 1.

    Hard one-hot of ``i`` for ``feature``, ``cutmix`` and ``puzzlemix``; ``lam_eff e_i + (1 - lam_eff) e_j``
    for ``feature_soft``. ``i``, ``j``: (B,) integer class indices; ``lam_eff``: (B,) from :func:`mix`.
    Dtype of ``lam_eff``, device of ``i``.
    """
    import torch

    _check_variant(variant)
    if i.shape != j.shape or i.ndim != 1 or lam_eff.shape != i.shape:
        raise DataError(
            f"targets needs i, j and lam_eff of the same shape (B,), but got {tuple(i.shape)}, "
            f"{tuple(j.shape)} and {tuple(lam_eff.shape)}."
        )
    dtype = lam_eff.dtype if lam_eff.is_floating_point() else torch.float32
    out = torch.zeros((i.shape[0], n_classes), dtype=dtype, device=i.device)
    if variant != "feature_soft":
        return out.scatter_(1, i[:, None].long(), 1.0)
    weight = lam_eff.to(device=i.device, dtype=dtype)[:, None]
    out.scatter_add_(1, i[:, None].long(), weight)
    return out.scatter_add_(1, j[:, None].long(), 1.0 - weight)


# --------------------------------------------------------------------------------------------------
# CutMix


def _box_table(height: int, width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Achievable box areas (sorted, starting at 0) with the most map-shaped (h, w) for each."""
    best: dict[int, tuple[float, int, int]] = {0: (0.0, 0, 0)}
    aspect = math.log(height / width)
    for h in range(1, height + 1):
        for w in range(1, width + 1):
            distortion = abs(math.log(h / w) - aspect)
            if h * w not in best or distortion < best[h * w][0]:
                best[h * w] = (distortion, h, w)
    areas = sorted(best)
    return (
        np.array(areas, dtype=np.float64),
        np.array([best[area][1] for area in areas]),
        np.array([best[area][2] for area in areas]),
    )


def _cutmix_mask(shape: torch.Size, lam: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """(B, H, W) bool on the generator's device: True where the position is taken from ``b``."""
    import torch

    batch, _, height, width = shape
    device = generator.device
    areas, heights, widths = (torch.as_tensor(t, device=device) for t in _box_table(height, width))
    target = (1.0 - lam.to(device=device, dtype=torch.float64)).clamp(0.0, 1.0) * (height * width)
    upper = torch.searchsorted(areas, target).clamp(max=len(areas) - 1)  # first area >= target
    lower = (upper - 1).clamp(min=0)
    span = areas[upper] - areas[lower]
    p_upper = torch.where(span > 0, (target - areas[lower]) / span.clamp(min=1e-12), torch.ones_like(span))
    choice = torch.where(_uniform(batch, generator) < p_upper, upper, lower)
    box_h, box_w = heights[choice], widths[choice]
    top = (_uniform(batch, generator) * (height - box_h + 1)).floor().long()
    left = (_uniform(batch, generator) * (width - box_w + 1)).floor().long()
    rows = torch.arange(height, device=device)[None, :, None]
    cols = torch.arange(width, device=device)[None, None, :]
    in_rows = (rows >= top[:, None, None]) & (rows < (top + box_h)[:, None, None])
    in_cols = (cols >= left[:, None, None]) & (cols < (left + box_w)[:, None, None])
    return in_rows & in_cols


# --------------------------------------------------------------------------------------------------
# PuzzleMix


def _saliency(maps: torch.Tensor) -> np.ndarray:
    """(B, H, W) float64: channel-wise L2 norm, divided by its mean over positions (0 for a zero map)."""
    import torch

    norm = torch.linalg.vector_norm(maps.detach().to(torch.float64), dim=1).cpu().numpy()
    mean = norm.mean(axis=(1, 2), keepdims=True)
    return np.divide(norm, mean, out=np.zeros_like(norm), where=mean > 0)


def _graph_cut(unary: np.ndarray, smoothness: float) -> np.ndarray:
    """Exact minimiser of sum_p m_p unary_p + smoothness * #cut 4-neighbour pairs, per sample.

    ``unary`` (B, H, W); samples are independent planes of one graph. Returns (B, H, W) bool (m = 1).
    """
    import maxflow

    graph = maxflow.Graph[float]()
    nodes = graph.add_grid_nodes(unary.shape)
    structure = np.zeros((3, 3, 3))
    structure[1, 1, 2] = structure[1, 2, 1] = 1.0  # right and down neighbours, same sample only
    graph.add_grid_edges(nodes, weights=smoothness, structure=structure, symmetric=True)
    # A node on the sink side (m = 1) pays its source capacity; on the source side, its sink capacity.
    graph.add_grid_tedges(nodes, np.maximum(unary, 0.0), np.maximum(-unary, 0.0))
    graph.maxflow()
    return graph.get_grid_segments(nodes)


def _puzzle_mask(saliency_a: np.ndarray, target: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """(B, H, W) bool mask (True = from b) with area nearest ``target`` (B,) cells."""
    batch, height, width = saliency_a.shape
    rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    distance2 = (
        (rows[None] - centres[:, 0, None, None]) ** 2 + (cols[None] - centres[:, 1, None, None]) ** 2
    ) / (height * width)
    base = saliency_a + PUZZLE_CENTRE_PRIOR * distance2  # (B, H, W), cost of taking b at each cell
    # beta <= low: every cell is cheaper as b (all ones); beta >= high: all zeros.
    low = -base.max(axis=(1, 2)) - 1.0
    high = -base.min(axis=(1, 2)) + 1.0
    best = np.zeros_like(base, dtype=bool)  # the all-zeros mask (area 0), what beta = high gives
    best_error = np.abs(target)
    for _ in range(PUZZLE_BISECTION_STEPS):
        beta = 0.5 * (low + high)
        mask = _graph_cut(base + beta[:, None, None], PUZZLE_SMOOTHNESS)
        area = mask.sum(axis=(1, 2))
        error = np.abs(area - target)
        better = error < best_error
        best[better] = mask[better]
        best_error = np.where(better, error, best_error)
        too_big = area > target  # raise beta to shrink the area
        low = np.where(too_big, beta, low)
        high = np.where(too_big, high, beta)
    return best


def _puzzlemix(
    a: torch.Tensor, b: torch.Tensor, lam: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixed maps (B, C, H, W) and the mask (B, H, W) bool on a's device (True = cell from b)."""
    import torch
    from scipy.optimize import linear_sum_assignment

    batch, channels, height, width = a.shape
    n_cells = height * width
    centres = torch.stack([_uniform(batch, generator) * height, _uniform(batch, generator) * width], dim=1)
    centres = centres.cpu().numpy() - 0.5  # continuous centre in cell coordinates
    target = (1.0 - lam.detach().to(torch.float64).cpu().numpy()).clip(0.0, 1.0) * n_cells
    mask = _puzzle_mask(_saliency(a), target, centres)

    saliency_b = _saliency(b).reshape(batch, n_cells)
    rows, cols = np.divmod(np.arange(n_cells), width)
    move = np.abs(rows[:, None] - rows[None, :]) + np.abs(cols[:, None] - cols[None, :])
    move_cost = PUZZLE_MOVE_COST * move / max(height + width - 2, 1)  # (cells, cells), destination x source
    source = np.tile(np.arange(n_cells), (batch, 1))  # (B, cells): which cell of b lands at each position
    flat_mask = mask.reshape(batch, n_cells)
    for sample in range(batch):
        destinations = np.flatnonzero(flat_mask[sample])
        if destinations.size == 0:
            continue
        cost = move_cost[destinations] - saliency_b[sample][None, :]
        dest_rows, chosen = linear_sum_assignment(cost)
        source[sample, destinations[dest_rows]] = chosen

    index = torch.as_tensor(source, device=b.device)[:, None, :].expand(-1, channels, -1)
    moved_b = b.reshape(batch, channels, n_cells).gather(2, index).reshape(b.shape)
    from_b = torch.as_tensor(mask, device=a.device)
    return torch.where(from_b[:, None], moved_b, a), from_b
