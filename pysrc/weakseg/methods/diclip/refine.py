"""CAM -> pseudo labels (docs/specs/diclip.md §4): CLIP-attention affinity refinement (CAA) with box
masks, the random walk on SD self-attention (``weakseg.ops.refine_propagate_qk``), PAR, and the
label rule (bg = 1 − max over the present classes, argmax, no ignore band).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from weakseg.core import is_int
from weakseg.methods.common import dilated_neighbours

__all__ = ["CAA_ATTENTION", "caa_attention", "caa_transition", "box_mask", "caa_refine", "sd_walk", "PAR", "walk_reference"]


CAA_ATTENTION = ("code", "surgery", "head-mean")


def caa_attention(attn: Sequence[torch.Tensor], layers: int = 6, mode: str = "code", surgery_layers: int = 0,
                  surgery_attn: Sequence[torch.Tensor] | None = None,
                  seg_attn: torch.Tensor | None = None) -> torch.Tensor:
    """The CAA affinity (B, P, P) over the patch tokens: the mean over the last ``layers`` blocks of the
    patch-patch attention of the original path, ``attn`` (per block (B, heads, 1+P, 1+P) probabilities).

    mode: how the last ``surgery_layers`` blocks (the surgery blocks) enter —
    ``"code"`` (the authors' code, clip_custom.py ``Attention.forward``): their original-path softmax
    summed over the heads (rows sum to the head count), the blocks before them head-averaged (what
    ``nn.MultiheadAttention`` returns); ``"surgery"``: the head-summed surgery matrix M of
    ``surgery_attn`` (VCE bias included; rows sum to 3·heads plus the bias); ``"head-mean"``: every
    block head-averaged (rows sum to 1).

    ``seg_attn`` (B, P, P), the head's affinity (the code's gating from iteration 4000): keep the
    blocks whose total Σ(seg_attn − attention) is at most the mean of those totals, average them, and
    multiply by ``seg_attn``."""
    if mode not in CAA_ATTENTION:
        raise ValueError(f"caa_attention: mode must be one of {', '.join(CAA_ATTENTION)}, got {mode!r}")
    L = len(attn)
    if not is_int(layers, 1):
        raise ValueError(f"caa_attention: layers must be an int >= 1, got {layers!r}")
    if not 0 <= surgery_layers <= L:
        raise ValueError(f"caa_attention: surgery_layers must lie in [0, {L}], got {surgery_layers!r}")
    if mode == "surgery" and (surgery_attn is None or len(surgery_attn) != surgery_layers):
        raise ValueError(f"caa_attention: mode='surgery' needs the {surgery_layers} surgery matrices (surgery_attn), "
                         f"got {None if surgery_attn is None else len(surgery_attn)}")
    first = L - surgery_layers
    mats = []
    for i in range(max(L - layers, 0), L):
        if i >= first and mode == "surgery":
            mats.append(surgery_attn[i - first][:, 1:, 1:].float())
            continue
        a = attn[i][:, :, 1:, 1:].float()  # the sum runs over a view: no copy of the (B, heads, P, P) block
        mats.append(a.sum(dim=1) if (i >= first and mode == "code") else a.mean(dim=1))
    if seg_attn is None:
        out = mats[0].clone()
        for m in mats[1:]:
            out += m
        return out / len(mats)
    stack = torch.stack(mats, dim=1)  # (B, L', P, P)
    seg = seg_attn.float()
    diff = (seg[:, None] - stack).flatten(2).sum(-1)  # (B, L')
    keep = (diff <= diff.mean(dim=1, keepdim=True)).float()[..., None, None]
    mean = (keep * stack).sum(1) / (keep.sum(1) + 1e-5)
    return mean * seg


def caa_transition(aff: torch.Tensor) -> torch.Tensor:
    """(P, P) affinity -> the CAA transition: 3 rounds of column- then row-normalisation, symmetrised,
    squared once."""
    t = aff.float()
    for _ in range(3):
        t = t / t.sum(dim=0, keepdim=True).clamp_min(1e-12)
        t = t / t.sum(dim=1, keepdim=True).clamp_min(1e-12)
    t = (t + t.T) / 2
    return t @ t


def box_mask(cam: np.ndarray | torch.Tensor, threshold: float) -> torch.Tensor:
    """WeCLIP's ``scoremap2bbox`` on one (h, w) CAM in [0, 1]: uint8 (cam·255), binary above
    int(threshold·max), every external-or-nested contour (cv2 RETR_TREE) -> its bounding box, the box's
    right/bottom edge clipped to w−1 / h−1 and used as an exclusive bound (the code's quirk). Returns the
    union of the boxes as an (h, w) float mask (all zero when there is no contour)."""
    import cv2

    arr = cam.detach().cpu().float().numpy() if isinstance(cam, torch.Tensor) else np.asarray(cam, np.float32)
    h, w = arr.shape
    img = (arr * 255).astype(np.uint8)
    _, thr = cv2.threshold(img, int(threshold * int(img.max())), 255, cv2.THRESH_BINARY)
    contours = cv2.findContours(thr, cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE)[-2]
    mask = torch.zeros(h, w)
    for c in contours:
        x, y, bw, bh = cv2.boundingRect(c)
        x1, y1 = min(x + bw, w - 1), min(y + bh, h - 1)
        mask[y:y1, x:x1] = 1
    return mask


def caa_refine(cams: torch.Tensor, aff: torch.Tensor, threshold: float) -> torch.Tensor:
    """CAA for one image: cams (K, h, w) in [0, 1] (the present classes), aff (P, P) with P = h·w.
    Per class: the transition with the columns outside the class's boxes zeroed, times the CAM —
    computed as T (m ⊙ cam) for all classes in one product rather than a masked copy of T per class."""
    K, h, w = cams.shape
    if aff.shape != (h * w, h * w):
        raise ValueError(f"caa_refine: affinity {tuple(aff.shape)} does not match the {h}x{w} CAM grid")
    if K == 0:
        return torch.zeros(0, h, w)
    t = caa_transition(aff)
    masks = torch.stack([box_mask(cams[c], threshold) for c in range(K)]).flatten(1).to(t.device)
    x = cams.flatten(1).float().to(t.device) * masks  # (K, P)
    return (x @ t.T).cpu().reshape(K, h, w)


def sd_walk(q: torch.Tensor, k: torch.Tensor, maps: torch.Tensor, steps: int, ent: float = 0.02,
            scale: float | None = None) -> torch.Tensor:
    """The random walk on SD self-attention: q, k (B, heads, P, d) of the walk layer, maps (B, P, K) on
    its grid. T = head mean of the softmax attention, /colmax, + ent·log10(e·T) on nonzeros, clamped,
    row-normalised; ``steps`` times C <- T C with per-class min/sum normalisation
    (``weakseg.ops.refine_propagate_qk``). Returns (B, P, K) float32."""
    from weakseg.ops import refine_propagate_qk

    if maps.shape[2] == 0:
        return maps.float()
    return refine_propagate_qk(q.float(), k.float(), maps.float().contiguous(), float(ent), int(steps), scale).float()


def walk_reference(q, k, maps, steps: int, ent: float = 0.02, scale: float | None = None) -> torch.Tensor:
    """The walk in the spec's words (float64; test oracle): T from the head-mean probabilities,
    result = norm(Tᵏ · cam)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    p = torch.softmax(q.double() @ k.double().transpose(-1, -2) * scale, dim=-1).mean(1)
    t = p / p.amax(dim=1, keepdim=True)
    t = torch.where(t > 0, t + ent * torch.log10(math.e * t), t).clamp_min(0)
    t = t / t.sum(-1, keepdim=True)
    c = maps.double()
    for _ in range(steps):
        c = t @ c
    c = c - c.amin(1, keepdim=True)
    return (c / c.sum(1, keepdim=True)).float()


class PAR(torch.nn.Module):
    """Pixel-adaptive refinement (WeCLIP / ToCo PAR): 8 neighbours of a 3x3 kernel at each dilation
    (replicate padding); affinity = softmax over the neighbours of the channel mean of
    −(|ΔI| / (std · 0.3))² plus 0.01 · softmax of the same on the neighbours' distances; ``iterations``
    propagation rounds of the masks (B, K, h, w), bilinearly resized (align_corners=True) to the image."""

    def __init__(self, dilations: Sequence[int] = (1, 2, 4, 8, 12, 24), iterations: int = 20, w1: float = 0.3,
                 w2: float = 0.01):
        super().__init__()
        self.dilations = [int(d) for d in dilations]
        self.iterations = int(iterations)
        self.w1, self.w2 = float(w1), float(w2)
        ker = torch.ones(1, 1, 8, 1, 1)
        for i in (0, 2, 5, 7):
            ker[0, 0, i] = math.sqrt(2)
        self.register_buffer("pos", torch.cat([ker * d for d in self.dilations], dim=2), persistent=False)

    def _neighbours(self, x: torch.Tensor) -> torch.Tensor:
        return dilated_neighbours(x, self.dilations)

    def forward(self, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """images: (B, 3, H, W) float (normalised); masks: (B, K, h, w). Returns (B, K, H, W)."""
        images = images.float()
        masks = F.interpolate(masks.float(), size=images.shape[-2:], mode="bilinear", align_corners=True)
        b, _, h, w = images.shape
        nb = self._neighbours(images)
        pos = self.pos.to(images).repeat(b, 1, 1, h, w)
        diff = (nb - images.unsqueeze(2)).abs()
        aff = -(diff / (nb.std(dim=2, keepdim=True) + 1e-8) / self.w1) ** 2
        aff = aff.mean(dim=1, keepdim=True)
        pos_aff = -(pos / (pos.std(dim=2, keepdim=True) + 1e-8) / self.w1) ** 2
        aff = F.softmax(aff, dim=2) + self.w2 * F.softmax(pos_aff, dim=2)
        for _ in range(self.iterations):
            masks = (self._neighbours(masks) * aff).sum(2)
        return masks
