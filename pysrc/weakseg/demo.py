"""The main job behind ``make demo`` (``weakseg demo``): every registered method on held-out toy-world scenes.

1. Scenes: ``ToyWorld(64, "test")`` (its own seed range; no training stage ever saw these scenes), with
   their label maps and image-level labels (the weakly-supervised protocol: each method is told which
   classes are present, as in the methods' WSSS evaluations).
2. Methods: each method with a toy recipe in :data:`weakseg.core.TOY_DEMOS` (:mod:`weakseg.toy.recipes`:
   ``recipe(work_dir, progress) -> DemoEntry``, its toy configuration on the committed toy-world weights and
   its own unrefined baseline). A method that
   needs a setup step (a feature bank, a short training run) caches it under ``<out>/work/<name>``.
3. Scoring: :func:`weakseg.eval.evaluate`, the same loop as ``weakseg eval`` (confusion matrix, mIoU over
   all classes, per-image label PNGs, overlays image | ground truth | prediction).

Outputs under ``--out`` (default ``outputs/demo``): ``report.json`` (``{"dataset": "toyworld",
"num_images": N, "methods": {name: {"miou", "baseline_miou", "seconds_per_image", ...}}}``), ``report.md``,
and per method ``<name>/metrics.json``, ``<name>/metrics.md``, ``<name>/overlays/*.png`` (and the same
for its baseline under ``<name>/baseline/``).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch

from weakseg.core import DemoEntry, is_int
from weakseg.io import write_json, write_text

__all__ = ["DEFAULT_IMAGES", "toy_demo_methods", "run_demo"]

# 100 test scenes: with 40 the mIoU of one method moved by several points between disjoint scene sets, too
# noisy to rank a refinement against its baseline (benchmarks/results/toyworld_training_notes.md).
DEFAULT_IMAGES = 100
IMAGE_SIZE = 64

EntryFactory = Callable[[Path, bool], DemoEntry]


def toy_demo_methods(names: Sequence[str] | None = None) -> dict[str, EntryFactory]:
    """name -> toy recipe (:data:`weakseg.core.TOY_DEMOS`) of the methods that have one (all, or ``names``)."""
    from weakseg.core import TOY_DEMOS, list_methods

    known = list_methods()
    if names is not None:
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ValueError(f"demo: unknown method(s) {', '.join(unknown)}; registered: {', '.join(known)}")
        missing = [n for n in names if n not in TOY_DEMOS]
        if missing:
            raise ValueError(f"demo: method(s) {', '.join(missing)} have no toy-world recipe; recipes exist for "
                             f"{', '.join(TOY_DEMOS.names())}")
    return {name: TOY_DEMOS.get(name) for name in (names if names is not None else known) if name in TOY_DEMOS}


def _markdown(report: dict) -> str:
    lines = ["# weakseg demo: the toy world", "",
             f"{report['num_images']} held-out toy scenes ({IMAGE_SIZE}x{IMAGE_SIZE}, split \"test\"), "
             f"image-level labels given, mIoU over all {report['num_classes']} classes (background included).", "",
             "| method | mIoU % | baseline mIoU % | gain | s / image | setup s | baseline |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for name, r in report["methods"].items():
        gain = r["miou"] - r["baseline_miou"]
        lines.append(f"| {name} | {r['miou']:.2f} | {r['baseline_miou']:.2f} | {gain:+.2f} | "
                     f"{r['seconds_per_image']:.3f} | {r['setup_seconds']:.1f} | {r['baseline']} |")
    for name, why in report.get("skipped", {}).items():
        lines.append(f"| {name} | skipped: {why} | | | | | |")
    lines += ["", f"Total time: {report['seconds']:.1f} s. Overlays (image | ground truth | prediction): "
              "`<method>/overlays/`.", ""]
    return "\n".join(lines)


def run_demo(out: str | os.PathLike = "outputs/demo", num_images: int = DEFAULT_IMAGES,
             methods: Sequence[str] | None = None, entries: Mapping[str, EntryFactory] | None = None,
             overlays: int = 4, progress: bool = True, threads: int | None = None) -> dict:
    """Run the demo and write its report; returns the report dict.

    ``methods``: names to run (default: every registered method with a toy configuration);
    ``entries``: name -> factory ``(work_dir, progress) -> DemoEntry`` used instead of the registered
    ones (tests pass tiny models here). ``threads``: torch CPU threads (default: torch's choice).
    """
    from weakseg.toy.world import ToyWorld
    from weakseg.eval.runner import evaluate

    if not is_int(num_images, 1):
        raise ValueError(f"demo: num_images must be an int >= 1, got {num_images!r}")
    if not is_int(overlays, 0):
        raise ValueError(f"demo: overlays must be an int >= 0, got {overlays!r}")
    if threads is not None:
        torch.set_num_threads(int(threads))
    factories = dict(entries) if entries is not None else toy_demo_methods(methods)
    if not factories:
        raise ValueError("demo: no method to run (no toy recipe registered, or an empty entries mapping)")
    out = Path(out)
    world = ToyWorld(size=IMAGE_SIZE, split="test", num_scenes=num_images)
    report: dict = {"dataset": "toyworld", "num_images": num_images, "num_classes": world.num_classes,
                    "class_names": list(world.class_names), "miou_convention": "all", "methods": {}}
    t_start = time.perf_counter()
    for name, factory in factories.items():
        t0 = time.perf_counter()
        try:
            entry = factory(out / "work" / name, progress)
        except FileNotFoundError as e:  # its toy weights are not there: say so, run the others
            report.setdefault("skipped", {})[name] = str(e)
            print(f"demo: skipping {name}: {e}", flush=True)
            continue
        if not isinstance(entry, DemoEntry):
            raise TypeError(f"demo: the toy recipe of {name} returned {type(entry).__name__}, expected a weakseg.DemoEntry")
        setup = time.perf_counter() - t0
        common = dict(use_image_labels=True, resume=False, progress=progress, dataset_name="toyworld")
        m = evaluate(entry.method, world, out / name, overlays=overlays, method_name=name, **common)
        b = evaluate(entry.baseline, world, out / name / "baseline", overlays=overlays,
                     method_name=f"{name} baseline", **common)
        report["methods"][name] = {
            "miou": m["percent"]["miou_all"], "baseline_miou": b["percent"]["miou_all"],
            "seconds_per_image": m["seconds_per_image"], "baseline_seconds_per_image": b["seconds_per_image"],
            "miou_present": m["percent"]["miou_present"], "baseline_miou_present": b["percent"]["miou_present"],
            "pixel_accuracy": m["percent"]["pixel_accuracy"], "setup_seconds": setup, "baseline": entry.note,
        }
        report["seconds"] = time.perf_counter() - t_start
        write_json(out / "report.json", report)  # partial results survive a crash
    report["seconds"] = time.perf_counter() - t_start
    write_json(out / "report.json", report)
    write_text(out / "report.md", _markdown(report))
    if not report["methods"]:
        raise FileNotFoundError("demo: no method could run; " + "; ".join(f"{k}: {v}" for k, v in
                                                                        report.get("skipped", {}).items()))
    return report
