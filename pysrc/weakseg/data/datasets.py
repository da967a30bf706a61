"""Readers for the segmentation benchmarks, in the devkit / MMSegmentation layouts.

Every reader is a :class:`SegDataset` (a ``torch.utils.data.Dataset``) whose
items are :class:`Sample` s:

- ``image``: (3, H, W) uint8 RGB tensor;
- ``label``: (H, W) int64 class ids in [0, num_classes), 255 = ignore (None for
  unlabelled readers);
- ``image_labels``: the sorted class ids present in ``label`` (255 excluded).
  For datasets with a background class, 0 is always included (ModuSeg's
  image-level label files always contain background; pass
  ``always_background=False`` to list 0 only where the mask has it);
- ``name``: the image id (file stem, or the relative path for folders);
- ``meta``: ``{"image_path", "label_path"}`` of the files read.

DataLoaders over images of different sizes use ``collate_fn=collate_samples`` (a list).

Layouts (``root`` may be the directory named first or, where noted, its parent):

``voc``          ``[VOCdevkit/]VOC2012/{JPEGImages/<id>.jpg, SegmentationClass/<id>.png,
                 SegmentationClassAug/<id>.png, ImageSets/Segmentation/<split>.txt}``.
                 Splits train / val / trainval read ``SegmentationClass`` (palette PNGs,
                 255 = boundary) and fall back to ``SegmentationClassAug`` when the former is
                 absent; split ``train_aug`` (alias ``aug``) reads the ids from
                 ``ImageSets/Segmentation/train_aug.txt`` or MMSegmentation's ``aug.txt``
                 (first found) and the labels from ``SegmentationClassAug``. ``label_dir``
                 overrides the label folder. 21 classes with background.
``coco_object``  ``{train2014,val2014}/*.jpg`` + ``annotations/instances_{train,val}2014.json``.
                 Needs pycocotools. The 80 categories map, in ascending COCO id, to 1..80;
                 0 = background (81 classes). Label maps are rasterised from the instance
                 polygons / RLEs, **largest annotation area first** so smaller objects stay on
                 top (ties: ascending annotation id; crowd regions are painted like the rest),
                 and cached as PNG id maps in ``cache_dir/<split>2014-<fingerprint>/``
                 (default ``cache_dir = <root>/weakseg_cache/coco_object``), written
                 atomically, on first access or all at once with :meth:`COCOObject.prepare`.
                 The fingerprint covers the annotation file's size and mtime, so an edited
                 JSON gets a fresh cache; a complete cache is reused without reading the JSON.
``context59``    ``[VOCdevkit/]VOC2010/{JPEGImages/<id>.jpg, SegmentationClassContext/<id>.png,
``context60``    ImageSets/SegmentationContext/{train,val}.txt}`` (MMSegmentation's converted
                 PASCAL Context, PNG values 0 = background, 1..59). ``context60``: ids as
                 stored (60 classes, background 0). ``context59``: background -> 255 and
                 1..59 -> 0..58 (59 classes, no background).
``cityscapes``   ``leftImg8bit/<split>/<city>/<stem>_leftImg8bit.png`` +
                 ``gtFine/<split>/<city>/<stem>_gtFine_labelTrainIds.png`` (used as is) or
                 ``..._gtFine_labelIds.png`` (converted with the standard 34 -> 19 table);
                 ``label_type="auto"`` prefers trainIds per image. 19 classes, no background.
``ade20k``       ``[ADEChallengeData2016/]{images,annotations}/{training,validation}/<stem>.{jpg,png}``;
                 GT 0 -> 255, 1..150 -> 0..149. 150 classes, no background. Splits
                 train / val (or training / validation).
``coco_stuff``   ``images/{train2017,val2017}/<stem>.jpg`` +
                 ``annotations/{train2017,val2017}/<stem>_labelTrainIds.png`` (MMSegmentation's
                 COCO-Stuff164k; 171 classes, 255 = ignore, no background). The 27-class coarse
                 variant is not provided.
``folder``       every image file (``.jpg .jpeg .png .bmp .webp .tif .tiff``) directly under
                 ``root`` (or below it with ``recursive=True``), sorted; no labels.

Each reader checks its layout when constructed and raises :class:`DatasetLayoutError`
(a ``FileNotFoundError``) naming the missing file or folder and the expected layout.
Label values outside [0, num_classes) other than 255 raise a ``ValueError`` naming the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image

from weakseg.data.classnames import (
    ADE20K_CLASSES, CITYSCAPES_CLASSES, CITYSCAPES_LABELID_TO_TRAINID, CLASS_RENAMES, COCO_OBJECT_CLASSES,
    COCO_STUFF_CLASSES, COCO_THING_IDS, CONTEXT59_CLASSES, CONTEXT60_CLASSES, VOC_CLASSES, rename_classes,
)
from weakseg.io import read_image, save_png, write_json

__all__ = [
    "Sample", "SegDataset", "DatasetLayoutError", "VOCSegmentation", "COCOObject", "PascalContext59",
    "PascalContext60", "Cityscapes", "ADE20K", "COCOStuff", "ImageFolder", "DATASETS", "open_dataset",
    "collate_samples", "IMAGE_EXTENSIONS",
]

IGNORE_INDEX = 255
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


class DatasetLayoutError(FileNotFoundError):
    """A dataset folder does not have the expected layout."""


@dataclass
class Sample:
    """One dataset item (see the module docstring)."""

    image: torch.Tensor
    label: torch.Tensor | None
    image_labels: list[int]
    name: str
    meta: dict[str, Any] = field(default_factory=dict)


def collate_samples(batch: Sequence[Sample]) -> list[Sample]:
    """A DataLoader ``collate_fn`` that keeps samples (of different sizes) as a list."""
    return list(batch)


# ---------------------------------------------------------------------------------------- helpers
def read_rgb(path: str | os.PathLike) -> torch.Tensor:
    """An image file as a (3, H, W) uint8 RGB tensor (:func:`weakseg.io.read_image`: 16-bit images are
    rescaled, unreadable files raise a ValueError naming the file)."""
    return read_image(path, "dataset image")


def read_id_png(path: str | os.PathLike) -> np.ndarray:
    """A single-channel class-id PNG (palette indices or grey values) as an int64 (H, W) array."""
    with Image.open(path) as im:
        if im.mode not in ("P", "L", "I", "I;16", "I;16B", "I;16L"):
            raise ValueError(f"label map {path}: expected a single-channel class-id PNG (palette or grey), "
                             f"got mode {im.mode}")
        return np.asarray(im).astype(np.int64)


def _layout_error(dataset: str, missing: Path | str, layout: str, what: str = "") -> DatasetLayoutError:
    what = f" ({what})" if what else ""
    return DatasetLayoutError(f"{dataset}: missing {missing}{what}; expected the layout {layout}")


def _locate(root: Path, marker: str, prefixes: Sequence[str], dataset: str, layout: str) -> Path:
    """The first of root/<prefix> (prefix "" = root itself) that contains ``marker``."""
    if not root.exists():
        raise _layout_error(dataset, root, layout, "the dataset root")
    for pre in prefixes:
        base = root / pre if pre else root
        if (base / marker).exists():
            return base
    tried = ", ".join(str((root / pre if pre else root) / marker) for pre in prefixes)
    raise _layout_error(dataset, f"{marker} under {root} (looked for {tried})", layout)


def _require_dir(path: Path, dataset: str, layout: str) -> Path:
    if not path.is_dir():
        raise _layout_error(dataset, path, layout, "a folder")
    return path


def _require_file(path: Path, dataset: str, layout: str) -> Path:
    if not path.is_file():
        raise _layout_error(dataset, path, layout, "a file")
    return path


def _read_ids(path: Path) -> list[str]:
    """Image ids from a split file: the first token of each non-empty line, path and extension dropped
    (so both ``2007_000032`` and ``/JPEGImages/2007_000032.jpg /SegmentationClassAug/...`` work)."""
    ids = []
    for line in path.read_text().splitlines():
        tok = line.strip().split()
        if tok:
            ids.append(Path(tok[0]).stem)
    return ids


def _check_all_present(dataset: str, kind: str, paths: Sequence[Path], layout: str, source: str) -> None:
    """Raise naming the first missing file when any of ``paths`` does not exist (one listdir per folder)."""
    listing: dict[Path, set[str]] = {}
    missing = []
    for p in paths:
        names = listing.get(p.parent)
        if names is None:
            names = set(os.listdir(p.parent)) if p.parent.is_dir() else set()
            listing[p.parent] = names
        if p.name not in names:
            missing.append(p)
    if missing:
        raise _layout_error(dataset, missing[0], layout,
                            f"{kind} for {len(missing)} of the {len(paths)} images listed by {source}")


# ---------------------------------------------------------------------------------------- base
class SegDataset(torch.utils.data.Dataset):
    """Base of the readers: a list of (name, image path, label path or None) and a label conversion.

    Subclasses set ``dataset_name``, ``base_class_names``, ``has_background`` and fill
    ``self._items`` in ``__init__``; they may override :meth:`convert_label` (raw PNG values ->
    class ids with 255 = ignore) and :meth:`load_label`.

    Args common to all readers:
        transform: optional ``Sample -> Sample`` callable applied last.
        always_background: for datasets with background, list 0 in every ``image_labels``.
        class_names: None (the dataset's names), the name of a method rename table in
            ``CLASS_RENAMES[dataset_name]`` (e.g. "moduseg"), or an explicit list of
            ``num_classes`` names.
    """

    dataset_name = "dataset"
    base_class_names: Sequence[str] = ()
    has_background = False
    ignore_index = IGNORE_INDEX
    layout = ""

    def __init__(self, root: str | os.PathLike, split: str | None, transform: Callable[[Sample], Sample] | None = None,
                 always_background: bool = True, class_names: str | Sequence[str] | None = None):
        self.root = Path(root)
        self.split = split
        self.transform = transform
        self.always_background = bool(always_background)
        self._items: list[tuple[str, Path, Path | None]] = []
        self.class_names = self._resolve_names(class_names)

    def _resolve_names(self, class_names: str | Sequence[str] | None) -> list[str]:
        base = list(self.base_class_names)
        if class_names is None:
            return base
        if isinstance(class_names, str):
            tables = CLASS_RENAMES.get(self.dataset_name, {})
            if class_names not in tables:
                known = ", ".join(sorted(tables)) or "none"
                raise ValueError(f"{self.dataset_name}: class_names={class_names!r} is not a rename table of "
                                 f"this dataset; known: {known}")
            return rename_classes(base, tables[class_names])
        names = [str(n) for n in class_names]
        if len(names) != len(base):
            raise ValueError(f"{self.dataset_name}: class_names has {len(names)} names, the dataset has "
                             f"{len(base)} classes")
        return names

    # ---- the dataset protocol
    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def names(self) -> list[str]:
        return [n for n, _, _ in self._items]

    def __len__(self) -> int:
        return len(self._items)

    def image_path(self, i: int) -> Path:
        return self._items[i][1]

    def label_path(self, i: int) -> Path | None:
        return self._items[i][2]

    def convert_label(self, raw: np.ndarray, i: int) -> np.ndarray:
        """Raw label-file values of item ``i`` -> class ids (255 = ignore). The default keeps them."""
        return raw

    def load_label(self, i: int) -> torch.Tensor | None:
        """The (H, W) int64 label map of item ``i`` (None for unlabelled datasets)."""
        path = self.label_path(i)
        if path is None:
            return None
        lab = self.convert_label(read_id_png(path), i)
        bad = (lab != self.ignore_index) & ((lab < 0) | (lab >= self.num_classes))
        if bad.any():
            vals = np.unique(lab[bad])[:5].tolist()
            raise ValueError(f"{self.dataset_name}: label map {path} holds values {vals} outside "
                             f"[0, {self.num_classes}) and != {self.ignore_index} after conversion")
        return torch.from_numpy(np.ascontiguousarray(lab, dtype=np.int64))

    def image_labels_of(self, label: torch.Tensor | None) -> list[int]:
        """The sorted class ids present in ``label`` (see ``always_background``)."""
        if label is None:
            return []
        present = {int(v) for v in torch.unique(label).tolist() if v != self.ignore_index}
        if self.has_background and self.always_background:
            present.add(0)
        return sorted(present)

    def __getitem__(self, i: int) -> Sample:
        if not -len(self) <= i < len(self):
            raise IndexError(f"{self.dataset_name}: index {i} out of range for {len(self)} images")
        i = i % len(self)
        name, img_path, _ = self._items[i]
        image = read_rgb(img_path)
        label = self.load_label(i)
        if label is not None and tuple(label.shape) != tuple(image.shape[1:]):
            raise ValueError(f"{self.dataset_name}: label map {self.label_path(i)} is {tuple(label.shape)} but "
                             f"image {img_path} is {tuple(image.shape[1:])}")
        sample = Sample(image=image, label=label, image_labels=self.image_labels_of(label), name=name,
                        meta={"image_path": str(img_path), "label_path": str(self.label_path(i) or "")})
        return self.transform(sample) if self.transform is not None else sample

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(root={str(self.root)!r}, split={self.split!r}, images={len(self)}, "
                f"classes={self.num_classes})")


def _split_name(dataset: str, split: str, aliases: dict[str, str]) -> str:
    if split not in aliases:
        raise ValueError(f"{dataset}: unknown split {split!r}; expected one of {', '.join(sorted(aliases))}")
    return aliases[split]


# ---------------------------------------------------------------------------------------- VOC
class VOCSegmentation(SegDataset):
    """PASCAL VOC 2012 (+ SBD ``train_aug``); see the module docstring for the layout."""

    dataset_name = "voc"
    base_class_names = VOC_CLASSES
    has_background = True
    layout = ("[VOCdevkit/]VOC2012/{JPEGImages/<id>.jpg, SegmentationClass/<id>.png, "
              "SegmentationClassAug/<id>.png, ImageSets/Segmentation/{train,val,trainval,train_aug|aug}.txt}")

    def __init__(self, root, split: str = "val", label_dir: str | None = None, **kw):
        super().__init__(root, split, **kw)
        split = _split_name("voc", split, {"train": "train", "val": "val", "trainval": "trainval",
                                           "train_aug": "train_aug", "aug": "train_aug"})
        base = _locate(self.root, "JPEGImages", ["", "VOC2012", "VOCdevkit/VOC2012"], "voc", self.layout)
        self.base = base
        sets = base / "ImageSets" / "Segmentation"
        if split == "train_aug":
            cands = [sets / "train_aug.txt", sets / "aug.txt"]
            ids_file = next((c for c in cands if c.is_file()), None)
            if ids_file is None:
                raise _layout_error("voc", f"{cands[0]} (or {cands[1].name})", self.layout, "the train_aug id list")
            label_dir = label_dir or "SegmentationClassAug"
        else:
            ids_file = _require_file(sets / f"{split}.txt", "voc", self.layout)
            if label_dir is None:
                label_dir = "SegmentationClass" if (base / "SegmentationClass").is_dir() else "SegmentationClassAug"
        labels = _require_dir(base / label_dir, "voc", self.layout)
        self.label_dir = labels
        ids = _read_ids(ids_file)
        images = [base / "JPEGImages" / f"{i}.jpg" for i in ids]
        lab_paths = [labels / f"{i}.png" for i in ids]
        _check_all_present("voc", "image", images, self.layout, str(ids_file))
        _check_all_present("voc", "label map", lab_paths, self.layout, str(ids_file))
        self._items = list(zip(ids, images, lab_paths))


# ---------------------------------------------------------------------------------------- COCO object
_COCO_CAT_TO_LABEL = {cat: i + 1 for i, cat in enumerate(COCO_THING_IDS)}
_COCO_CACHE_VERSION = 1


class COCOObject(SegDataset):
    """COCO 2014 object segmentation (81 classes), label maps rasterised from the instance
    annotations with pycocotools and cached as PNGs (see the module docstring).

    Args:
        split: "train" / "val" (or "train2014" / "val2014").
        cache_dir: where the PNG id maps go (default ``<root>/weakseg_cache/coco_object``).
        skip_unannotated: leave out images without any annotation (ModuSeg's image-level label
            files list only annotated images: 82,081 train / 40,137 val).
        prepare: rasterise every missing label map now (with a progress bar) instead of on access.
    """

    dataset_name = "coco_object"
    base_class_names = COCO_OBJECT_CLASSES
    has_background = True
    layout = "{train2014,val2014}/<file_name>.jpg + annotations/instances_{train,val}2014.json"

    def __init__(self, root, split: str = "val", cache_dir: str | os.PathLike | None = None,
                 skip_unannotated: bool = False, prepare: bool = False, **kw):
        super().__init__(root, split, **kw)
        split = _split_name("coco_object", split, {"train": "train2014", "val": "val2014",
                                                   "train2014": "train2014", "val2014": "val2014"})
        if not self.root.is_dir():
            raise _layout_error("coco_object", self.root, self.layout, "the dataset root")
        self.image_dir = _require_dir(self.root / split, "coco_object", self.layout)
        self.ann_file = _require_file(self.root / "annotations" / f"instances_{split}.json", "coco_object",
                                      self.layout)
        st = self.ann_file.stat()
        fp_src = json.dumps({"size": st.st_size, "mtime_ns": st.st_mtime_ns, "version": _COCO_CACHE_VERSION,
                             "order": "area-desc", "skip_unannotated": bool(skip_unannotated)})
        fingerprint = hashlib.sha1(fp_src.encode()).hexdigest()[:12]
        base_cache = Path(cache_dir) if cache_dir is not None else self.root / "weakseg_cache" / "coco_object"
        self.cache_dir = base_cache / f"{split}-{fingerprint}"
        self.skip_unannotated = bool(skip_unannotated)
        self._coco = None
        index_file = self.cache_dir / "index.json"
        index = None
        if index_file.is_file():
            try:
                index = json.loads(index_file.read_text())["images"]
            except (ValueError, KeyError):
                index = None
        if index is None:
            index = self._build_index()
            try:
                self.cache_dir.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise OSError(f"coco_object: cannot create the label-map cache {self.cache_dir} ({e}); "
                              "pass a writable cache_dir=") from None
            write_json(index_file, {"fingerprint": json.loads(fp_src), "annotations": str(self.ann_file),
                                    "images": index}, indent=None)
        self._image_ids = {}
        items = []
        for image_id, file_name in index:
            stem = Path(file_name).stem
            self._image_ids[stem] = image_id
            items.append((stem, self.image_dir / file_name, self.cache_dir / f"{stem}.png"))
        _check_all_present("coco_object", "image", [p for _, p, _ in items], self.layout, str(self.ann_file))
        self._items = items
        if prepare:
            self.prepare()

    def _load_coco(self):
        if self._coco is None:
            try:
                from pycocotools.coco import COCO
            except ImportError:
                raise ImportError("coco_object: rasterising the COCO instance annotations needs pycocotools "
                                  "(pip install pycocotools, or the weakseg[data] extra)") from None
            import contextlib
            import io

            with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
                self._coco = COCO(str(self.ann_file))
            unknown = sorted(set(self._coco.getCatIds()) - set(COCO_THING_IDS))
            if unknown:
                raise ValueError(f"coco_object: {self.ann_file} has category ids {unknown[:5]} outside the 80 "
                                 f"COCO object categories")
        return self._coco

    def _build_index(self) -> list[list]:
        coco = self._load_coco()
        out = []
        for image_id in sorted(coco.getImgIds()):
            if self.skip_unannotated and not coco.getAnnIds(imgIds=image_id, iscrowd=None):
                continue
            out.append([int(image_id), coco.imgs[image_id]["file_name"]])
        return out

    def rasterize(self, image_id: int) -> np.ndarray:
        """The (H, W) uint8 label map of ``image_id`` from its instance annotations (largest area first)."""
        coco = self._load_coco()
        info = coco.imgs[image_id]
        label = np.zeros((info["height"], info["width"]), dtype=np.uint8)
        anns = coco.loadAnns(coco.getAnnIds(imgIds=image_id, iscrowd=None))
        with warnings.catch_warnings():  # pycocotools' decode trips NumPy 2's __array__(copy=) deprecation
            warnings.simplefilter("ignore", DeprecationWarning)
            for ann in sorted(anns, key=lambda a: (-float(a.get("area", 0.0)), a["id"])):
                label[coco.annToMask(ann) > 0] = _COCO_CAT_TO_LABEL[ann["category_id"]]
        return label

    def load_label(self, i: int) -> torch.Tensor:
        path = self.label_path(i)
        if not path.is_file():
            name = self._items[i][0]
            save_png(self.rasterize(self._image_ids[name]).astype(np.uint8), path)
        return super().load_label(i)

    def prepare(self, progress: bool = True) -> None:
        """Rasterise and cache every label map not cached yet."""
        todo = [i for i in range(len(self)) if not self.label_path(i).is_file()]
        if not todo:
            return
        from tqdm.auto import tqdm

        for i in tqdm(todo, desc="coco_object: rasterising label maps", disable=not progress):
            save_png(self.rasterize(self._image_ids[self._items[i][0]]).astype(np.uint8), self.label_path(i))


# ---------------------------------------------------------------------------------------- Context
class PascalContext60(SegDataset):
    """PASCAL Context with background (60 classes), MMSegmentation layout."""

    dataset_name = "context60"
    base_class_names = CONTEXT60_CLASSES
    has_background = True
    layout = ("[VOCdevkit/]VOC2010/{JPEGImages/<id>.jpg, SegmentationClassContext/<id>.png, "
              "ImageSets/SegmentationContext/{train,val}.txt}")

    def __init__(self, root, split: str = "val", **kw):
        super().__init__(root, split, **kw)
        split = _split_name(self.dataset_name, split, {"train": "train", "val": "val"})
        base = _locate(self.root, "JPEGImages", ["", "VOC2010", "VOCdevkit/VOC2010"], self.dataset_name,
                       self.layout)
        ids_file = _require_file(base / "ImageSets" / "SegmentationContext" / f"{split}.txt", self.dataset_name,
                                 self.layout)
        labels = _require_dir(base / "SegmentationClassContext", self.dataset_name, self.layout)
        ids = _read_ids(ids_file)
        images = [base / "JPEGImages" / f"{i}.jpg" for i in ids]
        lab_paths = [labels / f"{i}.png" for i in ids]
        _check_all_present(self.dataset_name, "image", images, self.layout, str(ids_file))
        _check_all_present(self.dataset_name, "label map", lab_paths, self.layout, str(ids_file))
        self._items = list(zip(ids, images, lab_paths))


class PascalContext59(PascalContext60):
    """PASCAL Context without background (59 classes): stored 0 -> 255, 1..59 -> 0..58."""

    dataset_name = "context59"
    base_class_names = CONTEXT59_CLASSES
    has_background = False

    def convert_label(self, raw: np.ndarray, i: int) -> np.ndarray:
        return np.where((raw == 0) | (raw == IGNORE_INDEX), IGNORE_INDEX, raw - 1)


# ---------------------------------------------------------------------------------------- Cityscapes
_CITYSCAPES_LUT = np.full(256, IGNORE_INDEX, dtype=np.int64)
for _k, _v in CITYSCAPES_LABELID_TO_TRAINID.items():
    _CITYSCAPES_LUT[_k] = _v


class Cityscapes(SegDataset):
    """Cityscapes fine annotations, 19 classes (see the module docstring).

    ``label_type``: "auto" (trainIds where present, else labelIds), "trainIds" or "labelIds".
    """

    dataset_name = "cityscapes"
    base_class_names = CITYSCAPES_CLASSES
    has_background = False
    layout = ("leftImg8bit/<split>/<city>/<stem>_leftImg8bit.png + "
              "gtFine/<split>/<city>/<stem>_gtFine_labelTrainIds.png (or _gtFine_labelIds.png)")

    def __init__(self, root, split: str = "val", label_type: str = "auto", **kw):
        super().__init__(root, split, **kw)
        split = _split_name("cityscapes", split, {"train": "train", "val": "val", "test": "test"})
        if label_type not in ("auto", "trainIds", "labelIds"):
            raise ValueError(f"cityscapes: label_type must be 'auto', 'trainIds' or 'labelIds', got {label_type!r}")
        if not self.root.is_dir():
            raise _layout_error("cityscapes", self.root, self.layout, "the dataset root")
        img_root = _require_dir(self.root / "leftImg8bit" / split, "cityscapes", self.layout)
        gt_root = _require_dir(self.root / "gtFine" / split, "cityscapes", self.layout)
        images = sorted(img_root.glob("*/*_leftImg8bit.png"))
        if not images:
            raise _layout_error("cityscapes", f"{img_root}/<city>/*_leftImg8bit.png", self.layout, "no images found")
        self._is_label_ids: list[bool] = []
        items = []
        for img in images:
            stem = img.name[: -len("_leftImg8bit.png")]
            city = img.parent.name
            train = gt_root / city / f"{stem}_gtFine_labelTrainIds.png"
            ids = gt_root / city / f"{stem}_gtFine_labelIds.png"
            if label_type in ("auto", "trainIds") and train.is_file():
                lab, is_ids = train, False
            elif label_type in ("auto", "labelIds") and ids.is_file():
                lab, is_ids = ids, True
            else:
                want = {"auto": f"{train} or {ids.name}", "trainIds": str(train), "labelIds": str(ids)}[label_type]
                raise _layout_error("cityscapes", want, self.layout, f"the label map of {img.name}")
            items.append((stem, img, lab))
            self._is_label_ids.append(is_ids)
        self._items = items

    def convert_label(self, raw: np.ndarray, i: int) -> np.ndarray:
        return _CITYSCAPES_LUT[np.clip(raw, 0, 255)] if self._is_label_ids[i] else raw


def _image_annotation_pairs(root: Path, dataset: str, layout: str, split: str, prefixes: Sequence[str],
                            label_name: str) -> list[tuple[str, Path, Path]]:
    """The MMSegmentation layout ``images/<split>/<stem>.jpg`` + ``annotations/<split>/<label_name>``
    (``label_name`` formats ``{stem}``), found under ``root`` or one of ``prefixes``: (stem, image, label)
    items, every label checked to exist."""
    base = _locate(root, "images", prefixes, dataset, layout)
    img_dir = _require_dir(base / "images" / split, dataset, layout)
    ann_dir = _require_dir(base / "annotations" / split, dataset, layout)
    images = sorted(img_dir.glob("*.jpg"))
    if not images:
        raise _layout_error(dataset, f"{img_dir}/*.jpg", layout, "no images found")
    labels = [ann_dir / label_name.format(stem=p.stem) for p in images]
    _check_all_present(dataset, "label map", labels, layout, str(img_dir))
    return [(p.stem, p, lab) for p, lab in zip(images, labels)]


# ---------------------------------------------------------------------------------------- ADE20K
class ADE20K(SegDataset):
    """ADE20K SceneParsing (150 classes): GT 0 -> 255, 1..150 -> 0..149."""

    dataset_name = "ade20k"
    base_class_names = ADE20K_CLASSES
    has_background = False
    layout = "[ADEChallengeData2016/]{images,annotations}/{training,validation}/<stem>.{jpg,png}"

    def __init__(self, root, split: str = "val", **kw):
        super().__init__(root, split, **kw)
        split = _split_name("ade20k", split, {"train": "training", "val": "validation",
                                              "training": "training", "validation": "validation"})
        self._items = _image_annotation_pairs(self.root, "ade20k", self.layout, split, ["", "ADEChallengeData2016"],
                                              "{stem}.png")

    def convert_label(self, raw: np.ndarray, i: int) -> np.ndarray:
        return np.where((raw == 0) | (raw == IGNORE_INDEX), IGNORE_INDEX, raw - 1)


# ---------------------------------------------------------------------------------------- COCO-Stuff
class COCOStuff(SegDataset):
    """COCO-Stuff 164k (171 classes) in MMSegmentation's layout."""

    dataset_name = "coco_stuff"
    base_class_names = COCO_STUFF_CLASSES
    has_background = False
    layout = "images/{train2017,val2017}/<stem>.jpg + annotations/{train2017,val2017}/<stem>_labelTrainIds.png"

    def __init__(self, root, split: str = "val", **kw):
        super().__init__(root, split, **kw)
        split = _split_name("coco_stuff", split, {"train": "train2017", "val": "val2017",
                                                  "train2017": "train2017", "val2017": "val2017"})
        self._items = _image_annotation_pairs(self.root, "coco_stuff", self.layout, split, ["", "coco_stuff164k"],
                                              "{stem}_labelTrainIds.png")


# ---------------------------------------------------------------------------------------- folder
class ImageFolder(SegDataset):
    """Unlabelled images: every image file under ``root`` (recursive optional), sorted by relative path.
    ``name`` is the relative path without extension; ``label`` is None and ``image_labels`` empty.
    ``class_names`` may be given (the candidate classes to segment); default none."""

    dataset_name = "folder"
    has_background = False
    layout = "<root>/**/*.{" + ",".join(e.lstrip(".") for e in IMAGE_EXTENSIONS) + "}"

    def __init__(self, root, split: str | None = None, recursive: bool = False,
                 extensions: Sequence[str] = IMAGE_EXTENSIONS, class_names: Sequence[str] | None = None, **kw):
        self.base_class_names = tuple(class_names or ())
        super().__init__(root, split, class_names=None, **kw)
        if not self.root.is_dir():
            raise _layout_error("folder", self.root, self.layout, "an image folder")
        exts = {e.lower() if e.startswith(".") else "." + e.lower() for e in extensions}
        it = self.root.rglob("*") if recursive else self.root.iterdir()
        files = sorted((p for p in it if p.is_file() and p.suffix.lower() in exts),
                       key=lambda p: p.relative_to(self.root).as_posix())
        if not files:
            raise _layout_error("folder", f"image files ({', '.join(sorted(exts))}) in {self.root}", self.layout,
                                "none found" + ("" if recursive else "; pass recursive=True to search subfolders"))
        self._items = [(p.relative_to(self.root).with_suffix("").as_posix(), p, None) for p in files]


# ---------------------------------------------------------------------------------------- registry
DATASETS: dict[str, type[SegDataset]] = {
    "voc": VOCSegmentation,
    "coco_object": COCOObject,
    "context59": PascalContext59,
    "context60": PascalContext60,
    "cityscapes": Cityscapes,
    "ade20k": ADE20K,
    "coco_stuff": COCOStuff,
    "folder": ImageFolder,
}


def open_dataset(name: str, root: str | os.PathLike, split: str | None = "val", **kwargs: Any) -> SegDataset:
    """Open the dataset reader ``name`` (a key of :data:`DATASETS`) on ``root``."""
    if name not in DATASETS:
        raise KeyError(f"unknown dataset {name!r}; known: {', '.join(sorted(DATASETS))}")
    cls = DATASETS[name]
    if cls is ImageFolder:
        return cls(root, split, **kwargs)
    if split is None:
        raise ValueError(f"{name}: a split is required (e.g. 'val')")
    return cls(root, split, **kwargs)
