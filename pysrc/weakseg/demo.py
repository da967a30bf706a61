"""The demonstration job behind ``make demo`` until the toy world lands: a
miniature retrieval segmenter built from the four ops on generated scenes.

1. Generated scenes: textured shapes of 3 classes on a textured background, with
   their ground-truth label maps.
2. Semantic Boundary Purification of the training label maps (``erode_labels``,
   3x3 x 5), regions under 300 px dropped.
3. Soft-masked feature aggregation (``masked_area_pool``) of a fixed random-feature
   "backbone" on a 16 px patch grid: one bank vector per (scene, class).
4. Proposals on a held-out scene: connected colour regions, eroded by 1 px
   (``erode``) to drop mixed boundary pixels from the pooling.
5. ``knn_vote`` of every proposal against the bank, painted in ascending
   confidence; mIoU against the ground truth.

Everything lands in the output directory: PNGs, the bank (safetensors) and
``summary.json``.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from weakseg import ops

CLASSES = ["background", "disc", "box", "stripe"]
PALETTE = np.array([[0, 0, 0], [230, 80, 60], [60, 160, 230], [240, 200, 40]] + [[255, 255, 255]] * 252, np.uint8)
PATCH = 16


def make_scene(g: torch.Generator, size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """An RGB uint8 scene (3, H, W) and its int64 label map (H, W)."""
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    label = torch.zeros(size, size, dtype=torch.int64)
    img = torch.empty(3, size, size)
    base = {0: (0.35, 0.45, 0.35), 1: (0.85, 0.3, 0.25), 2: (0.2, 0.5, 0.85), 3: (0.9, 0.8, 0.2)}
    freq = {0: 0.05, 1: 0.4, 2: 0.0, 3: 0.8}
    r = lambda a, b: float(a + (b - a) * torch.rand((), generator=g))
    cy, cx, rad = r(50, 200), r(50, 200), r(25, 50)
    label[(yy - cy) ** 2 + (xx - cx) ** 2 < rad ** 2] = 1
    y0, x0 = int(r(0, 160)), int(r(0, 160))
    label[y0:y0 + int(r(40, 90)), x0:x0 + int(r(40, 90))] = 2
    s0 = int(r(0, 220))
    band = label[:, s0:s0 + int(r(15, 30))]   # a vertical stripe behind the shapes
    band[band == 0] = 3
    for c, rgb in base.items():
        m = label == c
        tex = 0.12 * torch.sin(freq[c] * (xx + yy).float() + r(0, 6.28))
        for ch in range(3):
            img[ch][m] = (rgb[ch] + tex + 0.04 * torch.randn(size, size, generator=g))[m]
    return (img.clamp(0, 1) * 255).round().to(torch.uint8), label


class RandomFeatures(torch.nn.Module):
    """A fixed random-feature patch encoder standing in for a backbone: per-pixel colour and
    local-texture features, a random projection with ReLU, averaged over 16 px patches."""

    def __init__(self, dim: int = 64, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.proj = torch.randn(dim, 6, generator=g)
        self.bias = torch.randn(dim, generator=g) * 0.5

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = image.float()[None] / 255.0
        local = F.avg_pool2d(x, 5, 1, 2)
        tex = (x - local).abs()
        feats = torch.cat([local, F.avg_pool2d(tex, 9, 1, 4) * 4], 1)            # (1, 6, H, W)
        z = torch.relu(torch.einsum("dc,bchw->bdhw", self.proj, feats) + self.bias[:, None, None])
        return F.avg_pool2d(z, PATCH)                                           # (1, D, H/16, W/16)


def _components(image: torch.Tensor, min_area: int) -> torch.Tensor:
    q = (F.avg_pool2d(image.float()[None], 15, 1, 7)[0] / 85).round().long()   # 4 levels per channel, smoothed
    key = (q[0] * 16 + q[1] * 4 + q[2]).numpy()
    masks = []
    for v in np.unique(key):
        comp = _label_components(key == v)
        for c in range(1, comp.max() + 1):
            m = comp == c
            if m.sum() >= min_area:
                masks.append(torch.from_numpy(m))
    return torch.stack(masks) if masks else torch.zeros(0, *key.shape, dtype=torch.bool)


def _label_components(mask: np.ndarray) -> np.ndarray:
    """4-connected components by union-find over rows (no SciPy needed)."""
    H, W = mask.shape
    parent = list(range(H * W + 1))

    def find(a):
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    idx = np.arange(H * W).reshape(H, W) + 1
    lab = np.where(mask, idx, 0)
    for (a, b) in ((lab[:, 1:], lab[:, :-1]), (lab[1:, :], lab[:-1, :])):
        both = (a > 0) & (b > 0)
        for x, y in zip(a[both].tolist(), b[both].tolist()):
            rx, ry = find(x), find(y)
            if rx != ry:
                parent[max(rx, ry)] = min(rx, ry)
    roots = np.vectorize(find)(lab.ravel()).reshape(H, W) * mask
    _, inv = np.unique(roots, return_inverse=True)
    return inv.reshape(H, W)


def _save_labels(path: Path, labels: torch.Tensor) -> None:
    from PIL import Image

    Image.fromarray(PALETTE[labels.clamp(0, 255).numpy().astype(np.uint8)]).save(path)


def _save_image(path: Path, image: torch.Tensor) -> None:
    from PIL import Image

    Image.fromarray(image.permute(1, 2, 0).numpy()).save(path)


def miou(pred: torch.Tensor, gt: torch.Tensor, num_classes: int) -> tuple[float, list[float]]:
    valid = gt != 255
    cm = torch.bincount(gt[valid] * num_classes + pred[valid].clamp(0, num_classes - 1),
                        minlength=num_classes ** 2).reshape(num_classes, num_classes).double()
    iou = cm.diag() / (cm.sum(0) + cm.sum(1) - cm.diag()).clamp_min(1)
    present = cm.sum(1) > 0
    return float(iou[present].mean()), [round(float(v), 4) for v in iou]


def run_demo(out: str | os.PathLike, seed: int = 0, train_scenes: int = 12) -> dict:
    from safetensors.torch import save_file

    outdir = Path(out)
    outdir.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    enc = RandomFeatures(seed=seed)
    timings: dict[str, float] = {}

    def timed(name, fn, *a):
        t0 = time.perf_counter()
        r = fn(*a)
        timings[name] = timings.get(name, 0.0) + (time.perf_counter() - t0) * 1e3
        return r

    # --- bank from training scenes -------------------------------------------------------------
    vecs, labs = [], []
    for i in range(train_scenes):
        img, gt = make_scene(g)
        pure = timed("erode_labels", ops.erode_labels, gt, 3, 5)
        if i == 0:
            _save_image(outdir / "train_image.png", img)
            _save_labels(outdir / "train_labels.png", gt)
            _save_labels(outdir / "train_labels_purified.png", pure)
        classes = [c for c in range(len(CLASSES)) if int((pure == c).sum()) >= 300]
        masks = torch.stack([pure == c for c in classes])[None]
        pooled, area = timed("masked_area_pool", ops.masked_area_pool, enc(img), masks)
        vecs.append(pooled[0])
        labs.extend(classes)
    bank, bank_labels = torch.cat(vecs), torch.tensor(labs)
    tmp = outdir / "bank.safetensors.tmp"
    save_file({"vectors": bank.contiguous(), "labels": bank_labels}, str(tmp),
              metadata={"format": "weakseg-demo-bank", "classes": json.dumps(CLASSES)})
    os.replace(tmp, outdir / "bank.safetensors")

    # --- segment a held-out scene ----------------------------------------------------------------
    img, gt = make_scene(g)
    props = _components(img, 300)
    core = timed("erode", ops.erode, props, 3)
    pooled, area = timed("masked_area_pool", ops.masked_area_pool, enc(img), core[None])
    keep = area[0] > 0
    labels, conf, votes = timed("knn_vote", ops.knn_vote, pooled[0][keep], bank, bank_labels, 5, len(CLASSES))
    pred = torch.zeros_like(gt)
    for j in torch.argsort(conf).tolist():                       # ascending: the most confident wins
        pred[props[keep][j]] = labels[j]
    score, per_class = miou(pred, gt, len(CLASSES))
    _save_image(outdir / "test_image.png", img)
    _save_labels(outdir / "test_labels.png", gt)
    _save_labels(outdir / "test_prediction.png", pred)

    summary = {
        "what": "retrieval segmentation from the weakseg ops on generated scenes (toy world pending)",
        "classes": CLASSES,
        "bank_size": int(bank.shape[0]),
        "proposals": int(keep.sum()),
        "miou": round(score, 4),
        "iou_per_class": per_class,
        "op_ms": {k: round(v, 2) for k, v in timings.items()},
        "outputs": sorted(p.name for p in outdir.iterdir() if p.is_file()),
    }
    (outdir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
