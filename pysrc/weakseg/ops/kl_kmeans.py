"""``kl_kmeans``: k-means under the symmetric KL distance, seeded from given rows.

Contract (DESIGN.md, op 6; iSeg's cross-attention smoothing, DiCLIP's Attention
Clustering Refinement): x (B, N, D) floating, meant non-negative (per-pixel or
per-token distributions); seeds (S,) int64/int32 row indices into N, the same
for every batch element; iterations >= 1.

* Distance: d(a, b) = ½KL(a‖b) + ½KL(b‖a) = ½ Σ_d (a_d − b_d)(ln a_d − ln b_d),
  with both vectors first clamped at ``eps = 1e-5`` (so zeros and negative
  entries act as eps).
* Lloyd iterations: the anchors start as x[b, seeds]. Each iteration assigns
  every point to its nearest alive anchor (ties -> the smaller anchor index),
  then every alive anchor becomes the mean of its members' raw (unclamped)
  rows; an anchor without members dies and is dropped for all later
  iterations (so a duplicate seed, which loses every tie, dies at once).
* Outputs: labels (B, N) int64, the last assignment relabelled contiguously in
  increasing anchor order (labels of image b lie in [0, n_b), n_b = number of
  alive clusters); centroids (B, S, D) in the compute dtype: row j < n_b is
  cluster j's mean, rows >= n_b are zero.

Computation is in float32 (float64 when x is float64). With N == 0 the seeds
are not used (nor range-checked): labels (B, 0), zero centroids (B, S, D).

The compiled kernels use the expanded distance: argmin_c d(x, c) =
argmin_c Σ c~ ln c~ − x~·ln c~ − ln x~·c~, i.e. one GEMM of [x~, ln x~] with
[ln c~, c~]ᵀ plus a per-anchor constant; dead anchors are masked in place, so
the CUDA path never waits on the host inside the loop. That GEMM follows torch's
TF32 setting on CUDA (``torch.backends.cuda.matmul.allow_tf32``, off by
default); with TF32 on, near-equal assignments may flip.
"""

from __future__ import annotations

import torch

from weakseg.ops._common import check, has_library_op, run_op

__all__ = ["kl_kmeans", "kl_kmeans_reference", "KL_EPS"]

KL_EPS = 1e-5


def _check(x, seeds, iterations) -> None:
    op = "kl_kmeans"
    for name, t in (("x", x), ("seeds", seeds)):
        check(isinstance(t, torch.Tensor), op, f"expected {name} to be a tensor, got {type(t).__name__}", TypeError)
    check(x.dim() == 3, op, f"expected x of shape (B, N, D), got {tuple(x.shape)}")
    check(x.is_floating_point(), op, f"expected floating-point x, got {x.dtype}", TypeError)
    check(seeds.dim() == 1, op, f"expected seeds of shape (S,), got {tuple(seeds.shape)}")
    check(seeds.dtype in (torch.int64, torch.int32), op,
          f"expected seeds of dtype int64 or int32, got {seeds.dtype}", TypeError)
    check(x.device == seeds.device, op, f"expected x and seeds on the same device, got {x.device} and {seeds.device}")
    check(isinstance(iterations, int) and not isinstance(iterations, bool) and iterations >= 1, op,
          f"iterations must be an int >= 1, got {iterations!r}")
    N = x.shape[1]
    if N > 0:
        check(seeds.numel() > 0, op, f"seeds must not be empty when x has points (N={N})")
        lo, hi = int(seeds.min()), int(seeds.max())
        check(lo >= 0 and hi < N, op, f"seeds must lie in [0, N={N}), found values in [{lo}, {hi}]")


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def kl_kmeans_reference(x, seeds, iterations: int):
    """Pure-PyTorch KL k-means with direct (unexpanded) distances; same contract as :func:`kl_kmeans`."""
    _check(x, seeds, iterations)
    B, N, D = x.shape
    S = seeds.shape[0]
    cdt = _compute_dtype(x)
    labels = torch.zeros(B, N, dtype=torch.int64, device=x.device)
    centroids = torch.zeros(B, S, D, dtype=cdt, device=x.device)
    if N == 0:
        return labels, centroids
    xf = x.to(cdt)
    seeds = seeds.long()
    for b in range(B):
        pts = xf[b]
        pc = pts.clamp_min(KL_EPS)
        lp = pc.log()
        anchors = pts[seeds]  # the alive anchors, in increasing original order
        for _ in range(iterations):
            ac = anchors.clamp_min(KL_EPS)
            # (N, S_alive): ½ Σ_d (x_d − c_d)(ln x_d − ln c_d)
            dist = 0.5 * ((pc[:, None, :] - ac[None]) * (lp[:, None, :] - ac.log()[None])).sum(-1)
            assign = dist.argmin(1)  # the first minimum: ties go to the smaller anchor index
            counts = torch.bincount(assign, minlength=anchors.shape[0])
            sums = torch.zeros_like(anchors).index_add_(0, assign, pts)
            alive = counts > 0
            anchors = (sums / counts.clamp_min(1)[:, None].to(cdt))[alive]
            assign = (alive.cumsum(0) - 1)[assign]  # relabel over the surviving anchors
        labels[b] = assign
        centroids[b, : anchors.shape[0]] = anchors
    return labels, centroids


def kl_kmeans(x, seeds, iterations: int):
    """K-means of the rows of ``x`` (B, N, D) under the symmetric KL distance (eps = 1e-5),
    started from rows ``seeds`` -> (labels (B, N) int64, centroids (B, S, D))."""
    _check(x, seeds, iterations)
    return run_op("kl_kmeans", kl_kmeans_reference, x.device, x, seeds, int(iterations))


if has_library_op("kl_kmeans"):

    @torch.library.register_fake("weakseg::kl_kmeans")
    def _fake(x, seeds, iterations):
        B, N, D = x.shape
        S = seeds.shape[0]
        return (x.new_empty((B, N), dtype=torch.int64), x.new_empty((B, S, D), dtype=_compute_dtype(x)))
