"""Image-caption pairs for caption-supervised training (SynSeg, ``weakseg train synseg``).

Every reader is map-style (``len`` + ``[i]`` -> :class:`CaptionSample`), so a training loop can
shard and order it deterministically (exact resume, one share per rank). Captions are read when the
reader is opened (they are small); images are decoded on access.

- :class:`WebDatasetShards`: webdataset tar shards — members grouped by key, webdataset's convention
  (the key is the member path up to the first "." of its file name, the rest is the extension); a
  sample needs an image (``jpg``, ``jpeg``, ``png``, ``webp``, ``bmp``) and a ``txt`` caption (a
  ``json`` member with a ``"caption"`` field is read when there is no ``txt``). Read with the standard
  library's :mod:`tarfile` (random access to members; the ``webdataset`` package is not needed).
- :class:`CaptionFolder`: image files with a caption in a text file of the same stem (``a.jpg`` +
  ``a.txt``), optionally in subfolders; images without a caption are skipped.

:func:`open_caption_dataset` picks one from a path (a ``.tar`` file, a folder of ``.tar`` shards, a
glob of shards or an image/caption folder) or the name ``"toyworld"``.
"""

from __future__ import annotations

import glob
import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from weakseg.io import read_image

__all__ = ["CaptionSample", "WebDatasetShards", "CaptionFolder", "open_caption_dataset",
           "IMAGE_KEYS"]

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "bmp")


@dataclass
class CaptionSample:
    image: torch.Tensor  # (3, H, W) uint8 RGB
    caption: str
    key: str


def _decode(data: bytes, what: str) -> torch.Tensor:
    return read_image(data, what)  # 16-bit images rescaled; ImageReadError (a ValueError) names ``what``


class WebDatasetShards:
    """Samples of webdataset tar shards (see the module docstring). ``shards``: tar paths, in order."""

    def __init__(self, shards: Sequence[str | os.PathLike]):
        self.shards = [Path(s) for s in shards]
        if not self.shards:
            raise ValueError("shards: expected at least one .tar file")
        self._index: list[tuple[int, tarfile.TarInfo, str]] = []  # (shard, image member, key)
        self.captions: list[str] = []
        self.keys: list[str] = []
        for si, path in enumerate(self.shards):
            if not path.is_file():
                raise FileNotFoundError(f"shards: no such tar file {str(path)!r}")
            try:
                tf = tarfile.open(path, "r")
            except tarfile.TarError as e:
                raise ValueError(f"shards: {str(path)!r} is not a readable tar file ({e})") from None
            with tf:
                groups: dict[str, dict[str, tarfile.TarInfo]] = {}
                order: list[str] = []
                for m in tf.getmembers():
                    if not m.isfile():
                        continue
                    d, base = os.path.split(m.name)
                    if "." not in base or base.startswith("."):
                        continue
                    stem, ext = base.split(".", 1)
                    key = f"{d}/{stem}" if d else stem
                    if key not in groups:
                        groups[key] = {}
                        order.append(key)
                    groups[key][ext.lower()] = m
                for key in order:
                    g = groups[key]
                    img = next((g[e] for e in IMAGE_KEYS if e in g), None)
                    if img is None:
                        continue
                    caption = None
                    if "txt" in g:
                        caption = tf.extractfile(g["txt"]).read().decode("utf-8", "replace").strip()
                    elif "json" in g:
                        try:
                            caption = json.loads(tf.extractfile(g["json"]).read()).get("caption")
                        except (json.JSONDecodeError, AttributeError):
                            caption = None
                    if not caption:
                        continue
                    self._index.append((si, img, key))
                    self.captions.append(str(caption))
                    self.keys.append(key)
        if not self._index:
            raise ValueError(f"shards: no (image, caption) pair found in {len(self.shards)} tar file(s); expected "
                             f"members <key>.jpg|png + <key>.txt")
        self._handles: dict[tuple[int, int], tarfile.TarFile] = {}

    def __len__(self) -> int:
        return len(self._index)

    def _tar(self, si: int) -> tarfile.TarFile:
        k = (os.getpid(), si)  # one handle per process (DataLoader workers fork)
        if k not in self._handles:
            self._handles[k] = tarfile.open(self.shards[si], "r")
        return self._handles[k]

    def __getitem__(self, i: int) -> CaptionSample:
        si, member, key = self._index[i]
        data = self._tar(si).extractfile(member).read()
        return CaptionSample(_decode(data, f"{self.shards[si]}:{member.name}"), self.captions[i], key)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state


class CaptionFolder:
    """Image files under ``root`` (``recursive`` optional) that have a same-stem ``.txt`` caption."""

    def __init__(self, root: str | os.PathLike, recursive: bool = True):
        from weakseg.data.datasets import IMAGE_EXTENSIONS

        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"root: no such folder {str(self.root)!r} (images + same-stem .txt captions)")
        it = self.root.rglob("*") if recursive else self.root.iterdir()
        files = sorted((p for p in it if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS),
                       key=lambda p: p.relative_to(self.root).as_posix())
        self.paths: list[Path] = []
        self.captions: list[str] = []
        self.keys: list[str] = []
        for p in files:
            txt = p.with_suffix(".txt")
            if not txt.is_file():
                continue
            cap = txt.read_text(errors="replace").strip()
            if cap:
                self.paths.append(p)
                self.captions.append(cap)
                self.keys.append(p.relative_to(self.root).with_suffix("").as_posix())
        if not self.paths:
            raise ValueError(f"root: no image with a same-stem .txt caption in {str(self.root)!r}")

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> CaptionSample:
        return CaptionSample(_decode(self.paths[i].read_bytes(), str(self.paths[i])), self.captions[i], self.keys[i])


def open_caption_dataset(source: str | os.PathLike, limit: int | None = None, split: str | None = None):
    """``"toyworld"`` (``limit`` scenes, default 1000), a ``.tar`` file, a glob of them, a folder of ``.tar``
    shards, or an image/caption folder."""
    from weakseg.core import GENERATED_DATASETS

    s = os.fspath(source)
    if f"{s}-captions" in GENERATED_DATASETS:  # a generated world's captions ("toyworld")
        return GENERATED_DATASETS.get(f"{s}-captions")(split or "train", num_scenes=limit if limit is not None
                                                         else 1000)
    if any(ch in s for ch in "*?["):
        shards = sorted(glob.glob(s))
        if not shards:
            raise FileNotFoundError(f"data: the pattern {s!r} matches no file")
        return WebDatasetShards(shards)
    p = Path(s)
    if p.is_file():
        if not tarfile.is_tarfile(p):
            raise ValueError(f"data: {s!r} is a file but not a tar shard")
        return WebDatasetShards([p])
    if p.is_dir():
        shards = sorted(p.glob("*.tar"))
        return WebDatasetShards(shards) if shards else CaptionFolder(p)
    raise FileNotFoundError(f"data: no such file or folder {s!r} (expected .tar shards, a folder of them, an "
                            f"image/caption folder or 'toyworld')")
