"""Ablations of a method on toy-world scenes, scored by the eval loop (mIoU over all classes, image-level
labels given). The scenes are the "val" split (never the demo's "test" scenes), so choosing a setting
here does not touch the figures the demo reports.

    python benchmarks/ablate_toy.py iseg [--images 60] [--out benchmarks/results]
    python benchmarks/ablate_toy.py diffsegmenter
    python benchmarks/ablate_toy.py moduseg

Each row is the method's toy preset with the overrides named in the row (``ABLATIONS``); the result is
a markdown table and a JSON file ``ablate_<method>_toy.{md,json}`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ABLATIONS: dict[str, list[tuple[str, dict]]] = {
    "iseg": [
        ("baseline: fused cross-attention, no propagation", {"baseline": True}),
        ("toy preset (16x16 cross-attention, ERS on, N = 1, gamma = 1.0, background threshold 0.6)", {}),
        ("ERS off", {"use_ers": False}),
        ("N = 5", {"steps": 5}),
        ("N = 10", {"steps": 10}),
        ("gamma = 1.6 (the reference's)", {"gamma": 1.6}),
        ("no KL clustering", {"use_cluster": False}),
        ("self-attention of up_blocks.3.attentions.1 (SD's reference position)",
         {"self_layer": "up_blocks.3.attentions.1.transformer_blocks.0.attn1"}),
        ("background (1 - max)^2 (the reference's)", {"background": "power", "background_value": 2.0}),
        ("background threshold 0.5", {"background_value": 0.5}),
        ("background threshold 0.7", {"background_value": 0.7}),
        ("8x8 / 16x16 cross-attention fused 0.7 / 0.3 (the reference's weights)",
         {"cross_weight_16": 0.7, "cross_weight_32": 0.3}),
    ],
    "diffsegmenter": [
        ("baseline: fused cross-attention, no propagation", {"baseline": True}),
        ("toy preset (one propagation)", {}),
        ("paper: timesteps 1/50/100/150", {"timesteps": (1, 50, 100, 150)}),
        ("reference propagation (P x P map)", {"propagation": "reference"}),
    ],
    # ModuSeg: every row builds its bank from iSeg's toy pseudo masks on 200 toy train scenes
    "moduseg": [
        ("toy config (SBP, SMFA, outlier filter, K = 1, image-label vote)", {}),
        ("SBP off", {"sbp": False}),
        ("hard (binary, nearest) pooling instead of SMFA", {"pooling": "hard"}),
        ("outlier filter off", {"outlier_filter": False}),
        ("K = 3", {"k": 3}),
        ("K = 5", {"k": 5}),
        ("K = 25 (reference)", {"k": 25}),
        ("vote over the whole bank (reference: no image labels)", {"use_image_labels": False}),
    ],
}


def run(method: str, images: int, out: Path | None, progress: bool = True) -> list[dict]:
    from weakseg.core import TOY_DEMOS
    from weakseg.toy.world import ToyWorld
    from weakseg.eval.runner import evaluate

    if method not in ABLATIONS:
        raise ValueError(f"ablate_toy: no ablation list for {method!r}; known: {', '.join(ABLATIONS)}")
    recipe = TOY_DEMOS.get(method)
    world = ToyWorld(64, "val", num_scenes=images)
    rows, backbone = [], None
    for label, overrides in ABLATIONS[method]:
        entry = recipe(None, progress, backbone=backbone, **overrides)
        backbone = entry.method.sd if hasattr(entry.method, "sd") else entry.method.backbone
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            m = evaluate(entry.method, world, tmp, overlays=0, resume=False, progress=progress,
                         method_name=f"{method} {label}", dataset_name="toyworld-val")
            rows.append({"setting": label, "overrides": {k: list(v) if isinstance(v, tuple) else v
                                                         for k, v in overrides.items()},
                         "miou": m["percent"]["miou_all"], "miou_present": m["percent"]["miou_present"],
                         "seconds_per_image": m["seconds_per_image"], "wall_s": time.perf_counter() - t0})
        print(f"{label}: mIoU {rows[-1]['miou']:.2f}", file=sys.stderr, flush=True)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        from weakseg.bench import machine_facts

        meta = {"method": method, "scenes": f"ToyWorld(64, 'val'), first {images}", "date": time.strftime("%Y-%m-%d"),
                "command": "python " + " ".join(sys.argv), "machine": machine_facts(["cpu"]), "rows": rows}
        (out / f"ablate_{method}_toy.json").write_text(json.dumps(meta, indent=2) + "\n")
        md = [f"# {method} ablations on the toy world", "",
              f"{meta['scenes']} scenes, image-level labels given, mIoU over all 6 classes. {meta['date']}, "
              f"`{meta['command']}`.", "", "| setting | mIoU % | s / image |", "|---|---:|---:|"]
        md += [f"| {r['setting']} | {r['miou']:.2f} | {r['seconds_per_image']:.3f} |" for r in rows]
        (out / f"ablate_{method}_toy.md").write_text("\n".join(md) + "\n")
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("method", choices=sorted(ABLATIONS))
    p.add_argument("--images", type=int, default=60)
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    run(a.method, a.images, Path(a.out) if a.out else None, progress=not a.quiet)
    return 0


if __name__ == "__main__":
    sys.exit(main())
