"""A transcription of iSeg's refinement (linsun449/iseg.code) in plain PyTorch — a test oracle for
weakseg's iSeg stages, not part of the package. Written from the semantics of the authors' code, not
copied from it.

Sources (read at the commits the stored copies carry):

* base/stable_difusion.py @4b0784c ``StableDiffusion.get_attention_map``: each hooked layer hands over
  its pre-softmax scores ``(bs*heads, P, T)``; they are reshaped to ``(bs, heads, hw, hw, T)``,
  soft-maxed over the last axis, concatenated per resolution over the layers (in the order the hooks
  fired, i.e. forward order) along the head axis, and permuted to ``(bs, heads, T, hw, hw)`` — the
  query pixel becomes the trailing grid, the key / token the third axis.
* util/attn.py @4b0784c ``kl_dis``: symmetric KL, both arguments cast to float16 and 1e-5 added.
* wsss/featurecluster.py @87debb0 ``DFC_KL``: seeds on a grid with stride ``fea_size // sqrt(n)``
  (rows and columns), exact zeros replaced by 1e-6, ``stage_num`` rounds of nearest anchor / mean of
  the members of each used anchor, final labels renumbered to 0..n-1.
* wsss/iSeg.py @87debb0 ``iSeg.process_cross_att`` (head subset or mean per resolution, each token map
  divided by its sum over the pixels, bilinear to 64x64, weights {16: 0.7, 32: 0.3}; the clustering
  replaces every pixel's 77-vector by the mean of its cluster through a one-hot "same cluster" matrix;
  per class the mean over its selected token columns) and the ERS branch of ``iSeg.get_att_map``
  (mean of self-attention heads [1, 2] at 64x64 transposed to rows = queries, divided by the column
  max, ``+ ent·log10(e·T)`` where T != 0, clamped at 0, row-normalised; the class maps minus their
  column min over their column sum, then ``iter`` times product / min / sum).

Changes, none of them semantic for float32 inputs: the 64 the code hard-codes (latent grid, fea_size of
``DFC_KL``) is the argument ``fea_size`` so the tests can run a reduced grid; the KL distance's dtype
is an argument (``kl_dtype``, default the code's float16) because weakseg evaluates it in float64 (a
documented departure, docs/methods.md); batch size 1 as in the code; no ``.cuda()`` and no half
precision (the code runs its UNet in fp16; the tests feed float32 attention).
"""

from __future__ import annotations

import math
from typing import Dict, List, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F


# ------------------------------------------------------------------ base/stable_difusion.py
def attention_maps_by_resolution(scores: Mapping[str, torch.Tensor]):
    """``get_attention_map``: ``scores`` layer name (ending in attn1 / attn2) -> pre-softmax scores
    (bs, heads, P, T), in hook order. Returns (cross, self) dicts resolution -> (bs, heads, T, hw, hw)
    (the probabilities, keys / tokens on axis 2, the query pixel on the grid)."""
    cross: Dict[int, List[torch.Tensor]] = {8: [], 16: [], 32: [], 64: []}
    selfs: Dict[int, List[torch.Tensor]] = {8: [], 16: [], 32: [], 64: []}
    for name, s in scores.items():
        bs, heads, p, t = s.shape
        side = int(math.sqrt(p))
        probs = s.reshape(bs, heads, side, side, t).softmax(-1)
        if name.endswith("attn2"):
            cross.setdefault(side, []).append(probs)
        elif name.endswith("attn1"):
            selfs.setdefault(side, []).append(probs)
    out = []
    for table in (cross, selfs):
        res = {}
        for side, items in table.items():
            if items:
                res[side] = torch.cat(items, dim=1).permute(0, 1, 4, 2, 3)
        out.append(res)
    return out[0], out[1]


