"""SynSeg's 5-view inference (docs/specs/synseg.md §5): the whole image and its 4 quadrants
(:func:`split_views`), and the fusion of their maps (:func:`stitch_views`). Host code also for the
exported single-view model.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

__all__ = ["split_views", "stitch_views"]


def split_views(image: torch.Tensor) -> tuple[list[torch.Tensor], list[tuple[int, int, int, int]]]:
    """(3, H, W) -> ([whole, top-left, top-right, bottom-left, bottom-right], the quadrants' (y0, y1, x0, x1))."""
    H, W = image.shape[-2:]
    if H < 2 or W < 2:
        raise ValueError(f"images: the 5-view inference needs images of at least 2x2 pixels, got {H}x{W} "
                         f"(use views=1)")
    hy, hx = H // 2, W // 2
    boxes = [(0, hy, 0, hx), (0, hy, hx, W), (hy, H, 0, hx), (hy, H, hx, W)]
    return [image] + [image[:, y0:y1, x0:x1] for y0, y1, x0, x1 in boxes], boxes


def stitch_views(probs: torch.Tensor, boxes: Sequence[tuple[int, int, int, int]], size: tuple[int, int],
                 fusion: str = "mean") -> torch.Tensor:
    """probs (5, C, S, S) of [whole, 4 quadrants] -> (C, H, W): the whole map upsampled, the quadrants
    resized into their boxes, fused by ``mean`` (½(global + local)) or ``max``."""
    H, W = size
    glob = F.interpolate(probs[:1], size=(H, W), mode="bilinear", align_corners=False)[0]
    local = torch.empty_like(glob)
    for q, (y0, y1, x0, x1) in enumerate(boxes, start=1):
        local[:, y0:y1, x0:x1] = F.interpolate(probs[q:q + 1], size=(y1 - y0, x1 - x0), mode="bilinear",
                                               align_corners=False)[0]
    return 0.5 * (glob + local) if fusion == "mean" else torch.maximum(glob, local)
