"""``kl_kmeans``: k-means under the symmetric KL distance, seeded from given rows.

Contract (docs/design.md, op 6; iSeg's cross-attention smoothing, DiCLIP's Attention
Clustering Refinement): x (B, N, D) floating, meant non-negative (per-pixel or
per-token distributions); seeds (S,) int64/int32 row indices into N, the same
for every batch element; iterations >= 1.

* Distance, as the authors' ``kl_dis`` (DiCLIP model/featurecluster.py, iSeg
  util/attn.py) less its float16 cast: with x~ = max(x, 0) + eps and
  ``eps = 1e-5`` ADDED to every entry (not a clamp),
  d(a, b) = ½KL(a~‖b~) + ½KL(b~‖a~) = ½ Σ_d (a~_d − b~_d)(ln a~_d − ln b~_d).
  A negative entry counts as 0 (the authors' inputs are non-negative; this
  keeps the logarithm defined).
* Lloyd iterations: the anchors start as x[b, seeds]. Each iteration assigns
  every point to its nearest alive anchor (ties -> the smaller anchor index,
  as the authors' ``torch.min``), then every alive anchor becomes the mean of
  its members' raw rows; an anchor without members dies and is dropped for
  all later iterations (so a duplicate seed, which loses every tie, dies at
  once).
* Outputs: labels (B, N) int64, the last assignment relabelled contiguously in
  increasing anchor order (labels of image b lie in [0, n_b), n_b = number of
  alive clusters); centroids (B, S, D): row j < n_b is cluster j's mean, rows
  >= n_b are zero.

Precision: every backend computes in float64 whatever the input dtype (the
distances, the member sums and the means); centroids are returned in float32
(float64 for float64 input). So the compiled op and the reference agree on the
labels except at float64 near-ties.

With N == 0 the seeds are not used (nor range-checked): labels (B, 0), zero
centroids (B, S, D). With D == 0 every distance is 0: every point joins the
first seed's cluster (labels 0).

What the authors additionally do, outside this op (call sites follow it where
their config says so): ``kl_dis`` casts both sides to float16 before adding
the 1e-5 and evaluates the logarithms and sums in float16 (weakseg does not:
float16 rounds distances of ~1e-3 at 1e-6, far coarser than their gaps on
attention maps); their callers (iSeg ``DFC_KL.forward``, DiCLIP
``attn_kl_cluster``) first replace exact zeros of x by 1e-6 (so a zero enters
the distance as 1e-6 + 1e-5 and the means as 1e-6).

The compiled kernels use the expanded distance: argmin_c d(x, c) =
argmin_c Σ c~ ln c~ − x~·ln c~ − ln x~·c~, i.e. one float64 GEMM of
[x~, ln x~] with [ln c~, c~]ᵀ plus a per-anchor constant; dead anchors are
masked in place, so the CUDA path never waits on the host inside the loop.
The GEMM is float64 because the expanded form cancels: its terms are of the
size of Σ x~ ln x~ while the gaps between anchors can be 1e-6 of the distance
(iSeg's sum-normalised maps): float32 flips labels against the reference,
float64 agrees with it (figures: benchmarks/results/toyworld_training_notes.md).
"""

from __future__ import annotations

import torch

from weakseg.core import is_int
from weakseg.ops._common import check, has_library_op, has_values, run_op

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
    check(is_int(iterations, 1), op,
          f"iterations must be an int >= 1, got {iterations!r}")
    N = x.shape[1]
    if N > 0:
        check(seeds.numel() > 0, op, f"seeds must not be empty when x has points (N={N})")
        if has_values(seeds):  # the range of traced (fake) seeds is checked by the compiled op when it runs
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
    xf = x.to(torch.float64)
    seeds = seeds.long()
    for b in range(B):
        pts = xf[b]
        pc = pts.clamp_min(0) + KL_EPS
        lp = pc.log()
        anchors = pts[seeds]  # the alive anchors, in increasing original order
        for _ in range(iterations):
            ac = anchors.clamp_min(0) + KL_EPS
            # (N, S_alive): ½ Σ_d (x~_d − c~_d)(ln x~_d − ln c~_d)
            dist = 0.5 * ((pc[:, None, :] - ac[None]) * (lp[:, None, :] - ac.log()[None])).sum(-1)
            assign = dist.argmin(1)  # the first minimum: ties go to the smaller anchor index
            counts = torch.bincount(assign, minlength=anchors.shape[0])
            sums = torch.zeros_like(anchors).index_add_(0, assign, pts)
            alive = counts > 0
            anchors = (sums / counts.clamp_min(1)[:, None].to(sums.dtype))[alive]
            assign = (alive.cumsum(0) - 1)[assign]  # relabel over the surviving anchors
        labels[b] = assign
        centroids[b, : anchors.shape[0]] = anchors.to(cdt)
    return labels, centroids


def kl_kmeans(x, seeds, iterations: int):
    """K-means of the rows of ``x`` (B, N, D) under the symmetric KL distance (1e-5 added to every
    entry), started from rows ``seeds`` -> (labels (B, N) int64, centroids (B, S, D))."""
    _check(x, seeds, iterations)
    return run_op("kl_kmeans", kl_kmeans_reference, x.device, x, seeds, int(iterations))


if has_library_op("kl_kmeans"):

    @torch.library.register_fake("weakseg::kl_kmeans")
    def _fake(x, seeds, iterations):
        B, N, D = x.shape
        S = seeds.shape[0]
        return (x.new_empty((B, N), dtype=torch.int64), x.new_empty((B, S, D), dtype=_compute_dtype(x)))