# ------------------------------------------------------------------ util/attn.py
def kl_dis(anchor: torch.Tensor, attn: torch.Tensor, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """Symmetric KL between rows: anchor (.., n1, p), attn (.., n2, p) -> (.., n1, n2); both cast to
    ``dtype`` (the code: float16) and shifted by 1e-5 before the logs; half of each directed sum."""
    a = anchor.to(dtype) + 1e-5
    b = attn.to(dtype) + 1e-5
    a, b = a.unsqueeze(-2), b.unsqueeze(-3)
    log_ratio = a.log() - b.log()
    return 0.5 * (a * log_ratio).sum(-1) - 0.5 * (b * log_ratio).sum(-1)


# ------------------------------------------------------------------ wsss/featurecluster.py
def dfc_kl_seeds(number_cluster: int = 32, fea_size: int = 64) -> torch.Tensor:
    """``DFC_KL.__init__``'s grid: rows/cols ``arange(0, fea_size, fea_size // sqrt(n))`` (a float
    step, then long), row-major flattened."""
    step = fea_size // (number_cluster ** 0.5)
    g = torch.arange(0, fea_size, step).long()
    return (g[:, None] * fea_size + g[None, :]).flatten()


def dfc_kl(x_chw: torch.Tensor, number_cluster: int = 32, stage_num: int = 20, fea_size: int = 64,
           kl_dtype: torch.dtype = torch.float16):
    """``DFC_KL.forward`` on x (c, h, w) -> (cluster (hw,) int64 in 0..n-1, n)."""
    x = x_chw.flatten(-2, -1).T
    x = torch.where(x == 0, torch.full_like(x, 1e-6), x)
    anchors = x[dfc_kl_seeds(number_cluster, fea_size)]
    cluster = None
    for _ in range(stage_num):
        d = kl_dis(anchors, x, kl_dtype)  # (n_anchors, hw)
        cluster = d.min(dim=0).indices
        used = cluster.unique()
        anchors = torch.stack([x[cluster == u].mean(0) for u in used])
    used = cluster.unique()
    relabel = torch.empty(int(used.max()) + 1, dtype=torch.long)
    relabel[used] = torch.arange(len(used))
    return relabel[cluster], len(used)


# ------------------------------------------------------------------ wsss/iSeg.py
def process_cross_att(cross_maps: Mapping[int, torch.Tensor], token_sel_ids: Sequence[Sequence[int]],
                      index: Optional[Mapping[int, Sequence[int]]] = None, use_cluster: bool = True,
                      fea_size: int = 64, number_cluster: int = 32, stage_num: int = 20,
                      kl_dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """``iSeg.process_cross_att``: cross_maps resolution -> (1, heads, T, r, r) (from
    :func:`attention_maps_by_resolution`); ``index``: resolution -> head subset (None: all heads,
    ``att_mean``). Returns (1, hw, K) the per-class maps (rows = pixels)."""
    weight = {8: 0.0, 16: 0.7, 32: 0.3, 64: 0.0}
    parts = []
    for res, v in cross_maps.items():
        if res in (8, 64):
            continue
        v = v.mean(1) if index is None else v[:, list(index[res])].mean(1)  # (1, T, r, r)
        v = v / v.sum(dim=(-2, -1), keepdim=True)
        v = F.interpolate(v, size=(fea_size, fea_size), mode="bilinear", align_corners=False)
        parts.append(weight[res] * v)
    fused = torch.stack(parts).sum(0)[0]  # (T, side, side)
    flat = fused.flatten(-2, -1).T  # (hw, T)
    if use_cluster:
        cluster, n = dfc_kl(fused, number_cluster, stage_num, fea_size, kl_dtype)
        same = F.one_hot(cluster, n)[:, cluster].to(fused.dtype)  # (hw, hw): 1 where in the same cluster
        flat = (same @ flat) / same.sum(-1, keepdim=True)
    per_class = torch.stack([flat[:, list(sel)].mean(1) for sel in token_sel_ids], dim=1)
    return per_class[None]


def ers_propagate(cross_att: torch.Tensor, self_maps: torch.Tensor, heads: Sequence[int] = (1, 2),
                  ent: float = 0.015, iters: int = 10) -> torch.Tensor:
    """The ERS branch of ``iSeg.get_att_map`` up to the reshape: cross_att (1, hw, K) from
    :func:`process_cross_att`, self_maps (1, heads, hw_key, side, side) (``self_attention_maps[64]``).
    Returns (1, hw, K)."""
    c = cross_att.float()
    c = c - c.amin(dim=-2, keepdim=True)
    c = c / c.sum(dim=-2, keepdim=True)
    t = self_maps[:, list(heads)].mean(1).flatten(-2, -1).permute(0, 2, 1).float()  # rows = queries
    t = t / t.amax(dim=-2, keepdim=True)
    t = t + torch.where(t == 0, torch.zeros_like(t), ent * torch.log10(math.e * t))
    t = t.clamp(min=0)
    t = t / t.sum(dim=-1, keepdim=True)
    for _ in range(iters):
        c = torch.bmm(t, c)
        c = c - c.amin(dim=-2, keepdim=True)
        c = c / c.sum(dim=-2, keepdim=True)
    return c
