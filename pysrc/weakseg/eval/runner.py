"""The evaluation loop behind ``weakseg eval``.

For every image of a dataset (or of this process's shard), the method's label
map is computed once and cached as a PNG under ``<out>/preds/``; a rerun skips
the cached images (an interrupted run resumes where it stopped), and the
confusion matrix is accumulated from the cached maps and the ground truth.
Under ``torchrun`` each rank takes the images ``i % world_size == rank`` and
the integer confusion matrices are summed with ``all_reduce``, so the merged
result is exactly the single-process one.

Outputs (rank 0): ``metrics.json`` (method, dataset, per-class IoU, mIoU in
every convention, pixel accuracy, confusion ratios, seconds per image, the
method's config), ``metrics.md`` (the same as a table) and
``overlays/<name>.png`` (image | ground truth | prediction) for the first
images.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from weakseg.eval.metrics import MIOU_CONVENTIONS, ConfusionMatrix
from weakseg.eval.visualize import overlay_panel
from weakseg.io import save_png, write_json, write_text

__all__ = ["evaluate", "open_eval_dataset"]


def _dist_info(rank: int | None, world_size: int | None) -> tuple[int, int, bool]:
    """(rank, world size, whether torch.distributed carries the merge)."""
    import torch.distributed as dist

    if rank is not None or world_size is not None:
        r, w = rank or 0, world_size or 1
        if not 0 <= r < w:
            raise ValueError(f"evaluate: need 0 <= rank < world_size, got rank={r}, world_size={w}")
        return r, w, dist.is_available() and dist.is_initialized()
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), True
    w = int(os.environ.get("WORLD_SIZE", "1"))
    if w > 1:  # launched by torchrun: join the group (gloo works everywhere)
        dist.init_process_group(backend="gloo")
        return dist.get_rank(), dist.get_world_size(), True
    return 0, 1, False


def _safe_name(name: str) -> str:
    s = re.sub(r"[^A-Za-z0-9._/-]", "_", str(name)).lstrip("/")
    return "/".join(p for p in s.split("/") if p not in ("", ".", "..")) or "image"


def _write_label_png(label: torch.Tensor, path: Path) -> None:
    arr = label.cpu().numpy()
    if arr.min(initial=0) < 0 or arr.max(initial=0) > 255:
        raise ValueError(f"evaluate: predicted labels must lie in [0, 255] (255 = ignore), found "
                         f"[{arr.min()}, {arr.max()}]")
    save_png(arr.astype(np.uint8), path)


def _read_label_png(path: Path) -> torch.Tensor:
    with Image.open(path) as im:
        return torch.from_numpy(np.asarray(im).astype(np.int64))


def open_eval_dataset(name: str, root: str | None = None, split: str | None = None, **kwargs: Any):
    """A dataset by name: the readers of :mod:`weakseg.data` (``root`` required) or
    ``"toyworld"`` (generated; ``split`` defaults to the held-out ``"test"``)."""
    if name == "toyworld":
        from weakseg.data.toyworld import ToyWorld

        return ToyWorld(split=split or "test", **kwargs)
    from weakseg.data import open_dataset

    if root is None:
        raise ValueError(f"dataset {name!r}: --root DIR is required")
    return open_dataset(name, root, split if split is not None else "val", **kwargs)


def evaluate(segmenter, dataset, out_dir: str | os.PathLike, *, use_image_labels: bool = True, limit: int | None = None,
             overlays: int = 8, resume: bool = True, progress: bool = True, rank: int | None = None,
             world_size: int | None = None, method_name: str | None = None, dataset_name: str | None = None,
             class_names: Sequence[str] | None = None) -> dict[str, Any]:
    """Run ``segmenter`` over ``dataset`` and score it; returns the metrics dict (rank 0 writes it).

    ``use_image_labels``: pass each image's ground-truth class set to the method
    (the weakly-supervised / pseudo-label protocol); off for open-vocabulary
    evaluation. ``limit``: only the first ``limit`` images. ``overlays``: how
    many panels to write.
    """
    out = Path(out_dir)
    names = list(class_names) if class_names is not None else list(dataset.class_names)
    C = len(names)
    if C > 255:
        raise ValueError(f"evaluate: at most 255 classes fit the cached uint8 label maps, got {C}")
    if limit is not None and limit < 0:
        raise ValueError(f"evaluate: limit must be >= 0, got {limit}")
    n = len(dataset) if limit is None else min(limit, len(dataset))
    r, w, use_dist = _dist_info(rank, world_size)
    preds_dir = out / "preds"
    cm = ConfusionMatrix(C, getattr(dataset, "ignore_index", 255))
    computed, seconds, labelled = 0, 0.0, 0
    for i in tqdm(range(r, n, w), desc=f"eval {method_name or ''}".strip(), disable=not progress or r != 0):
        sample = dataset[i]
        path = preds_dir / f"{_safe_name(sample.name)}.png"
        if resume and path.exists():
            pred = _read_label_png(path)
        else:
            image_labels = None
            if use_image_labels:
                image_labels = torch.zeros(1, C, dtype=torch.bool)
                image_labels[0, [c for c in sample.image_labels if 0 <= c < C]] = True
            t0 = time.perf_counter()
            result = segmenter.segment([sample.image], names, image_labels)
            seconds += time.perf_counter() - t0
            computed += 1
            pred = result.labels[0].cpu()
            if pred.shape != sample.image.shape[1:]:
                raise ValueError(f"evaluate: the method returned a {tuple(pred.shape)} label map for the "
                                 f"{tuple(sample.image.shape[1:])} image {sample.name!r}")
            _write_label_png(pred, path)
        if sample.label is not None:
            cm.update(pred, sample.label)
            labelled += 1
    stats = torch.tensor([computed, seconds, labelled], dtype=torch.float64)
    if use_dist and w > 1:
        import torch.distributed as dist

        cm.all_reduce()
        dist.all_reduce(stats)
        dist.barrier()  # every rank's prediction PNGs are written before rank 0 reads them
    computed, seconds, labelled = int(stats[0]), float(stats[1]), int(stats[2])
    metrics: dict[str, Any] = {
        "method": method_name or type(segmenter).__name__,
        "dataset": dataset_name or type(dataset).__name__,
        "split": getattr(dataset, "split", None),
        "num_images": n,
        "num_labelled": labelled,
        "image_labels_given": use_image_labels,
        "seconds_per_image": seconds / computed if computed else None,
        "images_computed_this_run": computed,
    }
    if labelled:
        metrics.update(cm.summary(names))  # fractions, and the headline numbers in percent under "percent"
    cfg = getattr(segmenter, "config", None)
    if dataclasses.is_dataclass(cfg):
        metrics["config"] = json.loads(json.dumps(dataclasses.asdict(cfg), default=str))
    if r == 0:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "metrics.json", metrics, default=str)
        md = [f"# {metrics['method']} on {metrics['dataset']}", "",
              f"- images: {n} (labelled {labelled}); image-level labels given: {use_image_labels}",
              f"- seconds per image: {metrics['seconds_per_image'] if computed else 'n/a (all cached)'}"]
        if labelled:
            md += [f"- mIoU ({conv}): {metrics['percent'][f'miou_{conv}']:.2f} %" for conv in MIOU_CONVENTIONS
                   if metrics["percent"][f"miou_{conv}"] is not None]
            md += ["", cm.to_markdown(names)]
        write_text(out / "metrics.md", "\n".join(md) + "\n")
        for i in range(min(overlays, n)):
            sample = dataset[i]
            path = preds_dir / f"{_safe_name(sample.name)}.png"
            if path.exists():
                save_png(overlay_panel(sample.image, sample.label, _read_label_png(path)),
                         out / "overlays" / f"{_safe_name(sample.name).replace('/', '_')}.png")
    return metrics
