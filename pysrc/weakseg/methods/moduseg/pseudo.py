"""ModuSeg's pseudo label maps, the bank build's first step, per training image: a PNG from a
directory (:class:`PseudoMaskDir`; values = class ids, 255 = ignore), or the output of any weakseg
method run with the image-level labels: its scores are restricted to the image's classes (the
background always allowed; "logit filtering", :func:`pseudo_labels_from_scores`) and arg-maxed; with
``pseudo_majority`` every proposal region then takes the majority class of its pixels
(:func:`majority_in_regions`, the reference's "map correction")."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch

from weakseg.core import IGNORE_INDEX
from weakseg.methods.common import has_background

__all__ = ["PseudoMaskDir", "pseudo_labels_from_scores", "majority_in_regions", "pseudo_label_map"]


def pseudo_labels_from_scores(scores: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Logit filtering: per-class scores (C, H, W) with the classes not in ``allowed`` (C,) bool set to
    -inf, then argmax (first maximum on ties) -> (H, W) int64."""
    if scores.dim() != 3 or allowed.shape != (scores.shape[0],):
        raise ValueError(f"pseudo_labels_from_scores: expected scores (C, H, W) and allowed (C,), got "
                         f"{tuple(scores.shape)} and {tuple(allowed.shape)}")
    if not bool(allowed.any()):
        raise ValueError("pseudo_labels_from_scores: no class is allowed")
    s = scores.float().masked_fill(~allowed.to(scores.device).view(-1, 1, 1), float("-inf"))
    return s.nan_to_num(nan=float("-inf")).argmax(0)


def majority_in_regions(label_map: torch.Tensor, masks: torch.Tensor, num_classes: int,
                        ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Every region of ``masks`` (M, H, W) bool takes the most frequent class of its pixels (ties: the
    smaller class id; ignored pixels do not vote); pixels outside every region keep their label."""
    out = label_map.clone()
    for m in masks:
        vals = label_map[m]
        vals = vals[vals != ignore_index]
        if vals.numel():
            out[m] = int(torch.bincount(vals, minlength=num_classes).argmax())
    return out


class PseudoMaskDir:
    """Pseudo label maps on disk: ``root/<sample name>.png`` (or ``root/<name's last part>.png``), a
    single-channel PNG of class ids (palette or grey; 255 = ignore) at the image's size."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise FileNotFoundError(f"--pseudo-masks: directory {self.root} does not exist (expected a folder of "
                                    f"<sample name>.png class-id maps)")

    def path_for(self, name: str) -> Path:
        tried = [self.root / f"{name}.png", self.root / f"{Path(name).name}.png"]
        for p in tried:
            if p.is_file():
                return p
        raise FileNotFoundError(f"--pseudo-masks: no pseudo mask for sample {name!r}; tried "
                                f"{', '.join(str(p) for p in dict.fromkeys(tried))}")

    def __call__(self, name: str, size: tuple[int, int]) -> torch.Tensor:
        from weakseg.data.datasets import read_id_png

        path = self.path_for(name)
        arr = read_id_png(path)
        if tuple(arr.shape) != tuple(size):
            raise ValueError(f"--pseudo-masks: {path} is {arr.shape[0]}x{arr.shape[1]}, the image of sample {name!r} "
                             f"is {size[0]}x{size[1]}")
        return torch.from_numpy(arr)


def pseudo_label_map(seg, sample, class_names: Sequence[str], source) -> torch.Tensor:
    """The pseudo label map (H, W) int64 of one dataset ``sample`` for the ModuSeg segmenter ``seg``
    (its ``config`` and ``proposer``): from a :class:`PseudoMaskDir`, or from a segmenter run with the
    sample's image-level labels (logit filtering), then the per-proposal majority when
    ``pseudo_majority`` is on."""
    image = sample.image
    H, W = image.shape[-2:]
    C = len(class_names)
    if isinstance(source, PseudoMaskDir):
        lab = source(sample.name, (H, W))
    else:
        given = [c for c in (sample.image_labels or []) if 0 <= int(c) < C]
        labels = None
        if given:
            labels = torch.zeros(1, C, dtype=torch.bool)
            labels[0, given] = True
            if has_background(class_names):
                labels[0, 0] = True
        out = source.segment([image], list(class_names), labels)
        if tuple(out.scores.shape[-2:]) != (H, W) or out.scores.shape[1] != C:
            raise ValueError(f"pseudo method: returned scores {tuple(out.scores.shape)} for a {H}x{W} image with "
                             f"{C} classes")
        allowed = labels[0] if labels is not None else torch.ones(C, dtype=torch.bool)
        lab = pseudo_labels_from_scores(out.scores[0].cpu(), allowed)
    if seg.config.pseudo_majority:
        props = seg.proposer(image) if seg.config.proposer != "disk" else seg.proposer(image, key=sample.name)
        m = props.masks
        thr = seg.config.pseudo_thresh()
        if thr is not None:
            m = m[props.scores >= thr]
        lab = majority_in_regions(lab.to(torch.int64), m.cpu(), C)
    return lab.to(torch.int64)
