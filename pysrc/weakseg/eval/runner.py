"""The evaluation loop behind ``weakseg eval``.

For every image of a dataset (or of this process's shard), the method's label
map is computed once and cached as a PNG under ``<out>/preds/``; a rerun skips
the cached images (an interrupted run resumes where it stopped), and the
confusion matrix is accumulated from the cached maps and the ground truth.

The cache is keyed by ``<out>/preds/manifest.json``: the method's name, its
resolved config, a digest of the weight files the config names (see
:func:`weights_digest`), the dataset (name, split, root), the class names and
whether image-level labels were given. A run whose key differs from the
manifest's (or finds predictions without a manifest) deletes the cached PNGs
and recomputes every image, saying so on stderr; a cached PNG that cannot be
read or does not fit its image (size, class ids) is recomputed too.
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
import hashlib
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from weakseg.distributed import dist_info
from weakseg.eval.metrics import MIOU_CONVENTIONS, ConfusionMatrix
from weakseg.eval.visualize import overlay_panel
from weakseg.io import hash_file, save_png, write_json, write_text

__all__ = ["evaluate", "open_eval_dataset", "weights_digest"]


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


def _read_cached(path: Path, size: tuple[int, int], num_classes: int, ignore: int) -> tuple[torch.Tensor | None, str]:
    """A cached prediction, or (None, why) when it cannot be used: unreadable (truncated, not a PNG), another
    size than its image, or class ids outside [0, num_classes) other than ``ignore``."""
    try:
        pred = _read_label_png(path)
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        return None, f"unreadable ({type(e).__name__}: {e})"
    if tuple(pred.shape) != tuple(size):
        return None, f"{tuple(pred.shape)} for a {tuple(size)} image"
    bad = (pred != ignore) & ((pred < 0) | (pred >= num_classes))
    if bool(bad.any()):
        return None, f"class id {int(pred[bad][0])} outside [0, {num_classes})"
    return pred, ""


_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".ckpt", ".json", ".txt", ".model")
_NOT_WEIGHTS = ("cache_dir", "work_dir")  # download / scratch folders, not what the method computes with


def _strings(value: Any):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _strings(v)


def _weights_path(value: str) -> Path:
    """The local file or folder a config string stands for: a model source's weights (``toy``) or a path."""
    from weakseg.core import MODEL_SOURCES

    head = value.split(":", 1)[0]
    if head in MODEL_SOURCES:
        return Path(MODEL_SOURCES.get(head)(None, value.partition(":")[2] or None))
    return Path(value.removeprefix("local-dir:")).expanduser()


def weights_digest(config: dict[str, Any]) -> str:
    """A digest of the weights a method config names: the content (sha256) of every existing file a string
    option names (banks, heads, checkpoints, caches), and for every existing directory (a model saved by
    ``save_pretrained``) the path, size and mtime of its weight and config files up to two levels down;
    a model source's name (``"toy"``) stands for the folder of its weights. Hub names are covered by the config itself."""
    h = hashlib.sha256()
    seen: set[str] = set()
    for key in sorted(config):
        if key in _NOT_WEIGHTS:
            continue
        for s in _strings(config[key]):
            if s in seen or s in ("", ".", ".."):
                continue
            seen.add(s)
            p = _weights_path(s)
            try:
                if p.is_file():
                    h.update(f"file {key} {s}\n".encode())
                    hash_file(h, p)
                elif p.is_dir():
                    h.update(f"dir {key} {s}\n".encode())
                    for q in sorted(p.glob("*")) + sorted(p.glob("*/*")):
                        if q.is_file() and q.suffix in _WEIGHT_SUFFIXES:
                            st = q.stat()
                            h.update(f"{q.relative_to(p).as_posix()} {st.st_size} {st.st_mtime_ns}\n".encode())
            except OSError:  # unreadable: the method itself reports it when it loads the file
                h.update(f"unreadable {key} {s}\n".encode())
    return h.hexdigest()[:16]


def _cache_key(segmenter, dataset, method_name: str | None, dataset_name: str | None, names: Sequence[str],
               use_image_labels: bool) -> dict[str, Any]:
    cfg = getattr(segmenter, "config", None)
    config = json.loads(json.dumps(dataclasses.asdict(cfg), default=str)) if dataclasses.is_dataclass(cfg) else None
    root = getattr(dataset, "root", None)
    return {"method": method_name or type(segmenter).__name__, "config": config,
            "weights": weights_digest(config or {}),
            "dataset": {"name": dataset_name or type(dataset).__name__, "split": getattr(dataset, "split", None),
                        "root": str(Path(root).resolve()) if root is not None else None},
            "class_names": list(names), "image_labels_given": bool(use_image_labels)}


