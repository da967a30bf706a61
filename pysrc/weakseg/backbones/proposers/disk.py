"""Masks precomputed by an external model (e.g. EntitySeg), read from PNG id maps or npz files."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from weakseg.backbones.proposers.base import Proposals, check_image, paint_disjoint
from weakseg.core import PROPOSERS, ModelSpec

__all__ = ["DiskProposer"]


# ----------------------------------------------------------------------------------------------
# Precomputed masks from disk
# ----------------------------------------------------------------------------------------------
_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm"}


@PROPOSERS.register("disk")
class DiskProposer:
    """Masks precomputed by an external model (e.g. EntitySeg), one file per image under ``root``.

    The file for a key is ``root / pattern.format(key=stem)`` + ``.npz`` or ``.png`` (tried in
    the order of ``formats``), where ``stem`` is the key with any directory and image suffix
    removed (``"/data/JPEGImages/2007_000032.jpg"`` -> ``"2007_000032"``). ``pattern`` may hold
    sub-directories (``"train2014/{key}"``).

    - ``.npz``: ``masks`` (M, H, W) bool/0-1 ints, possibly overlapping, and optional ``scores``
      (M,); made disjoint with :func:`paint_disjoint` (higher score wins).
    - ``.png``: a single-channel id map (8-bit, or 16-bit for more than 255 regions; PNG has no
      32-bit grey), 0 = no region, 1..M = regions;
      scores from an optional sidecar ``<same name>.json`` holding a list (score of id k at
      position k - 1) or a dict {"k": score}; without a sidecar every region scores
      ``default_score``.

    Regions scoring below ``score_thresh`` (EntitySeg: 0.5 in CorrCLIP, 0.6 at ModuSeg inference)
    or smaller than ``min_area`` pixels are dropped. Call as ``proposer(image, key=...)``; the
    image is optional and, when given, must match the stored mask size.
    """

    FAMILY = "disk"

    @classmethod
    def from_spec(cls, spec, *, device=None, dtype=None, cache_dir: str | None = None, **options) -> "DiskProposer":
        """The spec is the directory of precomputed masks (``options``: pattern, formats, ...)."""
        if spec is None:
            raise ValueError("proposer 'disk': the model spec must be the directory of precomputed masks")
        return cls(ModelSpec.parse(spec, what="proposer 'disk'").name, **options)

    def __init__(self, root: str | os.PathLike, *, pattern: str = "{key}", formats: Sequence[str] = ("npz", "png"),
                 score_thresh: float | None = None, min_area: int = 0, default_score: float = 1.0):
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise FileNotFoundError(f"DiskProposer: root directory {self.root} does not exist "
                                    f"(expected a directory of precomputed masks)")
        if "{key}" not in pattern:
            raise ValueError(f"pattern: expected a format string containing '{{key}}', got {pattern!r}")
        bad = [f for f in formats if f not in ("npz", "png")]
        if bad or not formats:
            raise ValueError(f"formats: expected a non-empty subset of ('npz', 'png'), got {tuple(formats)}")
        if min_area < 0:
            raise ValueError(f"min_area: expected >= 0, got {min_area}")
        self.pattern = pattern
        self.formats = tuple(formats)
        self.score_thresh = score_thresh
        self.min_area = int(min_area)
        self.default_score = float(default_score)

    @staticmethod
    def stem(key: str | os.PathLike) -> str:
        name = Path(os.fspath(key)).name
        p = Path(name)
        return p.stem if p.suffix.lower() in _IMAGE_SUFFIXES else name

    def candidates(self, key: str | os.PathLike) -> list[Path]:
        base = self.pattern.format(key=self.stem(key))
        return [self.root / f"{base}.{fmt}" for fmt in self.formats]

    def path_for(self, key: str | os.PathLike) -> Path:
        """The existing file for ``key``; FileNotFoundError naming every path tried otherwise."""
        tried = self.candidates(key)
        for p in tried:
            if p.is_file():
                return p
        raise FileNotFoundError(f"DiskProposer: no precomputed masks for key {os.fspath(key)!r}; "
                                f"tried {', '.join(str(p) for p in tried)}")

    def load(self, key: str | os.PathLike) -> Proposals:
        path = self.path_for(key)
        if path.suffix == ".npz":
            return self._load_npz(path)
        return self._load_png(path)

    def _load_npz(self, path: Path) -> Proposals:
        with np.load(path, allow_pickle=False) as data:
            if "masks" not in data.files:
                raise KeyError(f"DiskProposer: {path} has keys {sorted(data.files)}; expected 'masks' "
                               f"(M, H, W) and optionally 'scores' (M,)")
            masks = data["masks"]
            scores = data["scores"] if "scores" in data.files else None
        if masks.ndim != 3:
            raise ValueError(f"DiskProposer: {path}: 'masks' must be (M, H, W), got shape {masks.shape}")
        if scores is None:
            scores = np.full(masks.shape[0], self.default_score, dtype=np.float32)
        elif scores.shape != (masks.shape[0],):
            raise ValueError(f"DiskProposer: {path}: 'scores' must be ({masks.shape[0]},), got shape {scores.shape}")
        if masks.dtype != np.bool_ and not np.issubdtype(masks.dtype, np.integer):
            raise TypeError(f"DiskProposer: {path}: 'masks' must be bool or 0/1 integers, got {masks.dtype}")
        return paint_disjoint(torch.from_numpy(np.ascontiguousarray(masks)),
                              torch.from_numpy(scores.astype(np.float32)),
                              score_thresh=self.score_thresh, min_area=self.min_area)

    def _load_png(self, path: Path) -> Proposals:
        from PIL import Image
        with Image.open(path) as im:
            if im.mode not in ("L", "P", "I", "I;16", "I;16B", "I;16L"):
                raise ValueError(f"DiskProposer: {path} is a {im.mode} image; expected a single-channel id map "
                                 f"(8- or 16-bit)")
            ids = np.array(im)
        ids = ids.astype(np.int64)
        sidecar = path.with_suffix(".json")
        scores = None
        if sidecar.is_file():
            raw = json.loads(sidecar.read_text())
            if isinstance(raw, dict):
                scores = {int(k): float(v) for k, v in raw.items()}
            elif isinstance(raw, list):
                scores = [float(v) for v in raw]
            else:
                raise ValueError(f"DiskProposer: {sidecar} must hold a list or a dict of scores, got "
                                 f"{type(raw).__name__}")
        elif ids.max(initial=0) > 0:
            scores = [self.default_score] * int(ids.max())
        return Proposals.from_id_map(torch.from_numpy(ids), scores, score_thresh=self.score_thresh,
                                     min_area=self.min_area)

    def __call__(self, image: torch.Tensor | None = None, *, key: str | os.PathLike) -> Proposals:
        props = self.load(key)
        if image is not None:
            image = check_image(image)
            if tuple(image.shape[-2:]) != props.image_size:
                raise ValueError(f"DiskProposer: masks for key {os.fspath(key)!r} are {props.image_size[0]}x"
                                 f"{props.image_size[1]}, the image is {image.shape[1]}x{image.shape[2]}")
            props = props.to(image.device)
        return props
