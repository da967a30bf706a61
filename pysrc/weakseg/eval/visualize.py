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


def _legend(names: list[tuple[int, str]], width: int) -> np.ndarray:
    """A white strip (rows of 16 px) with a colour swatch and the name of each (class id, name)."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    cells = [(i, n, 22 + int(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(n, font=font)) + 12)
             for i, n in names]
    rows, x = [[]], 4
    for cell in cells:
        if x + cell[2] > width and rows[-1]:
            rows.append([])
            x = 4
        rows[-1].append(cell)
        x += cell[2]
    img = Image.new("RGB", (width, 16 * len(rows) + 4), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    for r, row in enumerate(rows):
        x, y = 4, 4 + 16 * r
        for i, n, w in row:
            draw.rectangle([x, y, x + 12, y + 12], fill=tuple(int(v) for v in _PAL[i % 256]), outline=(0, 0, 0))
            draw.text((x + 18, y), n, fill=(0, 0, 0), font=font)
            x += w
    return np.asarray(img, np.float32)


def overlay_panel(image: torch.Tensor, target: torch.Tensor | None, pred: torch.Tensor, alpha: float = 0.6,
                  class_names: list[str] | None = None, min_size: int = 256) -> np.ndarray:
    """image (3, H, W) uint8 | ground truth | prediction, the label maps blended over the image; panels
    smaller than ``min_size`` are enlarged by an integer factor (nearest, so label edges stay exact), and
    with ``class_names`` a legend of the colours of the classes shown (ignore drawn white) is added below."""
    if min_size < 1:
        raise ValueError(f"min_size: expected an int >= 1, got {min_size!r}")
    img = image.permute(1, 2, 0).cpu().numpy().astype(np.float32)
    labels = ([target] if target is not None else []) + [pred]
    labels = [lab.cpu().numpy() if isinstance(lab, torch.Tensor) else np.asarray(lab) for lab in labels]
    f = max(1, -(-min_size // max(1, min(img.shape[:2]))))
    if f > 1:
        img = img.repeat(f, 0).repeat(f, 1)
        labels = [lab.repeat(f, 0).repeat(f, 1) for lab in labels]
    panels = [img]
    for lab in labels:
        col = colorize(lab).astype(np.float32)
        panels.append(alpha * col + (1 - alpha) * img)
    gap = np.full((img.shape[0], 4, 3), 255, np.float32)
    out = panels[0]
    for p in panels[1:]:
        out = np.concatenate([out, gap, p], axis=1)
    if class_names is not None:
        shown = sorted({int(v) for lab in labels for v in np.unique(lab)})
        entries = [(i, class_names[i] if 0 <= i < len(class_names) else ("ignore" if i == 255 else str(i)))
                   for i in shown]
        out = np.concatenate([out, _legend(entries, out.shape[1])], axis=0)
    return out.round().clip(0, 255).astype(np.uint8)
