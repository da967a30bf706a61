"""Ablations of a method on toy-world scenes, scored by the eval loop (mIoU over all classes, image-level
labels given). The scenes are the "val" split (never the demo's "test" scenes), so choosing a setting
here does not touch the figures the demo reports.

    python benchmarks/ablate_toy.py iseg [--images 60] [--out benchmarks/results]
    python benchmarks/ablate_toy.py diffsegmenter
    python benchmarks/ablate_toy.py moduseg
    python benchmarks/ablate_toy.py synseg --images 200 --rows 0,1
    python benchmarks/ablate_toy.py iseg --sd DIR/sd     # a candidate toy SD (e.g. from --snapshot)

Each row is the method's toy preset with the overrides named in the row (``ABLATIONS``; ``--rows``
picks some by index); the result is a markdown table and a JSON file ``ablate_<method>_toy.{md,json}``
under ``--out``. SynSeg and DiCLIP train their heads for every row (in a temporary folder), as the demo
does.
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
        ("baseline: fused cross-attention, no propagation, no PAMR", {"baseline": True, "pamr_iterations": 0}),
        ("toy preset (16x16 cross-attention, ERS on, N = 1, gamma = 1.0, PAMR 10, background threshold 0.55, "
         "4 noise draws)", {}),
        ("one noise draw (the reference's; the preset before 2026-12-07 #3)", {"noise_draws": 1}),
        ("8 noise draws", {"noise_draws": 8}),
        ("one noise draw, no PAMR, background threshold 0.6 (the preset before 2026-12-07)",
         {"pamr_iterations": 0, "background_value": 0.6, "noise_draws": 1}),
        ("no PAMR", {"pamr_iterations": 0}),
        ("PAMR 20 iterations", {"pamr_iterations": 20}),
        ("PAMR at dilations 1, 2, 4, 8", {"pamr_dilations": (1, 2, 4, 8)}),
        ("ERS off", {"use_ers": False}),
        ("N = 5", {"steps": 5}),
        ("N = 10", {"steps": 10}),
        ("gamma = 1.6 (the reference's)", {"gamma": 1.6}),
        ("no KL clustering", {"use_cluster": False}),
        ("self-attention of up_blocks.3.attentions.1 (SD's reference position)",
         {"self_layer": "up_blocks.3.attentions.1.transformer_blocks.0.attn1"}),
        ("background (1 - max)^2 (the reference's)", {"background": "power", "background_value": 2.0}),
        ("background threshold 0.5", {"background_value": 0.5}),
        ("background threshold 0.6", {"background_value": 0.6}),
        ("background threshold 0.7", {"background_value": 0.7}),
        ("8x8 / 16x16 cross-attention fused 0.7 / 0.3 (the reference's weights)",
         {"cross_weight_16": 0.7, "cross_weight_32": 0.3}),
    ],
    "diffsegmenter": [
        ("baseline: fused cross-attention, no propagation, no PAMR", {"baseline": True, "pamr_iterations": 0}),
        ("toy preset (one propagation; 16x16 cross-attention only, PAMR 10, background threshold 0.55)", {}),
        ("no PAMR, background threshold 0.6 (the preset before 2026-12-07)",
         {"pamr_iterations": 0, "bg_threshold": 0.6}),
        ("no PAMR", {"pamr_iterations": 0}),
        ("PAMR 20 iterations", {"pamr_iterations": 20}),
        ("4 noise draws averaged (iSeg's toy preset's)", {"noise_draws": 4}),
        ("paper: timesteps 1/50/100/150", {"timesteps": (1, 50, 100, 150)}),
        ("reference propagation (P x P map)", {"propagation": "reference"}),
        ("the preset before 2026-12-06 #6: cross-attention weights 2/4/8/16 = 0/0.2/0.4/0.4, background 0.5",
         {"cross_weights": (0.0, 0.2, 0.4, 0.4), "bg_threshold": 0.5}),
        ("cross-attention weights 0/0.2/0.4/0.4", {"cross_weights": (0.0, 0.2, 0.4, 0.4)}),
        ("cross-attention weights 0/0/0.2/0.8", {"cross_weights": (0.0, 0.0, 0.2, 0.8)}),
        ("background threshold 0.5", {"bg_threshold": 0.5}),
        ("background threshold 0.6", {"bg_threshold": 0.6}),
        ("background threshold 0.7", {"bg_threshold": 0.7}),
    ],
    # SynSeg: every row trains its head on toy captions (about a minute on one thread)
    "synseg": [
        ("toy preset (400 scene captions + 800 object crops, PAMR, background threshold 0.5)", {}),
        ("no PAMR, background threshold 0.6 (the preset before 2026-12-07)", {"pamr_iterations": 0, "bg_threshold": 0.6}),
        ("no object crops", {"train_crops": 0}),
        ("400 object crops", {"train_crops": 400}),
        ("1,600 object crops", {"train_crops": 1600}),
        ("background threshold 0.6", {"bg_threshold": 0.6}),
        ("background threshold 0.4", {"bg_threshold": 0.4}),
        ("800 training iterations", {"train_options": {"iterations": 800}}),
    ],
    # DiCLIP: every row builds its cache with the toy SD and trains its head (about a minute on 2 threads)
    "diclip": [
        ("toy preset (300 iterations, CAA pseudo labels never gated by the head's affinity; CRF)", {}),
        ("toy preset, training seed 1", {"train_options": {"seed": 1}}),
        ("toy preset, training seed 2", {"train_options": {"seed": 2}}),
        ("CAA gated by the head's affinity from iteration 150 (as before 2026-12-07; with the CRF)",
         {"train_options": {"caa_seg_from": 150}}),
        ("gated from 150, training seed 1", {"train_options": {"caa_seg_from": 150, "seed": 1}}),
        ("gated from 150, training seed 2", {"train_options": {"caa_seg_from": 150, "seed": 2}}),
        ("inference at scales 1.0 + 1.5 without CRF (the preset before)", {"test_scales": [1.0, 1.5], "crf": False}),
        ("CRF colour kernel 3 (the code's)", {"crf_bi_rgb": 3.0}),
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


TRAINED = ("synseg", "diclip")  # recipes that train in a work folder and take no ``backbone``


def run(method: str, images: int, out: Path | None, progress: bool = True, rows: list[int] | None = None,
        sd: str | None = None) -> list[dict]:
    """Score the rows of ``ABLATIONS[method]`` (those at the indices ``rows``; default all) on the first
    ``images`` val scenes; ``sd``: a toy SD folder for the SD methods (iseg, diffsegmenter, diclip)."""
    from weakseg.core import TOY_DEMOS
    from weakseg.toy import load_toy_sd
    from weakseg.toy.world import ToyWorld
    from weakseg.eval.runner import evaluate

    if method not in ABLATIONS:
        raise ValueError(f"ablate_toy: no ablation list for {method!r}; known: {', '.join(ABLATIONS)}")
    table = ABLATIONS[method]
    if rows is not None:
        bad = [i for i in rows if not 0 <= i < len(table)]
        if bad:
            raise ValueError(f"ablate_toy: --rows {bad} out of range for {method} (0..{len(table) - 1})")
        table = [table[i] for i in rows]
    if sd is not None and method not in ("iseg", "diffsegmenter", "diclip"):
        raise ValueError(f"ablate_toy: --sd applies to iseg, diffsegmenter and diclip, not {method}")
    recipe = TOY_DEMOS.get(method)
    world = ToyWorld(64, "val", num_scenes=images)
    backbone = load_toy_sd(sd) if sd is not None else None
    results = []
    for label, overrides in table:
        with tempfile.TemporaryDirectory() as work, tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            if method in TRAINED:
                kw = {"sd": backbone} if method == "diclip" and backbone is not None else {}
                entry = recipe(Path(work), progress, **kw, **overrides)
            else:
                entry = recipe(None, progress, backbone=backbone, **overrides)
                backbone = entry.method.sd if hasattr(entry.method, "sd") else entry.method.backbone
            setup = time.perf_counter() - t0
            t0 = time.perf_counter()
            m = evaluate(entry.method, world, tmp, overlays=0, resume=False, progress=progress,
                         method_name=f"{method} {label}", dataset_name="toyworld-val")
            results.append({"setting": label, "overrides": json.loads(json.dumps(overrides, default=list)),
                            "miou": m["percent"]["miou_all"], "miou_present": m["percent"]["miou_present"],
                            "iou": m["percent"]["iou"], "seconds_per_image": m["seconds_per_image"],
                            "setup_s": setup, "wall_s": time.perf_counter() - t0})
        print(f"{label}: mIoU {results[-1]['miou']:.2f}", file=sys.stderr, flush=True)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        from weakseg.bench import machine_facts

        meta = {"method": method, "scenes": f"ToyWorld(64, 'val'), first {images}", "date": time.strftime("%Y-%m-%d"),
                "sd": sd or "the committed toy SD",
                "command": "python " + " ".join(sys.argv), "machine": machine_facts(["cpu"]), "rows": results}
        (out / f"ablate_{method}_toy.json").write_text(json.dumps(meta, indent=2) + "\n")
        md = [f"# {method} ablations on the toy world", "",
              f"{meta['scenes']} scenes, image-level labels given, mIoU over all 6 classes. {meta['date']}, "
              f"`{meta['command']}`.", "", "| setting | mIoU % | s / image |", "|---|---:|---:|"]
        md += [f"| {r['setting']} | {r['miou']:.2f} | {r['seconds_per_image']:.3f} |" for r in results]
        (out / f"ablate_{method}_toy.md").write_text("\n".join(md) + "\n")
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("method", choices=sorted(ABLATIONS))
    p.add_argument("--images", type=int, default=60)
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--rows", default=None, help="comma-separated row indices of the method's list (default: all)")
    p.add_argument("--sd", default=None, help="a toy SD folder to use instead of the committed one")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    rows = [int(x) for x in a.rows.split(",")] if a.rows else None
    run(a.method, a.images, Path(a.out) if a.out else None, progress=not a.quiet, rows=rows, sd=a.sd)
    return 0


if __name__ == "__main__":
    sys.exit(main())
