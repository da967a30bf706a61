"""Visual Correlation Enhancement (docs/specs/diclip.md §2): Stable Diffusion self-attention -> the
Attention Clustering Refinement (ACR) -> an additive bias for CLIP's surgery attention.

1. :func:`sd_pass`: one UNet call at the null prompt and t = 101 on the image's VAE posterior mean,
   capturing q and k (after the head split) of the VCE layer (``up_blocks.1.attentions.2...attn1``,
   10x10 at 320 px) and of the walk layer (``up_blocks.3.attentions.1...attn1``, 40x40), selected heads.
2. :func:`upsample_tokens`: the VCE layer's q, k resampled bilinearly onto CLIP's patch grid.
3. :func:`sd_affinity`: logits q kᵀ (no scale, no softmax), divided by the column max (+1e-5),
   entries < threshold set to 0, rows normalised; heads chained ``A = Â₁ @ Â₂`` (the code) or averaged
   (``head_mode="mean"``, the paper).
4. :func:`acr`: ``kl_kmeans`` on the columns of A from grid seeds ({0, 6, 12, 18}² on 20x20 for 9
   requested clusters), then every row replaced by the mean of the rows of its cluster. One pass is
   the code's result (its 3 iterations are idempotent); ``recluster=True`` re-clusters the refined
   matrix before every further pass (the paper's recursive refinement).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from weakseg.methods.common import grid_seeds

__all__ = ["SDAttention", "sd_pass", "upsample_tokens", "sd_affinity", "sd_affinity_reference", "cluster_mean_rows",
           "acr", "acr_reference", "acr_seeds"]


@dataclass
class SDAttention:
    """What one SD pass gives DiCLIP: q, k of the VCE layer and of the walk layer, each
    (B, heads_sel, P, d) with its (h, w) grid and softmax scale."""

    vce_q: torch.Tensor
    vce_k: torch.Tensor
    vce_grid: tuple[int, int]
    walk_q: torch.Tensor
    walk_k: torch.Tensor
    walk_grid: tuple[int, int]
    walk_scale: float


@torch.no_grad()
def sd_pass(sd, images: torch.Tensor, *, vce_layer: str, vce_heads, walk_layer: str, walk_heads, t: int = 101,
            prompt: str = "", generator: torch.Generator | None = None) -> SDAttention:
    """images: RGB uint8 (B, 3, S, S) already at the SD input size (S a multiple of the VAE factor).
    VAE posterior mean (DiCLIP's ``latent_dist.mean``), fresh Gaussian noise from ``generator``, one UNet
    call at ``t`` with the embedding of ``prompt`` (no classifier-free guidance)."""
    from weakseg.backbones.attention import LayerCapture

    S = images.shape[-1]
    z = sd.encode_images(images, size=(images.shape[-2], S), sample=False, resample="nearest")
    noise = torch.randn(z.shape, generator=generator, dtype=torch.float32).to(z)
    zt, _ = sd.add_noise(z, int(t), noise)
    embeds, _ = sd.encode_prompt([prompt])
    vh, wh = tuple(int(h) for h in vce_heads), tuple(int(h) for h in walk_heads)
    if vce_layer == walk_layer:
        heads = tuple(sorted(set(vh) | set(wh)))
        specs = [LayerCapture(vce_layer, store="qk", heads=heads)]
    else:
        specs = [LayerCapture(vce_layer, store="qk", heads=vh), LayerCapture(walk_layer, store="qk", heads=wh)]
    _, store = sd.unet(zt, int(t), embeds, capture=specs)

    def pick(layer, want):
        q, k = store.qk(layer)
        have = specs[0].heads if vce_layer == walk_layer else want
        idx = [have.index(h) for h in want]
        return q[:, idx].float(), k[:, idx].float()

    vq, vk = pick(vce_layer, vh)
    wq, wk = pick(walk_layer, wh)
    return SDAttention(vq, vk, store.grid(vce_layer), wq, wk, store.grid(walk_layer), float(store.scale(walk_layer)))


def upsample_tokens(x: torch.Tensor, grid: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """(B, H, gh·gw, d) tokens on ``grid`` -> (B, H, h·w, d) bilinearly resampled to ``size``
    (align_corners=False); unchanged when the grids agree."""
    B, H, P, d = x.shape
    gh, gw = grid
    if gh * gw != P:
        raise ValueError(f"upsample_tokens: {P} tokens do not fill a {gh}x{gw} grid")
    if (gh, gw) == tuple(size):
        return x
    y = x.reshape(B * H, gh, gw, d).permute(0, 3, 1, 2).float()
    y = F.interpolate(y, size=tuple(size), mode="bilinear", align_corners=False)
    return y.permute(0, 2, 3, 1).reshape(B, H, size[0] * size[1], d)


def _row_normalise(a: torch.Tensor) -> torch.Tensor:
    s = a.sum(dim=-1, keepdim=True)
    return torch.where(s != 0, a / torch.where(s != 0, s, torch.ones_like(s)), torch.zeros_like(a))


def sd_affinity(q: torch.Tensor, k: torch.Tensor, threshold: float = 0.2, head_mode: str = "chain") -> torch.Tensor:
    """§2b steps 1-2 on q, k (B, H, P, d) already on CLIP's grid -> A (B, P, P) float32.

    Per head: L = q kᵀ; Â = L / (colmax(L) + 1e-5) (max over the queries); Â[Â < threshold] = 0; rows
    normalised (a row left empty stays 0). ``head_mode="chain"``: Â₁ @ Â₂ @ ... in head order (the
    code, heads 1 and 2); ``"mean"``: the head average (the paper)."""
    if head_mode not in ("chain", "mean"):
        raise ValueError(f"sd_affinity: head_mode must be 'chain' or 'mean', got {head_mode!r}")
    if q.dim() != 4 or q.shape != k.shape or q.shape[1] < 1:
        raise ValueError(f"sd_affinity: expected q and k of one shape (B, H >= 1, P, d), got {tuple(q.shape)} and "
                         f"{tuple(k.shape)}")
    logits = q.float() @ k.float().transpose(-1, -2)
    a = logits / (logits.amax(dim=-2, keepdim=True) + 1e-5)
    a = torch.where(a < threshold, torch.zeros_like(a), a)
    a = _row_normalise(a)
    if head_mode == "mean":
        return a.mean(dim=1)
    out = a[:, 0]
    for h in range(1, a.shape[1]):
        out = out @ a[:, h]
    return out


def sd_affinity_reference(q: torch.Tensor, k: torch.Tensor, threshold: float = 0.2, head_mode: str = "chain"):
    """Loop form of :func:`sd_affinity` in float64 (test oracle)."""
    B, H, P, _ = q.shape
    out = torch.zeros(B, P, P, dtype=torch.float64)
    for b in range(B):
        mats = []
        for h in range(H):
            L = q[b, h].double() @ k[b, h].double().T
            A = L / (L.max(dim=0).values[None, :] + 1e-5)
            A[A < threshold] = 0
            for i in range(P):
                s = A[i].sum()
                A[i] = A[i] / s if s != 0 else 0
            mats.append(A)
        if head_mode == "mean":
            out[b] = sum(mats) / H
        else:
            m = mats[0]
            for x in mats[1:]:
                m = m @ x
            out[b] = m
    return out.float()


def acr_seeds(h: int, w: int, clusters: int = 9, exact: bool = False, device=None) -> torch.Tensor:
    """Seed tokens of the ACR k-means on an h x w grid: the code's grid (``arange(0, side, side // sqrt(n))``
    per axis: 16 seeds for n = 9 on 20x20), or with ``exact`` a centred grid of exactly round(sqrt(n))²
    seeds (the paper's "9 groups")."""
    if not exact:
        return grid_seeds(h, w, clusters, device=device)
    import math

    r = max(1, round(math.sqrt(clusters)))
    rows = ((torch.arange(r) + 0.5) * h / r).long().clamp_max(h - 1)
    cols = ((torch.arange(r) + 0.5) * w / r).long().clamp_max(w - 1)
    return (rows[:, None] * w + cols[None, :]).flatten().to(device)


def cluster_mean_rows(a: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B, P, Q) rows, (B, P) cluster labels -> every row replaced by the mean of the rows of its cluster
    (``(C @ A) / rowsum(C)`` with C[i, j] = [label_i = label_j], in O(P·Q))."""
    B, P, Q = a.shape
    K = int(labels.max()) + 1 if labels.numel() else 0
    sums = torch.zeros(B, K, Q, dtype=a.dtype, device=a.device)
    sums.scatter_add_(1, labels[..., None].expand(-1, -1, Q), a)
    ones = torch.ones_like(labels, dtype=a.dtype)
    counts = torch.zeros(B, K, dtype=a.dtype, device=a.device).scatter_add_(1, labels, ones)
    means = sums / counts.clamp_min(1)[..., None]
    return torch.gather(means, 1, labels[..., None].expand(-1, -1, Q))


def _cluster(a: torch.Tensor, seeds: torch.Tensor, kmeans_iterations: int) -> torch.Tensor:
    from weakseg.ops import kl_kmeans

    cols = a.transpose(1, 2).contiguous()  # a token's feature is its column of A
    cols = torch.where(cols == 0, torch.full_like(cols, 1e-6), cols)
    labels, _ = kl_kmeans(cols, seeds.to(a.device), int(kmeans_iterations))
    return labels


def acr(a: torch.Tensor, grid: tuple[int, int], clusters: int = 9, kmeans_iterations: int = 5, iterations: int = 3,
        recluster: bool = False, exact_seeds: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention Clustering Refinement of A (B, P, P) on a ``grid`` of P tokens -> (A_ref (B, P, P),
    labels (B, P)). ``iterations`` refinement passes (>= 1), re-clustering before each further pass when
    ``recluster``."""
    if a.dim() != 3 or a.shape[1] != a.shape[2] or a.shape[1] != grid[0] * grid[1]:
        raise ValueError(f"acr: expected A (B, P, P) with P = {grid[0]}x{grid[1]}, got {tuple(a.shape)}")
    if iterations < 1:
        raise ValueError(f"acr: iterations must be >= 1, got {iterations}")
    seeds = acr_seeds(grid[0], grid[1], clusters, exact_seeds, device=a.device)
    labels = _cluster(a, seeds, kmeans_iterations)
    out = cluster_mean_rows(a.float(), labels)
    for _ in range(iterations - 1):
        if recluster:
            labels = _cluster(out, seeds, kmeans_iterations)
        out = cluster_mean_rows(out, labels)
    return out, labels


def acr_reference(a: torch.Tensor, labels: torch.Tensor, iterations: int = 3) -> torch.Tensor:
    """The code's refinement given the cluster labels: C[i, j] = [l_i = l_j]; ``iterations`` times
    A <- (C @ A) / rowsum(C) (float64; test oracle)."""
    out = []
    for b in range(a.shape[0]):
        C = (labels[b][:, None] == labels[b][None, :]).double()
        A = a[b].double()
        for _ in range(iterations):
            A = (C @ A) / C.sum(1, keepdim=True)
        out.append(A)
    return torch.stack(out).float()
