"""ModuSeg's feature bank: the file format (:class:`FeatureBank`, one safetensors file) and the
per-class outlier filter applied to a bank's rows (:func:`outlier_filter`).

A bank file holds ``vectors`` (N, D) float32 unit rows, ``labels`` (N,) int64 and ``sample_index`` (N,)
int64 into the JSON list of sample ids; metadata: format name and version, backbone id, dim, class
names, the build settings and the filter report. Rows are ordered by (image index, class), so the bank
does not depend on how the build was sharded or interrupted (:mod:`.build`).

Outlier filtering (``outlier_filter``), after all images: for every foreground class the
``fg_drop_ratio`` (25 %) of its vectors farthest (Euclidean) from the plain mean of the class's unit
vectors are dropped; the background drops ``bg_drop_ratio`` (0).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from weakseg.core import read_safetensors
from weakseg.io import save_safetensors

__all__ = ["FeatureBank", "BankError", "BANK_FORMAT", "BANK_FORMAT_VERSION", "outlier_filter"]

BANK_FORMAT = "weakseg-moduseg-bank"
BANK_FORMAT_VERSION = 1
_BANK_KEYS = ("vectors", "labels", "sample_index")
_BANK_META = ("format", "format_version", "backbone", "dim", "class_names", "samples")


class BankError(ValueError):
    """A feature bank file that is missing, corrupt, or does not fit the segmenter."""


@dataclass
class FeatureBank:
    """The offline bank: ``vectors`` (N, D) float32 unit rows, ``labels`` (N,) int64 class ids into
    ``class_names``, ``sample_index`` (N,) int64 into ``samples`` (the id of the image each row came from),
    ``backbone`` (the feature extractor's id), ``build`` (the settings it was built with) and ``report``
    (the outlier filter's per-class counts)."""

    vectors: torch.Tensor
    labels: torch.Tensor
    sample_index: torch.Tensor
    samples: list[str]
    class_names: list[str]
    backbone: str
    build: dict = field(default_factory=dict)
    report: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        v, l, s = self.vectors, self.labels, self.sample_index
        if v.dim() != 2 or v.dtype != torch.float32:
            raise BankError(f"FeatureBank.vectors: expected (N, D) float32, got {tuple(v.shape)} {v.dtype}")
        if l.shape != (v.shape[0],) or l.dtype != torch.int64:
            raise BankError(f"FeatureBank.labels: expected ({v.shape[0]},) int64, got {tuple(l.shape)} {l.dtype}")
        if s.shape != (v.shape[0],) or s.dtype != torch.int64:
            raise BankError(f"FeatureBank.sample_index: expected ({v.shape[0]},) int64, got {tuple(s.shape)} {s.dtype}")
        if l.numel() and (int(l.min()) < 0 or int(l.max()) >= len(self.class_names)):
            raise BankError(f"FeatureBank.labels: expected class ids in [0, {len(self.class_names)}), found "
                            f"[{int(l.min())}, {int(l.max())}]")
        if s.numel() and (int(s.min()) < 0 or int(s.max()) >= len(self.samples)):
            raise BankError(f"FeatureBank.sample_index: expected indices into the {len(self.samples)} sample ids")

    def __len__(self) -> int:
        return self.vectors.shape[0]

    @property
    def dim(self) -> int:
        return self.vectors.shape[1]

    @property
    def sample_ids(self) -> list[str]:
        """The sample id of every row."""
        return [self.samples[i] for i in self.sample_index.tolist()]

    def counts(self) -> dict[str, int]:
        c = torch.bincount(self.labels, minlength=len(self.class_names))
        return {n: int(c[i]) for i, n in enumerate(self.class_names)}

    def metadata(self) -> dict[str, str]:
        return {"format": BANK_FORMAT, "format_version": str(BANK_FORMAT_VERSION), "backbone": self.backbone,
                "dim": str(self.dim), "class_names": json.dumps(self.class_names), "samples": json.dumps(self.samples),
                "build": json.dumps(self.build, sort_keys=True), "report": json.dumps(self.report, sort_keys=True)}

    def save(self, path: str | os.PathLike) -> Path:
        """Write the bank atomically (a temporary file in the same folder, then a rename)."""
        p = Path(path)
        save_safetensors({"vectors": self.vectors.float(), "labels": self.labels, "sample_index": self.sample_index},
                         p, self.metadata())
        return p

    @classmethod
    def load(cls, path: str | os.PathLike, *, backbone: str | None = None, dim: int | None = None) -> "FeatureBank":
        """Read and validate a bank; ``backbone`` / ``dim``: what the caller's feature extractor is, checked
        against the file. Every problem raises :class:`BankError` naming the file and what was expected."""
        p = Path(path)
        tensors, meta = read_safetensors(p, "feature bank", "build one with `weakseg bank build`", BankError)
        fmt = meta.get("format")
        if fmt != BANK_FORMAT:
            raise BankError(f"feature bank {p}: metadata 'format' is {fmt!r}; expected {BANK_FORMAT!r} (a file "
                            f"written by `weakseg bank build`)")
        version = meta.get("format_version")
        if version != str(BANK_FORMAT_VERSION):
            raise BankError(f"feature bank {p}: format version {version!r}; this weakseg reads version "
                            f"{BANK_FORMAT_VERSION} (rebuild the bank with `weakseg bank build`)")
        missing = [k for k in _BANK_KEYS if k not in tensors] + [f"metadata '{k}'" for k in _BANK_META if k not in meta]
        if missing:
            raise BankError(f"feature bank {p}: missing {', '.join(missing)}; expected tensors "
                            f"{', '.join(_BANK_KEYS)} and metadata {', '.join(_BANK_META)}")
        try:
            class_names = json.loads(meta["class_names"])
            samples = json.loads(meta["samples"])
            build = json.loads(meta.get("build", "{}"))
            report = json.loads(meta.get("report", "{}"))
            stored_dim = int(meta["dim"])
        except (ValueError, TypeError) as e:
            raise BankError(f"feature bank {p}: unreadable metadata ({e})") from None
        if not isinstance(class_names, list) or not isinstance(samples, list):
            raise BankError(f"feature bank {p}: metadata 'class_names' and 'samples' must be JSON lists")
        vec = tensors["vectors"]
        if vec.dim() != 2 or vec.dtype != torch.float32:
            raise BankError(f"feature bank {p}: 'vectors' is {tuple(vec.shape)} {vec.dtype}; expected (N, D) float32")
        if vec.shape[1] != stored_dim:
            raise BankError(f"feature bank {p}: 'vectors' has dimension {vec.shape[1]} but the metadata says {stored_dim}")
        if not bool(torch.isfinite(vec).all()):
            raise BankError(f"feature bank {p}: 'vectors' holds NaN or Inf values")
        if backbone is not None and meta["backbone"] != backbone:
            raise BankError(f"feature bank {p} was built with backbone {meta['backbone']!r}; this segmenter's backbone "
                            f"is {backbone!r} (rebuild the bank with it, or set check_backbone=false)")
        if dim is not None and vec.shape[1] != dim:
            raise BankError(f"feature bank {p} holds {vec.shape[1]}-d vectors; the backbone gives {dim}-d features "
                            f"(expected dimension {dim})")
        try:
            return cls(vec, tensors["labels"], tensors["sample_index"], [str(s) for s in samples],
                       [str(c) for c in class_names], meta["backbone"], build, report)
        except BankError as e:
            raise BankError(f"feature bank {p}: {e}") from None


def outlier_filter(vectors: torch.Tensor, labels: torch.Tensor, fg_drop_ratio: float = 0.25,
                   bg_drop_ratio: float = 0.0, background: int | None = 0) -> tuple[torch.Tensor, dict]:
    """Per-class prototype purification: for each class, the centroid is the plain mean of its unit
    vectors (not re-normalised); the floor(n * ratio) vectors farthest from it (Euclidean; equal
    distances drop the later row first) are dropped. ``background`` (class id or None) uses
    ``bg_drop_ratio``, every other class ``fg_drop_ratio``. Returns (keep (N,) bool, {class: [kept,
    dropped]})."""
    keep = torch.ones(labels.shape[0], dtype=torch.bool, device=labels.device)
    report: dict[int, list[int]] = {}
    for c in torch.unique(labels).tolist():
        rows = torch.nonzero(labels == c).flatten()
        ratio = bg_drop_ratio if background is not None and c == background else fg_drop_ratio
        n_drop = int(math.floor(rows.numel() * float(ratio) + 1e-9))
        if n_drop:
            v = vectors[rows].double()
            dist = (v - v.mean(0, keepdim=True)).norm(dim=1)
            # descending distance; among equal distances the later row goes first
            order = torch.sort(dist.flip(0), descending=True, stable=True).indices
            drop = rows.flip(0)[order[:n_drop]]
            keep[drop] = False
        report[int(c)] = [int(rows.numel() - n_drop), n_drop]
    return keep, report
