"""ModuSeg's bank build (:func:`build_bank`, :meth:`ModuSeg.build_bank`, ``weakseg bank build``).

Per training image: its pseudo label map (:mod:`.pseudo`), Semantic Boundary Purification and one
region per class present, then one backbone forward and the Soft-Masked Feature Aggregation of every
region (:mod:`.regions`). After all images, the rows are merged in (image index, class) order and
filtered per class (:func:`~weakseg.methods.moduseg.bank.outlier_filter`) into one bank file
(:mod:`.bank`).

Building is resumable: finished images are persisted in ``<out>.parts/`` (atomic chunk files of
``flush_every`` images, flushed on interruption too, next to a ``manifest.json`` of the build's
settings) and skipped by a rerun; under ``torchrun`` (RANK / WORLD_SIZE) rank r takes images
i % world == r and rank 0 merges exactly.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from weakseg.core import read_safetensors
from weakseg.io import save_safetensors, write_json
from weakseg.methods.common import has_background
from weakseg.methods.moduseg.bank import BANK_FORMAT_VERSION, BankError, FeatureBank, outlier_filter
from weakseg.methods.moduseg.config import ModuSegConfig
from weakseg.methods.moduseg.pseudo import PseudoMaskDir
from weakseg.methods.moduseg.regions import encode_regions, purify_regions

__all__ = ["build_bank", "build_with", "image_entries"]

_PART_FORMAT = "weakseg-moduseg-bank-part"


def image_entries(seg, image: torch.Tensor, label_map: torch.Tensor, class_names: Sequence[str]):
    """Bank rows of one image for the ModuSeg segmenter ``seg``: (vectors (R, D), classes (R,)) after
    SBP, the area floor and SMFA."""
    cfg = seg.config
    skip = (0,) if (not cfg.background_in_bank and has_background(class_names)) else ()
    with seg.timer("sbp"):
        classes, masks = purify_regions(label_map.to(torch.int64), len(class_names), sbp=cfg.sbp,
                                        kernel=cfg.erosion_kernel, iterations=cfg.erosion_iterations,
                                        min_area=cfg.min_area, skip=skip)
    D = seg.feature_dim or 0
    if not classes:
        return torch.zeros(0, D), torch.zeros(0, dtype=torch.int64)
    with seg.timer("backbone", seg.device):
        feats = seg.features(image)
    with seg.timer("encode", seg.device):
        vecs, weight = encode_regions(feats, masks, cfg.pooling)
    vecs = vecs.cpu()
    ok = (weight.cpu() >= 1e-6) & torch.isfinite(vecs).all(1) & (vecs.norm(dim=1) >= 1e-6)
    return vecs[ok].contiguous(), torch.tensor(classes, dtype=torch.int64)[ok]


def build_with(seg, dataset, out: str | os.PathLike, *, pseudo, class_names: Sequence[str] | None = None,
               limit: int | None = None, progress: bool = True, resume: bool = True, rank: int | None = None,
               world_size: int | None = None, dataset_name: str | None = None) -> FeatureBank | None:
    """Build the feature bank of ``dataset`` (items with ``image``, ``name``, ``image_labels``) into
    ``out`` with the ModuSeg segmenter ``seg`` (module docstring; :meth:`ModuSeg.build_bank` calls
    this). ``pseudo``: a pseudo-mask directory (str / Path / PseudoMaskDir) or a segmenter (any object
    with ``segment``). ``resume``: reuse finished work in ``<out>.parts`` (and a
    finished bank with the same settings); False starts over. Sharded by ``rank`` / ``world_size``
    (default: the torchrun environment); the rank that merges returns the bank, the others None.
    The built bank becomes ``seg``'s bank."""
    from tqdm.auto import tqdm

    from weakseg.distributed import dist_info

    cfg = seg.config
    out = Path(out)
    names = [str(c) for c in (class_names if class_names is not None else dataset.class_names)]
    if not names:
        raise ValueError("build_bank: the dataset has no class names; pass class_names=")
    if limit is not None and limit < 0:
        raise ValueError(f"build_bank: limit must be >= 0, got {limit}")
    n = len(dataset) if limit is None else min(limit, len(dataset))
    if n == 0:
        raise ValueError("build_bank: the dataset is empty (no image to build a bank from)")
    if isinstance(pseudo, (str, os.PathLike)):
        pseudo = PseudoMaskDir(pseudo)
    if not isinstance(pseudo, PseudoMaskDir) and not hasattr(pseudo, "segment"):
        raise TypeError(f"pseudo: expected a pseudo-mask directory or a segmenter, got {type(pseudo).__name__}")
    r, w, use_dist = dist_info(rank, world_size, "bank build")
    manifest = {"format": _PART_FORMAT, "format_version": BANK_FORMAT_VERSION, "backbone": seg.backbone_id,
                "dim": seg.feature_dim, "class_names": names, "source": _source_id(pseudo),
                "settings": cfg.build_settings(),
                "dataset": {"name": dataset_name or type(dataset).__name__,
                            "split": getattr(dataset, "split", None), "num_images": n}}
    expected_build = {**manifest, "filter": cfg.filter_settings()}
    expected_build.pop("format"), expected_build.pop("format_version")
    if resume and out.is_file():
        try:
            done_bank = FeatureBank.load(out)
        except (BankError, FileNotFoundError):
            done_bank = None
        if done_bank is not None and done_bank.build == json.loads(json.dumps(expected_build)):
            if r == 0:
                seg.set_bank(done_bank)
            return done_bank if r == 0 else None
    parts = Path(str(out) + ".parts")
    if not resume and r == 0 and parts.exists():
        shutil.rmtree(parts)
    if use_dist and w > 1:
        import torch.distributed as dist

        dist.barrier()
    parts.mkdir(parents=True, exist_ok=True)
    _check_manifest(parts, manifest)
    done = _done_images(parts)
    todo = [i for i in range(r, n, w) if i not in done]
    buf_vecs, buf_labs, buf_idx, buf_done, buf_names = [], [], [], [], {}

    def flush():
        if not buf_done:
            return
        full = [j for j, v in enumerate(buf_vecs) if v.shape[0]]
        D = buf_vecs[full[0]].shape[1] if full else (seg.feature_dim or 0)
        vecs = torch.cat([buf_vecs[j] for j in full]) if full else torch.zeros(0, D)
        labs = torch.cat([buf_labs[j] for j in full]) if full else torch.zeros(0, dtype=torch.int64)
        idx = torch.cat([buf_idx[j] for j in full]) if full else torch.zeros(0, dtype=torch.int64)
        save_safetensors({"vectors": vecs.float(), "labels": labs, "image_index": idx},
                         parts / f"part_{min(buf_done):09d}_{max(buf_done):09d}.safetensors",
                         {"format": _PART_FORMAT, "done": json.dumps(buf_done), "names": json.dumps(buf_names)})
        buf_vecs.clear(), buf_labs.clear(), buf_idx.clear(), buf_done.clear(), buf_names.clear()

    try:
        for i in tqdm(todo, desc=f"bank {out.name}" + (f" [rank {r}/{w}]" if w > 1 else ""),
                      disable=not progress):
            with seg.timer("data"):
                sample = dataset[i]
            with seg.timer("pseudo"):
                lab = seg.pseudo_labels(sample, names, pseudo)
            vecs, labs = seg.image_entries(sample.image, lab, names)
            buf_vecs.append(vecs)
            buf_labs.append(labs)
            buf_idx.append(torch.full((labs.numel(),), i, dtype=torch.int64))
            buf_done.append(i)
            buf_names[str(i)] = str(sample.name)
            if len(buf_done) >= cfg.flush_every:
                with seg.timer("write"):
                    flush()
    finally:
        with seg.timer("write"):
            flush()  # finished images survive an interruption
    if use_dist and w > 1:
        import torch.distributed as dist

        dist.barrier()
        if r != 0:
            return None
    if not use_dist and w > 1 and len(_done_images(parts)) < n:
        return None  # other shards still running: the last one to finish merges
    with seg.timer("merge"):
        bank = _merge_parts(parts, n, names, seg.backbone_id, expected_build, cfg,
                            class_has_bg=has_background(names))
        bank.save(out)
    if w == 1 or use_dist:
        shutil.rmtree(parts, ignore_errors=True)
    seg.set_bank(bank)
    return bank


