"""Colour label maps and write the image | ground truth | prediction panels of
the evaluation and the demo."""

from __future__ import annotations

import numpy as np
import torch

from weakseg.io import save_png  # noqa: F401  (re-exported: overlays are written with it)

__all__ = ["palette", "colorize", "overlay_panel", "save_png"]


def palette(n: int = 256) -> np.ndarray:
    """The usual segmentation palette (the VOC bit-interleaving scheme): (n, 3) uint8,
    class 0 black; index 255 (ignore) is drawn white."""
    pal = np.zeros((max(n, 256), 3), np.uint8)
    for i in range(pal.shape[0]):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal[i] = (r, g, b)
    pal[255] = (255, 255, 255)
    return pal


_PAL = palette()


def colorize(label: torch.Tensor | np.ndarray) -> np.ndarray:
    """(H, W) int labels -> (H, W, 3) uint8 colours (values >= 256 wrap)."""
    lab = label.cpu().numpy() if isinstance(label, torch.Tensor) else np.asarray(label)
    return _PAL[np.mod(lab.astype(np.int64), 256)]


def overlay_panel(image: torch.Tensor, target: torch.Tensor | None, pred: torch.Tensor, alpha: float = 0.6) -> np.ndarray:
    """image (3, H, W) uint8 | ground truth | prediction, the label maps blended over the image."""
    img = image.permute(1, 2, 0).cpu().numpy().astype(np.float32)
    panels = [img]
    for lab in ([target] if target is not None else []) + [pred]:
        col = colorize(lab).astype(np.float32)
        panels.append(alpha * col + (1 - alpha) * img)
    gap = np.full((img.shape[0], 4, 3), 255, np.float32)
    out = panels[0]
    for p in panels[1:]:
        out = np.concatenate([out, gap, p], axis=1)
    return out.round().clip(0, 255).astype(np.uint8)
