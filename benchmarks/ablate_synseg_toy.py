"""SynSeg's loss ablation on the toy world (the paper's Table III: which of the four MCCL losses matter).

For each loss subset — all four, each one dropped, and L_ft alone — SynSeg is trained on toy-world
captions only (no masks; :func:`weakseg.train.synseg.ablation`), then scored on held-out toy scenes:
mIoU % over all classes with the image-level labels given (the demo's protocol) and without them
(open vocabulary over the toy classes), next to the raw patch-text baseline and the untrained head.

    python benchmarks/ablate_synseg_toy.py --work outputs/synseg_ablation [--scenes 40] [--iterations 400]
        [--clip toy|tiny] [--views 5 1] [--out benchmarks/results]

``--clip toy`` (default) needs the committed toy CLIP (``weakseg/toy/weights/clip``; a missing one is
reported with its path and the training command); ``--clip tiny`` runs the same pipeline on the random tiny
CLIP (a smoke test: its numbers mean nothing). Trained runs are kept under ``--work`` and reused.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path

import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", required=True, help="work directory (trained runs are reused)")
    ap.add_argument("--clip", choices=("toy", "tiny"), default="toy")
    ap.add_argument("--scenes", type=int, default=40, help="held-out toy scenes to score")
    ap.add_argument("--iterations", type=int, default=None, help="training iterations (default: the toy preset's)")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--train-scenes", type=int, default=None)
    ap.add_argument("--views", type=int, nargs="+", default=[5, 1])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="directory for synseg_ablation_<clip>.json / .md")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from weakseg.toy.synseg import TOY_TRAIN, TOY_TRAIN_SCENES, ablation

    if args.clip == "toy":
        from weakseg.toy import load_toy_clip

        try:
            clip = load_toy_clip()
        except FileNotFoundError as e:
            print(f"ablate_synseg_toy: {e}", file=sys.stderr)
            return 2
        preset = "toy"
    else:
        from weakseg.backbones.clip import CLIPBackbone

        clip, preset = CLIPBackbone.tiny(seed=0), "tiny"
    train = dict(TOY_TRAIN)
    if args.iterations is not None:
        train.update(iterations=args.iterations, save_every=max(1, args.iterations // 4),
                     log_every=max(1, args.iterations // 20))
    if args.batch_size is not None:
        train["batch_size"] = args.batch_size
    scenes = args.train_scenes or TOY_TRAIN_SCENES
    t0 = time.perf_counter()
    res = ablation(Path(args.work), num_scenes=args.scenes, clip=clip, preset=preset, progress=not args.quiet,
                   train_options=train, train_scenes=scenes, views=tuple(args.views))
    seconds = time.perf_counter() - t0
    meta = {"date": datetime.date.today().isoformat(), "clip": args.clip, "train": train, "train_scenes": scenes,
            "test_scenes": args.scenes, "seconds": round(seconds, 1),
            "machine": f"{platform.machine()} CPU, {args.threads} torch thread(s)",
            "command": "python benchmarks/ablate_synseg_toy.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    lines = [f"# SynSeg loss ablation on the toy world ({meta['date']}, CLIP: {args.clip})", "",
             f"Trained on {scenes} toy captions ({train['iterations']} iterations, batch {train['batch_size']}), "
             f"scored on {args.scenes} held-out scenes; mIoU % over all classes. Total {seconds:.0f} s.", "",
             f"Command: `{meta['command']}`", "",
             "| run | λ (ft, fb, bb, ff) | mIoU (labels given) | mIoU (open vocab) | final ft / fb / bb / ff |",
             "|---|---|---:|---:|---|"]
    for name, r in res.items():
        w = "-" if r["weights"] is None else ", ".join(f"{x:g}" for x in r["weights"])
        fl = "-" if r["final_loss"] is None else " / ".join(f"{r['final_loss'][k]:.3f}" for k in ("ft", "fb", "bb", "ff"))
        lines.append(f"| {name} | {w} | {r['miou']:.2f} | {r['miou_open']:.2f} | {fl} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"synseg_ablation_{args.clip}.json").write_text(json.dumps({"meta": meta, "results": res}, indent=2)
                                                              + "\n")
        (out / f"synseg_ablation_{args.clip}.md").write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
