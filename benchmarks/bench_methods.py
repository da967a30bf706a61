"""Per-image pipeline benchmark of the diffusion methods (iSeg, DiffSegmenter): total time
per image split into the UNet stage (VAE + text encoder + the UNet pass with attention
capture) and the refinement stage (cross-attention fusion, clustering, self-attention
propagation), with peak memory. The methods' own stage timers are used (CUDA-synchronised).

    python benchmarks/bench_methods.py [--model tiny] [--size 512] [--images 3] [--device cpu]
                                       [--methods iseg diffsegmenter] [--out benchmarks/results]

Here (no weights) the models are the tiny random ones (``--model tiny``); on a GPU with the
real weights pass ``--model stabilityai/stable-diffusion-2-1-base`` (iSeg) — the figures that
matter there: iSeg's refinement must stay under 5% of the UNet forward.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch

import weakseg
from weakseg.bench import machine_facts
from weakseg.io import write_text
from weakseg.toy.world import CLASSES, ToyWorld


def run(method_name: str, model: str, size: int, images: int, device: str, classes) -> dict:
    settings = {"model": model, "device": device}
    if method_name == "iseg":
        settings["size"] = size
    else:
        settings["image_size"] = size
    method = weakseg.create(method_name, **settings)
    world = ToyWorld(size=size, split="test", num_scenes=images + 1)
    names = ["background"] + list(classes)
    labels = torch.ones(1, len(names), dtype=torch.bool)
    method.segment([world[images].image], names, labels)  # warm-up (not timed)
    method.timer.reset()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    for i in range(images):
        method.segment([world[i].image], names, labels)
    if device == "cuda":
        torch.cuda.synchronize()
    total = (time.perf_counter() - t0) / images
    unet = method.timer.totals.get("unet", 0.0) / images
    refine = method.timer.totals.get("refine", 0.0) / images
    row = {"method": method_name, "model": model, "device": device, "image": f"{size}x{size}",
           "classes": len(names), "ms_per_image": 1e3 * total, "unet_ms": 1e3 * unet, "refine_ms": 1e3 * refine,
           "refine_vs_unet_pct": 100 * refine / unet if unet else None}
    if device == "cuda":
        row["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
    else:
        row["max_rss_growth_mib"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="*", default=["iseg", "diffsegmenter"])
    p.add_argument("--model", default="tiny")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--images", type=int, default=3)
    p.add_argument("--classes", default=",".join(CLASSES[1:4]), help="comma-separated classes to segment")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    classes = [c for c in a.classes.split(",") if c]
    rows = [run(m, a.model, a.size, a.images, a.device, classes) for m in a.methods]
    cols = ["method", "model", "device", "image", "classes", "ms_per_image", "unet_ms", "refine_ms",
            "refine_vs_unet_pct", "peak_cuda_mib" if a.device == "cuda" else "max_rss_growth_mib"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(f"{r[c]:.1f}" if isinstance(r.get(c), float) else str(r.get(c)) for c in cols)
                     + " |")
    table = "\n".join(lines)
    print(table)
    if a.out:
        facts = machine_facts([a.device])
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        stem = out / f"methods_{a.device}_{a.model.replace('/', '_').replace(':', '-')}_{a.size}"
        write_text(stem.with_suffix(".md"), "# weakseg method pipeline benchmark\n\n"
                   + "\n".join(f"- {k}: {v}" for k, v in facts.items()) + "\n\n" + table + "\n")
        write_text(stem.with_suffix(".json"), json.dumps({"facts": facts, "rows": rows}, indent=2))
        print(f"wrote {stem}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
