"""SynSeg inference speed at batch 1, 224 px: the single view and the 5-view batch (whole image + 4
quadrants), through the exported image graph (encoder blocks up to the last extracted one + FiLM + decoder
+ transposed conv + sigmoid) in eager mode, under ``torch.compile`` and (CUDA only) replayed as a CUDA
graph. Every variant is first checked against eager (max abs difference of the probabilities), then timed.
The end-to-end ``segment()`` (resize, views, stitch, labels) is timed eagerly for reference.

    python benchmarks/bench_synseg.py [--model tiny|ViT-B-16] [--classes 21] [--device cpu|cuda]
                                      [--repeats 20] [--no-compile] [--out benchmarks/results]

``--model tiny``: a random-weight open_clip ViT (224 px, patch 16, width 192, 10 blocks, 3 heads; the
decoder at the paper's sizes: reduce 64, layers (3, 6, 9)); ``ViT-B-16``: the real architecture with random
weights (no download; the speed does not depend on the weights).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import time
from pathlib import Path

import torch


def _clip(model: str, device: str):
    from weakseg.backbones.clip import CLIPBackbone

    if model == "tiny":
        return CLIPBackbone.tiny(seed=0, image_size=224, patch_size=16, width=192, layers=10, heads=3, embed_dim=64,
                                 device=device)
    return CLIPBackbone.from_pretrained(model, pretrained=None, device=device)


def _time(fn, repeats: int, device: str) -> float:
    for _ in range(2):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    times.sort()
    return 1e3 * times[len(times) // 2]  # median ms


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--classes", type=int, default=21)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--note", default="", help="a line about the machine for the report")
    ap.add_argument("--out", default=None, help="directory for synseg_<device>_<model>.json / .md")
    args = ap.parse_args(argv)
    from weakseg.methods.synseg import SynSeg, SynSegConfig

    dev = args.device
    clip = _clip(args.model, dev)
    m = SynSeg(SynSegConfig(device=dev, clip_model=args.model, size=224), clip=clip)
    graphs = m.export_graphs()
    net = graphs.image_model
    names = [f"class {i}" for i in range(args.classes)]
    text = m.text_embeddings(names)
    g = torch.Generator().manual_seed(0)
    img = torch.randint(0, 256, (1, 3, 448, 448), dtype=torch.uint8, generator=g)
    inputs = {1: torch.randn(1, 3, 224, 224, generator=g).to(dev), 5: torch.randn(5, 3, 224, 224, generator=g).to(dev)}
    rows = []
    for views, x in inputs.items():
        with torch.inference_mode():
            ref = net(x, text)
        variants = {"eager": lambda x=x: net(x, text)}
        if not args.no_compile:
            compiled = torch.compile(net, dynamic=False)
            variants["torch.compile"] = lambda x=x, c=compiled: c(x, text)
        if dev == "cuda":
            static_x, static_t = x.clone(), text.clone()
            with torch.inference_mode():
                s = torch.cuda.Stream()
                s.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(s):
                    for _ in range(3):
                        net(static_x, static_t)
                torch.cuda.current_stream().wait_stream(s)
                cg = torch.cuda.CUDAGraph()
                with torch.cuda.graph(cg):
                    static_out = net(static_x, static_t)

            def replay(cg=cg, out=static_out):
                cg.replay()
                return out

            variants["cuda graph"] = replay
        base_ms = None
        for name, fn in variants.items():
            t_compile = time.perf_counter()
            with torch.inference_mode():
                out = fn()
            first_s = time.perf_counter() - t_compile
            err = float((out.float() - ref.float()).abs().max())
            if err > 1e-3:
                raise SystemExit(f"{name} ({views} views): max abs difference {err:.2e} to eager; not timing it")
            with torch.inference_mode():
                ms = _time(fn, args.repeats, dev)
            base_ms = ms if name == "eager" else base_ms
            rows.append({"views": views, "variant": name, "ms": ms, "speedup_vs_eager": base_ms / ms,
                         "max_abs_err_vs_eager": err, "first_call_s": first_s})
            print(f"{views} view(s) {name:>14}: {ms:8.2f} ms  x{base_ms / ms:.2f}  (err {err:.1e})", flush=True)
    for views in (1, 5):
        m.config.views = views
        ms = _time(lambda: m.segment(img, ["background"] + names), max(3, args.repeats // 4), dev)
        rows.append({"views": views, "variant": "segment() end to end, 448 px image", "ms": ms,
                     "speedup_vs_eager": None, "max_abs_err_vs_eager": None, "first_call_s": None})
        print(f"{views} view(s) segment(): {ms:.2f} ms", flush=True)
    meta = {"date": datetime.date.today().isoformat(), "device": dev,
            "machine": (torch.cuda.get_device_name(0) if dev == "cuda" else
                        f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} torch threads"),
            "note": args.note, "torch": torch.__version__, "model": args.model, "classes": args.classes,
            "head_params": sum(p.numel() for p in m.head.parameters()),
            "command": "python benchmarks/bench_synseg.py " + " ".join(argv if argv is not None else
                                                                      __import__("sys").argv[1:])}
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        stem = f"synseg_{dev}_{args.model}"
        (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
        lines = [f"# SynSeg inference, batch 1, 224 px ({meta['date']})", "",
                 f"Machine: {meta['machine']}; torch {meta['torch']}; model {args.model} (random weights); "
                 f"{args.classes} classes; trained head {meta['head_params']} parameters.",
                 *([f"Note: {args.note}"] if args.note else []), "",
                 f"Command: `{meta['command']}`", "",
                 "| views | variant | median ms | × eager | max abs err vs eager |", "|---:|---|---:|---:|---:|"]
        for r in rows:
            sp = "-" if r["speedup_vs_eager"] is None else f"{r['speedup_vs_eager']:.2f}"
            er = "-" if r["max_abs_err_vs_eager"] is None else f"{r['max_abs_err_vs_eager']:.1e}"
            lines.append(f"| {r['views']} | {r['variant']} | {r['ms']:.2f} | {sp} | {er} |")
        (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
