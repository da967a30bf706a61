"""Checks and parsers of the command-line arguments every command shares (output paths, class lists,
datasets), one place for the CLI and for the commands that methods and trainers register
(:data:`weakseg.core.COMMANDS`, :data:`weakseg.core.TRAINERS`). Each error names the argument."""

from __future__ import annotations

from pathlib import Path

from weakseg.core import BACKGROUND_NAMES

__all__ = ["check_out_dir", "check_out_file", "class_list", "class_names_arg", "open_train_dataset"]


def check_out_dir(out: str | None, arg: str = "--out") -> None:
    """An output directory argument must not name an existing file (checked before any model loads)."""
    if out is not None and Path(out).exists() and not Path(out).is_dir():
        raise ValueError(f"{arg}: {out} is an existing file; expected a directory (created if missing)")


def check_out_file(out: str | None, arg: str = "--out") -> None:
    """An output file argument must not name an existing directory."""
    if out is not None and Path(out).is_dir():
        raise ValueError(f"{arg}: {out} is a directory; expected a file path")


def class_list(spec: str, arg: str = "--classes", background: bool | None = True) -> list[str]:
    """A comma-separated class list: names stripped, empty items dropped, duplicates refused (compared
    without case). ``background=True``: a background name (``background``, ``bg``, ...) given anywhere goes
    first, and ``background`` is added when none is given (never twice); False: no background name allowed
    (--no-background); None: the names as given."""
    items = [c.strip() for c in spec.split(",") if c.strip()]
    if not items:
        raise ValueError(f"{arg}: expected a comma-separated list of class names, e.g. cat,dog")
    seen: dict[str, str] = {}
    dups = []
    for c in items:
        if c.lower() in seen:
            dups.append(c if c == seen[c.lower()] else f"{seen[c.lower()]}/{c}")
        seen.setdefault(c.lower(), c)
    if dups:
        raise ValueError(f"{arg}: duplicate class name(s) {', '.join(dict.fromkeys(dups))}; give each class once")
    bgs = [c for c in items if c.lower() in BACKGROUND_NAMES]
    if len(bgs) > 1:
        raise ValueError(f"{arg}: {', '.join(bgs)} all name the background; give it once")
    rest = [c for c in items if c.lower() not in BACKGROUND_NAMES]
    if background is None:
        return items
    if not background:
        if bgs:
            raise ValueError(f"{arg}: names the background ({bgs[0]!r}) but --no-background is set; drop one")
        return items
    return bgs[:1] + rest if bgs else ["background"] + rest


def class_names_arg(spec: str) -> list[str]:
    """--classes: "voc", "coco", a generated dataset's name ("toyworld") or a comma-separated list (the
    background is put first)."""
    from weakseg.core import GENERATED_DATASETS
    from weakseg.data.classnames import COCO_OBJECT_CLASSES, VOC_CLASSES

    named = {"voc": list(VOC_CLASSES), "coco": list(COCO_OBJECT_CLASSES)}
    if spec in named:
        return named[spec]
    if spec in GENERATED_DATASETS and not spec.endswith("-captions"):
        return list(GENERATED_DATASETS.get(spec)(None, num_scenes=1).class_names)
    if not any(c.strip() for c in spec.split(",")):
        raise ValueError("--classes: expected voc, coco, toyworld or a comma-separated list of class names")
    return class_list(spec)


def open_train_dataset(name: str, root: str | None, split: str | None, limit: int | None):
    """A training dataset by name: :func:`weakseg.eval.runner.open_eval_dataset` with the ``train`` split by
    default and, for a generated one (``toyworld``), ``limit`` scenes (default 1000)."""
    from weakseg.core import GENERATED_DATASETS
    from weakseg.eval.runner import open_eval_dataset

    kwargs = {"num_scenes": limit if limit is not None else 1000} if name in GENERATED_DATASETS else {}
    return open_eval_dataset(name, root, split or "train", **kwargs)