def _source_id(pseudo) -> str:
    if isinstance(pseudo, PseudoMaskDir):
        return f"dir:{pseudo.root.resolve()}"
    cfg = getattr(pseudo, "config", None)
    desc = json.dumps(dataclasses.asdict(cfg), sort_keys=True, default=str) if dataclasses.is_dataclass(cfg) else ""
    return f"method:{type(pseudo).__name__}:{desc}"


def _check_manifest(parts: Path, manifest: dict) -> None:
    path = parts / "manifest.json"
    want = json.loads(json.dumps(manifest))
    if path.is_file():
        try:
            have = json.loads(path.read_text())
        except ValueError:
            have = None
        if have != want:
            diff = sorted(k for k in set(want) | set(have or {}) if (have or {}).get(k) != want.get(k))
            raise ValueError(f"bank build: {parts} holds partial results of a different build (differs in "
                             f"{', '.join(diff) or 'an unreadable manifest'}); rerun with --restart (resume=False) "
                             f"to discard them, or restore the original settings")
        return
    write_json(path, want, sort_keys=True)


def _part_files(parts: Path) -> list[Path]:
    return sorted(parts.glob("part_*.safetensors"))


def _done_images(parts: Path) -> set[int]:
    done: set[int] = set()
    for p in _part_files(parts):
        from safetensors import safe_open

        try:
            with safe_open(str(p), framework="pt") as f:
                done.update(int(i) for i in json.loads((f.metadata() or {})["done"]))
        except Exception as e:  # a damaged part: its images are recomputed
            warnings.warn(f"bank build: ignoring unreadable partial result {p} ({e}); its images are recomputed")
    return done


