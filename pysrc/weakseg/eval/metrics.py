"""Segmentation metrics from one confusion matrix.

:class:`ConfusionMatrix` accumulates, over a whole dataset, how many pixels of
ground-truth class ``t`` were predicted as class ``p`` (rows = ground truth,
columns = prediction, the torchmetrics / mmseg orientation). Everything else is
derived from it:

- ``iou()`` per class: TP / (TP + FP + FN); NaN where a class has neither
  ground-truth nor predicted pixels (0 / 0).
- ``miou(convention)`` -- the conventions of the reference code differ only in
  how such classes are averaged:

  ``"all"``      plain mean over **all** C classes, a class absent from both GT
                 and prediction counting as IoU 0. This is ModuSeg's torchmetrics
                 ``MulticlassJaccardIndex(average=None)`` followed by ``.mean()``
                 (torchmetrics' ``zero_division=0``) and DiffSegmenter's
                 ``TP / (T + P - TP + 1e-10)`` averaged over every class
                 including background.
  ``"present"``  mean over the classes with at least one ground-truth pixel
                 (iSeg's ``nanmean(iu[hist.sum(1) > 0])``). A class predicted but
                 absent from the GT is left out of the mean; its false positives
                 still lower the IoU of the classes it was confused with.
  ``"union"``    mean over the classes with a non-empty union, i.e. present in
                 the GT or in the prediction (MMSegmentation's ``nanmean`` of
                 intersect / union, used by the TCL / SynSeg protocol).

  On a full dataset where every class occurs in the GT the three agree.
- ``pixel_accuracy()`` = Σ TP / number of counted GT pixels; ``mean_accuracy()``
  = mean over classes with GT pixels of TP / GT pixels; ``fw_iou()`` the
  GT-frequency-weighted IoU.
- ``confusion_ratio()`` per class = FP / TP, DiCLIP's confusion ratio (CR,
  lower is better): inf where TP = 0 < FP, NaN where TP = FP = 0.

All values are **fractions** in [0, 1] (CR is an unbounded ratio);
:meth:`ConfusionMatrix.summary` also reports the headline numbers in percent.

Input rules of :meth:`ConfusionMatrix.update`:

- ``pred`` and ``target`` are integer tensors of one shape (any shape, any
  device); bool and floating-point tensors are rejected.
- ``target == ignore_index`` pixels are skipped; any other target value outside
  [0, C) is an error.
- ``pred`` values in [0, C) are class predictions. ``pred == ignore_index``
  means "no prediction" (a label map's 255): such pixels are counted as misses
  (a false negative of their GT class, never a true positive, as in
  MMSegmentation) unless ``skip_unassigned=True``, which drops them from the
  count altogether (ModuSeg's non-standard Cityscapes evaluation). Any other
  prediction outside [0, C) is an error.

Counts are int64 (exact for any dataset size) and are accumulated with one
``torch.bincount`` per update on the inputs' device; the matrix itself lives on
the CPU. Matrices merge by addition (:meth:`merge`, ``+``), across processes
with :meth:`all_reduce`, and save/load as safetensors or JSON for resumable
evaluation.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Sequence

import torch

from weakseg.core import is_int
from weakseg.io import save_safetensors, write_json

__all__ = ["ConfusionMatrix", "MIOU_CONVENTIONS"]

MIOU_CONVENTIONS = ("all", "present", "union")
_FORMAT = "weakseg.confusion_matrix"
_VERSION = 1


def _err(msg: str, exc: type = ValueError):
    return exc(f"ConfusionMatrix: {msg}")


class ConfusionMatrix:
    """A (C, C) pixel confusion matrix (rows = ground truth, columns = prediction)
    plus a (C,) count of GT pixels that received no prediction (``pred == ignore_index``).

    Args:
        num_classes: C >= 1.
        ignore_index: the target value that marks pixels to skip (and the
            prediction value that means "no prediction"); must lie outside [0, C).
        skip_unassigned: drop pixels whose prediction is ``ignore_index`` instead
            of counting them as misses.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255, skip_unassigned: bool = False):
        if not is_int(num_classes, 1):
            raise _err(f"num_classes must be an int >= 1, got {num_classes!r}")
        if not is_int(ignore_index):
            raise _err(f"ignore_index must be an int, got {ignore_index!r}", TypeError)
        if 0 <= ignore_index < num_classes:
            raise _err(f"ignore_index={ignore_index} must lie outside the class range [0, num_classes={num_classes})")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.skip_unassigned = bool(skip_unassigned)
        # Column C counts GT pixels predicted as ignore_index ("unassigned").
        self._counts = torch.zeros(num_classes, num_classes + 1, dtype=torch.int64)

    # ------------------------------------------------------------------ accumulation
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> "ConfusionMatrix":
        """Add the pixels of one prediction / ground-truth pair (see the module docstring)."""
        for name, t in (("pred", pred), ("target", target)):
            if not isinstance(t, torch.Tensor):
                raise _err(f"expected {name} to be a torch.Tensor, got {type(t).__name__}", TypeError)
            if t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
                raise _err(f"expected {name} to hold integer class ids, got dtype {t.dtype}", TypeError)
        if pred.shape != target.shape:
            raise _err(f"pred and target must have the same shape, got pred {tuple(pred.shape)} "
                       f"and target {tuple(target.shape)}")
        if pred.device != target.device:
            raise _err(f"pred and target must be on one device, got {pred.device} and {target.device}")
        C, ig = self.num_classes, self.ignore_index
        p = pred.reshape(-1).long()
        t = target.reshape(-1).long()
        valid_t = t != ig
        bad_t = valid_t & ((t < 0) | (t >= C))
        if bool(bad_t.any()):
            vals = torch.unique(t[bad_t])[:5].tolist()
            raise _err(f"target values must lie in [0, num_classes={C}) or equal ignore_index={ig}; "
                       f"found {vals}")
        unassigned = p == ig
        bad_p = ~unassigned & ((p < 0) | (p >= C))
        if bool(bad_p.any()):
            vals = torch.unique(p[bad_p])[:5].tolist()
            raise _err(f"pred values must lie in [0, num_classes={C}) or equal ignore_index={ig} "
                       f"(no prediction); found {vals}")
        keep = valid_t & ~unassigned if self.skip_unassigned else valid_t
        p = torch.where(unassigned, torch.full_like(p, C), p)
        idx = t[keep] * (C + 1) + p[keep]
        binc = torch.bincount(idx, minlength=C * (C + 1))
        self._counts += binc.view(C, C + 1).to(device="cpu", dtype=torch.int64)
        return self

    def reset(self) -> None:
        self._counts.zero_()

    def _check_compatible(self, other: Any) -> None:
        if not isinstance(other, ConfusionMatrix):
            raise _err(f"can only merge another ConfusionMatrix, got {type(other).__name__}", TypeError)
        mine = (self.num_classes, self.ignore_index, self.skip_unassigned)
        theirs = (other.num_classes, other.ignore_index, other.skip_unassigned)
        if mine != theirs:
            raise _err(f"cannot merge a matrix with num_classes={theirs[0]}, ignore_index={theirs[1]}, "
                       f"skip_unassigned={theirs[2]} into one with num_classes={mine[0]}, "
                       f"ignore_index={mine[1]}, skip_unassigned={mine[2]}")

    def merge(self, other: "ConfusionMatrix") -> "ConfusionMatrix":
        """Add ``other``'s counts into this matrix (in place) and return self."""
        self._check_compatible(other)
        self._counts += other._counts
        return self

    def __add__(self, other: "ConfusionMatrix") -> "ConfusionMatrix":
        self._check_compatible(other)
        out = self.copy()
        out._counts += other._counts
        return out

    def __iadd__(self, other: "ConfusionMatrix") -> "ConfusionMatrix":
        return self.merge(other)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ConfusionMatrix):
            return NotImplemented
        return (self.num_classes, self.ignore_index, self.skip_unassigned) == (
            other.num_classes, other.ignore_index, other.skip_unassigned) and torch.equal(self._counts, other._counts)

    __hash__ = None  # mutable

    def copy(self) -> "ConfusionMatrix":
        out = ConfusionMatrix(self.num_classes, self.ignore_index, self.skip_unassigned)
        out._counts = self._counts.clone()
        return out

    def all_reduce(self, group=None) -> "ConfusionMatrix":
        """Sum the matrix over all processes of ``group`` (in place) when torch.distributed is
        initialised; a no-op otherwise. With the NCCL backend the sum runs on the current CUDA device."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return self
        backend = dist.get_backend(group)
        dev = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        buf = self._counts.to(dev)
        dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group)
        self._counts = buf.to("cpu")
        return self

    # ------------------------------------------------------------------ state
    @property
    def matrix(self) -> torch.Tensor:
        """(C, C) int64 counts, rows = ground truth, columns = prediction (a copy)."""
        return self._counts[:, : self.num_classes].clone()

    @property
    def unassigned(self) -> torch.Tensor:
        """(C,) int64: GT pixels of each class whose prediction was ``ignore_index``."""
        return self._counts[:, self.num_classes].clone()

    def state_dict(self) -> dict[str, Any]:
        return {"num_classes": self.num_classes, "ignore_index": self.ignore_index,
                "skip_unassigned": self.skip_unassigned, "counts": self._counts.clone()}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> "ConfusionMatrix":
        for key in ("num_classes", "ignore_index", "counts"):
            if key not in state:
                raise _err(f"state dict lacks {key!r}; expected keys num_classes, ignore_index, counts")
        out = cls(int(state["num_classes"]), int(state["ignore_index"]), bool(state.get("skip_unassigned", False)))
        counts = torch.as_tensor(state["counts"], dtype=torch.int64)
        C = out.num_classes
        if counts.shape != (C, C + 1):
            raise _err(f"state dict 'counts' must have shape (num_classes, num_classes + 1) = ({C}, {C + 1}), "
                       f"got {tuple(counts.shape)}")
        if bool((counts < 0).any()):
            raise _err("state dict 'counts' holds negative values")
        out._counts = counts.clone()
        return out

    def save(self, path: str | os.PathLike) -> Path:
        """Write the matrix to ``path``: ``.safetensors`` (counts tensor + JSON metadata) or ``.json``.
        The file is written atomically (temporary file + rename)."""
        p = Path(path)
        suffix = p.suffix.lower()
        meta = {"format": _FORMAT, "version": _VERSION, "num_classes": self.num_classes,
                "ignore_index": self.ignore_index, "skip_unassigned": self.skip_unassigned}
        if suffix == ".safetensors":
            save_safetensors({"counts": self._counts}, p, metadata={k: json.dumps(v) for k, v in meta.items()})
        elif suffix == ".json":
            write_json(p, {**meta, "counts": self._counts.tolist()}, indent=None)
        else:
            raise _err(f"save path {p}: expected a .safetensors or .json suffix, got {suffix or 'none'}")
        return p

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ConfusionMatrix":
        """Read a matrix written by :meth:`save`."""
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"ConfusionMatrix.load: no such file {p} (expected a .safetensors or .json "
                                    "file written by ConfusionMatrix.save)")
        suffix = p.suffix.lower()
        if suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(p), framework="pt") as f:
                raw = f.metadata() or {}
                meta = {k: json.loads(v) for k, v in raw.items()}
                if meta.get("format") != _FORMAT or "counts" not in f.keys():
                    raise _err(f"{p} is not a weakseg confusion matrix (metadata format={meta.get('format')!r})")
                counts = f.get_tensor("counts")
        elif suffix == ".json":
            meta = json.loads(p.read_text())
            if not isinstance(meta, dict) or meta.get("format") != _FORMAT:
                raise _err(f"{p} is not a weakseg confusion matrix (expected a JSON object with "
                           f"format={_FORMAT!r})")
            counts = meta["counts"]
        else:
            raise _err(f"load path {p}: expected a .safetensors or .json suffix, got {suffix or 'none'}")
        return cls.from_state_dict({**meta, "counts": counts})

    # ------------------------------------------------------------------ statistics
    def _stats(self):
        c = self._counts.double()
        C = self.num_classes
        tp = torch.diagonal(c[:, :C])
        gt = c.sum(1)  # includes unassigned pixels (misses)
        pr = c[:, :C].sum(0)
        return tp, gt, pr

    @property
    def total(self) -> int:
        """Number of counted pixels."""
        return int(self._counts.sum())

    def true_positives(self) -> torch.Tensor:
        return torch.diagonal(self._counts[:, : self.num_classes]).clone()

    def false_positives(self) -> torch.Tensor:
        return self._counts[:, : self.num_classes].sum(0) - self.true_positives()

    def false_negatives(self) -> torch.Tensor:
        return self._counts.sum(1) - self.true_positives()

    def gt_pixels(self) -> torch.Tensor:
        """(C,) int64 ground-truth pixels per class."""
        return self._counts.sum(1)

    def pred_pixels(self) -> torch.Tensor:
        """(C,) int64 predicted pixels per class."""
        return self._counts[:, : self.num_classes].sum(0)

    def iou(self) -> torch.Tensor:
        """(C,) float64 per-class IoU; NaN where the class has no GT and no predicted pixel."""
        tp, gt, pr = self._stats()
        union = gt + pr - tp
        return torch.where(union > 0, tp / union.clamp_min(1), torch.full_like(tp, math.nan))

    def miou(self, convention: str = "all") -> float:
        """Mean IoU under ``convention`` ("all", "present" or "union"; see the module docstring)."""
        iou = self.iou()
        if convention == "all":
            return float(iou.nan_to_num(0.0).mean())
        if convention == "present":
            sel = self.gt_pixels() > 0
        elif convention == "union":
            sel = ~torch.isnan(iou)
        else:
            raise _err(f"convention must be one of {', '.join(MIOU_CONVENTIONS)}, got {convention!r}")
        return float(iou[sel].mean()) if bool(sel.any()) else math.nan

    def pixel_accuracy(self) -> float:
        """Σ TP / counted GT pixels (NaN when nothing was counted)."""
        tp, gt, _ = self._stats()
        n = float(gt.sum())
        return float(tp.sum()) / n if n > 0 else math.nan

    def class_accuracy(self) -> torch.Tensor:
        """(C,) float64 per-class recall TP / GT pixels; NaN for classes without GT pixels."""
        tp, gt, _ = self._stats()
        return torch.where(gt > 0, tp / gt.clamp_min(1), torch.full_like(tp, math.nan))

    def mean_accuracy(self) -> float:
        """Mean of :meth:`class_accuracy` over the classes with GT pixels."""
        acc = self.class_accuracy()
        sel = ~torch.isnan(acc)
        return float(acc[sel].mean()) if bool(sel.any()) else math.nan

    def fw_iou(self) -> float:
        """Frequency-weighted IoU: Σ_c (GT_c / Σ GT) · IoU_c over classes with GT pixels."""
        _, gt, _ = self._stats()
        n = float(gt.sum())
        if n == 0:
            return math.nan
        iou = self.iou()
        sel = gt > 0
        return float((gt[sel] / n * iou[sel]).sum())

    def confusion_ratio(self) -> torch.Tensor:
        """(C,) float64 DiCLIP confusion ratio FP / TP per class: inf where TP = 0 < FP,
        NaN where TP = FP = 0."""
        tp, _, pr = self._stats()
        fp = pr - tp
        out = fp / tp.clamp_min(1)
        out = torch.where(tp > 0, out, torch.where(fp > 0, torch.full_like(out, math.inf),
                                                   torch.full_like(out, math.nan)))
        return out

    def mean_confusion_ratio(self, exclude: Sequence[int] = ()) -> float:
        """Mean confusion ratio over the classes with GT pixels, leaving out the class ids in
        ``exclude`` (e.g. ``(0,)`` for DiCLIP's foreground-only tables). inf when such a class
        has FP > 0 and TP = 0."""
        cr = self.confusion_ratio()
        sel = self.gt_pixels() > 0
        for c in exclude:
            if not 0 <= c < self.num_classes:
                raise _err(f"exclude: class id {c} outside [0, num_classes={self.num_classes})")
            sel[c] = False
        sel &= ~torch.isnan(cr)
        return float(cr[sel].mean()) if bool(sel.any()) else math.nan

    # ------------------------------------------------------------------ reports
    def _names(self, class_names: Sequence[str] | None) -> list[str]:
        if class_names is None:
            return [str(i) for i in range(self.num_classes)]
        names = [str(n) for n in class_names]
        if len(names) != self.num_classes:
            raise _err(f"class_names has {len(names)} names for num_classes={self.num_classes}")
        return names

    def summary(self, class_names: Sequence[str] | None = None) -> dict[str, Any]:
        """A JSON-ready dict. Fractions under their plain keys, the headline numbers in percent
        under ``"percent"``; NaN becomes None and inf stays a float (``json.dumps`` writes
        ``Infinity``).

        Keys: num_classes, ignore_index, pixels, miou {all, present, union}, pixel_accuracy,
        mean_accuracy, fw_iou, mean_confusion_ratio (classes with GT pixels), per_class (list of
        {id, name, iou, accuracy, confusion_ratio, gt_pixels, pred_pixels, unassigned}), percent
        {miou_all, miou_present, miou_union, pixel_accuracy, mean_accuracy, fw_iou, iou {name: %}}.
        """
        names = self._names(class_names)

        def f(x: float) -> float | None:
            return None if isinstance(x, float) and math.isnan(x) else x

        def pct(x: float) -> float | None:
            return None if math.isnan(x) else 100.0 * x

        iou, acc, cr = self.iou().tolist(), self.class_accuracy().tolist(), self.confusion_ratio().tolist()
        gt, pr, un = self.gt_pixels().tolist(), self.pred_pixels().tolist(), self.unassigned.tolist()
        miou = {c: self.miou(c) for c in MIOU_CONVENTIONS}
        scalars = {"pixel_accuracy": self.pixel_accuracy(), "mean_accuracy": self.mean_accuracy(),
                   "fw_iou": self.fw_iou()}
        return {
            "num_classes": self.num_classes,
            "ignore_index": self.ignore_index,
            "pixels": self.total,
            "miou": {k: f(v) for k, v in miou.items()},
            **{k: f(v) for k, v in scalars.items()},
            "mean_confusion_ratio": f(self.mean_confusion_ratio()),
            "per_class": [
                {"id": i, "name": names[i], "iou": f(iou[i]), "accuracy": f(acc[i]),
                 "confusion_ratio": f(cr[i]), "gt_pixels": gt[i], "pred_pixels": pr[i], "unassigned": un[i]}
                for i in range(self.num_classes)
            ],
            "percent": {
                **{f"miou_{k}": pct(v) for k, v in miou.items()},
                **{k: pct(v) for k, v in scalars.items()},
                "iou": {names[i]: pct(iou[i]) for i in range(self.num_classes)},
            },
        }

    def to_markdown(self, class_names: Sequence[str] | None = None, digits: int = 2) -> str:
        """A Markdown report: one row per class (IoU %, accuracy %, confusion ratio, GT pixels),
        then the mIoU conventions, pixel accuracy and mean accuracy in percent. "-" marks NaN."""
        names = self._names(class_names)

        def num(x: float, scale: float = 100.0) -> str:
            if math.isnan(x):
                return "-"
            if math.isinf(x):
                return "inf"
            return f"{x * scale:.{digits}f}"

        iou, acc, cr = self.iou().tolist(), self.class_accuracy().tolist(), self.confusion_ratio().tolist()
        gt = self.gt_pixels().tolist()
        lines = ["| id | class | IoU % | Acc % | CR (FP/TP) | GT pixels |", "|---:|---|---:|---:|---:|---:|"]
        for i, n in enumerate(names):
            lines.append(f"| {i} | {n} | {num(iou[i])} | {num(acc[i])} | {num(cr[i], 1.0)} | {gt[i]} |")
        lines += [
            "",
            "| metric | % |",
            "|---|---:|",
            f"| mIoU (all {self.num_classes} classes) | {num(self.miou('all'))} |",
            f"| mIoU (classes present in GT) | {num(self.miou('present'))} |",
            f"| mIoU (classes in GT or prediction) | {num(self.miou('union'))} |",
            f"| pixel accuracy | {num(self.pixel_accuracy())} |",
            f"| mean accuracy | {num(self.mean_accuracy())} |",
        ]
        return "\n".join(lines) + "\n"

    def __repr__(self) -> str:
        return (f"ConfusionMatrix(num_classes={self.num_classes}, ignore_index={self.ignore_index}, "
                f"pixels={self.total})")
