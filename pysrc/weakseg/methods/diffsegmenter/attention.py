"""DiffSegmenter's attention maths: the fusion of the cross-attention maps over resolutions
(:func:`fuse_cross_attention`) and their propagation by the mean self-attention, without forming a P x P
map (:func:`propagate_fused`) or from the captured mean (:func:`propagate_reference`).
docs/specs/diffsegmenter_iseg.md (prefix DS).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from weakseg.methods.common import minmax_per_class, resize_maps

__all__ = ["fuse_cross_attention", "propagate_fused", "propagate_reference"]


def fuse_cross_attention(cross: Sequence[torch.Tensor], tokens: Sequence[Sequence[int]],
                         weights: Sequence[float], latent_hw: tuple[int, int]) -> torch.Tensor:
    """DS's cross-attention fusion. ``cross``: per resolution, coarsest first, (N, r_h, r_w, T) or
    (N, r_h*r_w, T) head/layer means with the grid given by ``latent_hw`` halved; ``tokens``: per item the
    token positions to average. Each resolution's token map is bilinearly upsampled (align_corners=False)
    to ``latent_hw``, min-max normalised per item, weighted and summed. Returns (N, h, w) float32."""
    if len(cross) != len(weights):
        raise ValueError(f"fuse_cross_attention: {len(weights)} weights (cross_weights) for {len(cross)} "
                         f"cross-attention resolutions; give one weight per resolution, coarsest first")
    h, w = latent_hw
    N = cross[0].shape[0]
    if len(tokens) != N:
        raise ValueError(f"fuse_cross_attention: {len(tokens)} token lists for {N} items")
    out = torch.zeros(N, h, w, dtype=torch.float32, device=cross[0].device)
    for maps, wt in zip(cross, weights):
        if maps.dim() == 3:
            P = maps.shape[1]
            rh, rw = h, w
            while rh * rw > P:
                rh, rw = (rh + 1) // 2, (rw + 1) // 2
            maps = maps.reshape(N, rh, rw, maps.shape[-1])
        sel = torch.stack([maps[i, :, :, list(t)].float().mean(-1) for i, t in enumerate(tokens)])  # (N, rh, rw)
        up = resize_maps(sel[:, None], (h, w))
        out += float(wt) * minmax_per_class(up)[:, 0]
    return out


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q kᵀ/√d) v with SDPA; on CUDA v is zero-padded to the head width so the fused
    (flash / memory-efficient) kernels apply."""
    width = v.shape[-1]
    if q.is_cuda and width != q.shape[-1]:
        v = F.pad(v, (0, q.shape[-1] - width))
    return F.scaled_dot_product_attention(q, k, v.to(q.dtype))[..., :width]


def propagate_fused(qk: Sequence[tuple[torch.Tensor, torch.Tensor]], x: torch.Tensor) -> torch.Tensor:
    """``mean over layers l and heads h of softmax(Q_lh K_lhᵀ/√d) · x`` without forming any P x P map.
    ``qk``: per layer (q, k), each (N, H_l, P, d_l); ``x``: (N, P) or (N, P, K). Returns float32 of
    ``x``'s shape. Every (layer, head) map counts once, as in the reference's mean over the 40 maps."""
    vec = x.dim() == 2
    v = (x[..., None] if vec else x).float()
    acc = torch.zeros_like(v)
    count = 0
    for q, k in qk:
        H = q.shape[1]
        out = _attend(q, k, v[:, None].expand(-1, H, -1, -1))
        acc += out.float().sum(1)
        count += H
    acc /= count
    return acc[..., 0] if vec else acc


def propagate_reference(attn: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The reference code's product: ``attn`` (N, P, P) the mean self-attention (rows = queries) times
    ``x`` (N, P) or (N, P, K)."""
    vec = x.dim() == 2
    out = torch.bmm(attn.float(), (x[..., None] if vec else x).float())
    return out[..., 0] if vec else out