def _merge_parts(parts: Path, n: int, names: list[str], backbone: str, build: dict, cfg: ModuSegConfig,
                 class_has_bg: bool) -> FeatureBank:
    vecs, labs, idxs, sample_names, seen = [], [], [], {}, set()
    for p in _part_files(parts):
        tensors, meta = read_safetensors(p, "partial bank result", error=BankError)
        done = [int(i) for i in json.loads(meta["done"])]
        if seen.intersection(done):  # the same image in two parts (two runs raced): keep the first
            keep = ~torch.isin(tensors["image_index"], torch.tensor(sorted(seen.intersection(done))))
            tensors = {k: v[keep] for k, v in tensors.items()}
        seen.update(done)
        if tensors["vectors"].shape[0]:
            vecs.append(tensors["vectors"])
            labs.append(tensors["labels"])
            idxs.append(tensors["image_index"])
        sample_names.update({int(k): v for k, v in json.loads(meta["names"]).items()})
    missing = sorted(set(range(n)) - seen)
    if missing:
        raise RuntimeError(f"bank build: {len(missing)} of {n} images have no result in {parts} (first {missing[:5]}); "
                           f"run the build again to finish them")
    vec = torch.cat(vecs).float() if vecs else torch.zeros(0, 0)
    lab = torch.cat(labs).long() if labs else torch.zeros(0, dtype=torch.int64)
    img = torch.cat(idxs).long() if idxs else torch.zeros(0, dtype=torch.int64)
    # a fixed row order, whatever the sharding or interruptions: by image, then class
    order = torch.from_numpy(np.lexsort((lab.numpy(), img.numpy())))
    vec, lab, img = vec[order], lab[order], img[order]
    if vec.shape[0] == 0:
        raise ValueError(f"bank build: no region survived ({n} images; min_area={cfg.min_area}, sbp={cfg.sbp} with "
                         f"{cfg.erosion_kernel}x{cfg.erosion_kernel} x {cfg.erosion_iterations}); lower min_area or "
                         f"erosion_iterations")
    report: dict = {"before": {names[c]: int(v) for c, v in enumerate(torch.bincount(lab, minlength=len(names)))}}
    if cfg.outlier_filter:
        keep, per_class = outlier_filter(vec, lab, cfg.fg_drop_ratio, cfg.bg_drop_ratio,
                                         background=0 if class_has_bg else None)
        vec, lab, img = vec[keep], lab[keep], img[keep]
        report["dropped"] = {names[c]: kd[1] for c, kd in per_class.items()}
    used = sorted(set(img.tolist()))
    remap = {old: new for new, old in enumerate(used)}
    sample_index = torch.tensor([remap[i] for i in img.tolist()], dtype=torch.int64)
    samples = [sample_names.get(i, str(i)) for i in used]
    return FeatureBank(F.normalize(vec, dim=1).contiguous(), lab.contiguous(), sample_index, samples, list(names),
                       backbone, json.loads(json.dumps(build)), report)


def build_bank(dataset, out: str | os.PathLike, *, pseudo, config: ModuSegConfig | None = None, backbone=None,
               proposer=None, **kwargs) -> FeatureBank | None:
    """Build a bank with a fresh :class:`ModuSeg` (``config`` or defaults); see :meth:`ModuSeg.build_bank`."""
    from weakseg.methods.moduseg.method import ModuSeg  # the segmenter calls back into this module

    cfg = (config or ModuSegConfig()).replace(bank=None)
    return ModuSeg(cfg, backbone=backbone, proposer=proposer).build_bank(dataset, out, pseudo=pseudo, **kwargs)
