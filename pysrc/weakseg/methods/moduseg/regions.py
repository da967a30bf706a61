"""ModuSeg's regions and their vectors, shared by the bank build and inference.

Semantic Boundary Purification (:func:`purify_regions`, ``sbp``): ``weakseg.ops.erode_labels`` with a
3x3 square x 20 iterations (one 41x41 window; image borders erode nothing); a pixel keeps its class iff
its whole window agrees. Then one region per (image, class) present after erosion (background
included), all components merged; regions under ``min_area`` (300) pixels are dropped.

Soft-Masked Feature Aggregation (:func:`encode_regions`, SMFA): ONE backbone forward per image at
native resolution (padded bottom/right to the patch multiple, never resized); each region's mask,
zero-padded the same way, weights the patch tokens by its covered fraction of each patch
(``weakseg.ops.masked_area_pool``), the weighted mean is L2-normalised. ``pooling="hard"`` (ablation)
uses binary weights: the mask sampled at each patch's centre pixel (nearest). Inference encodes its
proposals the same way.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from weakseg.core import IGNORE_INDEX
from weakseg.methods.moduseg.config import POOLINGS

__all__ = ["encode_regions", "purify_regions"]


def encode_regions(features, masks: torch.Tensor, pooling: str = "soft") -> tuple[torch.Tensor, torch.Tensor]:
    """SMFA of M regions of one image: ``features`` a :class:`~weakseg.backbones.PatchFeatures` (B = 1),
    ``masks`` (M, H, W) bool at the image's resolution -> (vectors (M, D) float32 L2-normalised,
    weights (M,) = the summed patch weights; a region with weight < 1e-6 has no usable vector).

    soft: each mask is zero-padded like the image and every patch weighs its covered fraction
    (``masked_area_pool``); hard: binary weights, the padded mask at each patch's centre pixel."""
    from weakseg.ops import masked_area_pool

    if pooling not in POOLINGS:
        raise ValueError(f"pooling: expected one of {', '.join(POOLINGS)}, got {pooling!r}")
    tokens = features.tokens
    if tokens.shape[0] != 1:
        raise ValueError(f"features: expected the tokens of one image (B = 1), got B = {tokens.shape[0]}")
    if masks.dim() != 3 or tuple(masks.shape[-2:]) != tuple(features.image_size):
        raise ValueError(f"masks: expected (M, H, W) at the image size {tuple(features.image_size)}, "
                         f"got {tuple(masks.shape)}")
    M = masks.shape[0]
    D = tokens.shape[1]
    if M == 0:
        return tokens.new_zeros(0, D, dtype=torch.float32), tokens.new_zeros(0, dtype=torch.float32)
    top, left, bottom, right = features.padding
    m = masks.to(tokens.device, torch.bool)
    if top or left or bottom or right:
        m = F.pad(m, (left, right, top, bottom), value=False)
    if pooling == "hard":
        p = features.patch_size
        h, w = features.grid_size
        m = m[:, p // 2::p, p // 2::p][:, :h, :w]
    pooled, area = masked_area_pool(tokens.float(), m[None])
    vecs = F.normalize(pooled[0].float(), dim=1)
    return vecs, area[0].float()


def purify_regions(label_map: torch.Tensor, num_classes: int, *, sbp: bool = True, kernel: int = 3,
                   iterations: int = 20, min_area: int = 300, skip: Sequence[int] = (),
                   ignore_index: int = IGNORE_INDEX) -> tuple[list[int], torch.Tensor]:
    """Semantic Boundary Purification and region extraction of one pseudo label map (H, W) int.

    With ``sbp`` each present class's mask is eroded as the reference does (``cv2.erode``, a kernel x
    kernel square, ``iterations`` times; pixels outside the image count as foreground, so borders never
    erode: the same result as ``weakseg.ops.erode_labels`` with kernel x iterations); then one region per
    class present (all its pixels, components merged), classes in ``skip`` left out, regions under
    ``min_area`` pixels dropped. Only the classes present in the map are eroded (the reference erodes
    every class of the dataset). Returns (classes ascending, masks (R, H, W) bool)."""
    import cv2

    if label_map.dim() != 2:
        raise ValueError(f"label_map: expected an (H, W) class-id map, got shape {tuple(label_map.shape)}")
    lab = label_map.to(torch.int64).cpu()
    ig = num_classes + 1  # the ignore id while eroding (num_classes itself stays an invalid id)
    lab = torch.where(lab == ignore_index, ig, lab)
    lo, hi = (int(v) for v in torch.aminmax(lab)) if lab.numel() else (0, 0)
    hist = torch.bincount(lab.flatten(), minlength=ig + 1) if lo >= 0 and hi <= ig else None
    if hist is None or int(hist[num_classes]) > 0:
        bad = (lab < 0) | (lab == num_classes) | (lab > ig)
        vals = torch.unique(lab[bad])[:8].tolist()
        raise ValueError(f"label_map: class ids must lie in [0, {num_classes}) or be {ignore_index} (ignore), "
                         f"found {vals}")
    skip = set(int(s) for s in skip)
    present = [c for c in range(num_classes) if int(hist[c]) > 0 and c not in skip]
    # uint8 for cv2 when the ids fit, else int32 compares (the masks are uint8 either way)
    arr = lab.numpy().astype(np.uint8 if ig < 256 else np.int32)
    square = np.ones((kernel, kernel), np.uint8)
    classes, masks = [], []
    for c in present:
        m = (arr == c).astype(np.uint8)
        if sbp and iterations > 0:
            m = cv2.erode(m, square, iterations=iterations)
        if cv2.countNonZero(m) >= max(min_area, 1):
            classes.append(c)
            masks.append(torch.from_numpy(m))
    if not classes:
        return [], torch.zeros(0, *lab.shape, dtype=torch.bool, device=label_map.device)
    return classes, torch.stack(masks).bool().to(label_map.device)