def _key_difference(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """The entries (config options by name) in which two cache keys differ."""
    diff = []
    for k in new:
        if k == "config" and isinstance(old.get(k), dict) and isinstance(new[k], dict):
            diff += [f"config.{o}" for o in sorted(set(old[k]) | set(new[k])) if old[k].get(o) != new[k].get(o)]
        elif old.get(k) != new[k]:
            diff.append(k)
    return diff


def _note(msg: str) -> None:
    tqdm.write(f"weakseg eval: {msg}", file=sys.stderr)


def _sync_cache(preds_dir: Path, key: dict[str, Any], owner: bool) -> bool:
    """Make ``preds_dir`` hold only predictions made under ``key``. Returns whether its PNGs may be reused.
    The ``owner`` (rank 0) deletes stale PNGs and writes the manifest; other ranks only read it."""
    manifest = preds_dir / "manifest.json"
    cached = preds_dir.is_dir() and next(preds_dir.rglob("*.png"), None) is not None
    old = None
    if manifest.is_file():
        try:
            old = json.loads(manifest.read_text())
        except (OSError, ValueError) as e:
            why = f"its manifest {manifest} is unreadable ({type(e).__name__})"
        else:
            why = "" if old == key else ("this run differs in " + ", ".join(_key_difference(old, key)))
    else:
        why = f"there is no manifest {manifest.name} saying what made them"
    if old == key:
        return True
    if not owner:
        return False
    if cached:
        _note(f"the cached predictions in {preds_dir} cannot be reused: {why}; recomputing every image")
        for p in preds_dir.rglob("*.png"):
            p.unlink()
    preds_dir.mkdir(parents=True, exist_ok=True)
    write_json(manifest, key)
    return True


def check_dataset_name(name: str) -> None:
    """A ValueError listing the known datasets when ``name`` is not one (before asking for a root)."""
    from weakseg.core import GENERATED_DATASETS
    from weakseg.data import DATASETS

    generated = [n for n in GENERATED_DATASETS.names() if not n.endswith("-captions")]
    if name not in DATASETS and name not in generated:
        raise ValueError(f"--dataset: unknown dataset {name!r}; known: {', '.join(sorted([*DATASETS, *generated]))}")


def open_eval_dataset(name: str, root: str | None = None, split: str | None = None, **kwargs: Any):
    """A dataset by name: the readers of :mod:`weakseg.data` (``root`` required) or
    ``"toyworld"`` (generated; ``split`` defaults to the held-out ``"test"``)."""
    from weakseg.core import GENERATED_DATASETS

    check_dataset_name(name)
    if name in GENERATED_DATASETS:
        return GENERATED_DATASETS.get(name)(split, **kwargs)
    from weakseg.data import open_dataset

    if root is None:
        raise ValueError(f"dataset {name!r}: --root DIR is required")
    if Path(root).exists() and not Path(root).is_dir():
        raise ValueError(f"--root: {root} is a file; expected the {name} dataset's directory")
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
    r, w, use_dist = dist_info(rank, world_size)
    preds_dir = out / "preds"
    ignore = getattr(dataset, "ignore_index", 255)
    key = _cache_key(segmenter, dataset, method_name, dataset_name, names, use_image_labels)
    reusable = _sync_cache(preds_dir, key, owner=r == 0)
    if use_dist and w > 1:
        import torch.distributed as dist

        dist.barrier()  # rank 0 has removed stale predictions before any rank reads the cache
        reusable = reusable or _sync_cache(preds_dir, key, owner=False)
    resume = resume and reusable
    cm = ConfusionMatrix(C, ignore)
    computed, seconds, labelled = 0, 0.0, 0
    for i in tqdm(range(r, n, w), desc=f"eval {method_name or ''}".strip(), disable=not progress or r != 0):
        sample = dataset[i]
        path = preds_dir / f"{_safe_name(sample.name)}.png"
        pred = None
        if resume and path.exists():
            pred, why = _read_cached(path, tuple(sample.image.shape[1:]), C, ignore)
            if pred is None:
                _note(f"the cached prediction {path} is {why}; recomputing it")
        if pred is None:
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
                save_png(overlay_panel(sample.image, sample.label, _read_label_png(path), class_names=names),
                         out / "overlays" / f"{_safe_name(sample.name).replace('/', '_')}.png")
    return metrics
