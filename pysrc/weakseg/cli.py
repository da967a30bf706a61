"""The ``weakseg`` command line.

    weakseg info                 version, compiled ops and kernels, devices
    weakseg bench [--ops ...]    microbenchmarks of the ops (verify, then time)
    weakseg demo --out DIR       the demonstration job on generated data
    weakseg segment IMAGE... --method M --classes a,b [--set k=v ...] --out DIR
                                 segment images with a method: label PNGs and overlays
    weakseg eval --method M --dataset D [--root DIR] [--split S] [--set k=v ...] --out DIR
                                 score a method on a dataset (resumable, torchrun-shardable)
    weakseg bank build (--pseudo-masks DIR | --pseudo-method M) --dataset D --out BANK [--set k=v ...]
                                 ModuSeg's feature bank (resumable, torchrun-shardable)
    weakseg bank info BANK       what a feature bank holds
    weakseg cache build --out FILE [--dataset D --root DIR | --classes voc|toyworld|a,b] [--set k=v ...]
                                 build DiCLIP's key-value cache (generated or real images; resumable)
    weakseg train diclip --dataset D [--root DIR] --cache FILE --out DIR [--set k=v] [--train k=v]
                                 DiCLIP's single-stage training (adapter + head; resumable, torchrun DDP)
    weakseg train synseg --data SHARDS|FOLDER|toyworld --out DIR [--set k=v] [--train k=v]
                                 SynSeg on image-caption pairs (FiLM + decoder + projector; resumable, DDP)
    weakseg export NAME --format onnx|tensorrt|aoti --out DIR [--classes a,b] [--set k=v ...]
                                 deployable graphs of a method (README: Deployment)
    weakseg bench e2e --engine torch|onnx|aoti|tensorrt --model DIR
                                 end-to-end images/s of an exported model (verified against torch first)
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

from weakseg.eval.arguments import check_out_dir, class_list


def _info(args: argparse.Namespace) -> int:
    import torch

    import weakseg
    from weakseg.ops import extension
    from weakseg.ops import OPS

    facts = {
        "weakseg": weakseg.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "extension": extension.HAS_EXT,
        "extension_error": extension.extension_error(),
        "built_with_cuda": extension.built_with_cuda(),
        "ops": {op: {"cpu": extension.has_kernel(op, "cpu"), "cuda": extension.has_kernel(op, "cuda")} for op in OPS},
        "cuda_available": torch.cuda.is_available(),
        "devices": ["cpu"] + [f"cuda:{i} {torch.cuda.get_device_name(i)}" for i in range(torch.cuda.device_count())],
        "methods": weakseg.list_methods(),
    }
    if args.json:
        print(json.dumps(facts, indent=2))
        return 0
    print(f"weakseg {facts['weakseg']}  (python {facts['python']}, torch {facts['torch']}, "
          f"torch CUDA {facts['torch_cuda'] or 'none'})")
    if facts["extension"]:
        print(f"compiled extension: loaded; CUDA kernels compiled: {'yes' if facts['built_with_cuda'] else 'no'}")
    else:
        print(f"compiled extension: MISSING ({facts['extension_error']}); ops run on their PyTorch references")
    for op, k in facts["ops"].items():
        print(f"  {op:<18} cpu: {'kernel' if k['cpu'] else 'reference'}   cuda: {'kernel' if k['cuda'] else '-'}")
    print("devices:", ", ".join(facts["devices"]))
    print("methods:", ", ".join(facts["methods"]) or "(none registered yet)")
    return 0


def _bench(args: argparse.Namespace) -> int:
    if args.suite == "e2e":
        return _bench_e2e(args)
    if args.engine or args.model:
        raise ValueError("--engine/--model: only for `weakseg bench e2e`")
    from weakseg.bench import run_op_benchmarks

    return run_op_benchmarks(ops=args.ops, devices=args.device, out=args.out, quick=args.quick)


def _bench_e2e(args: argparse.Namespace) -> int:
    from weakseg.export.bench_e2e import bench_e2e, write_results

    if not args.model:
        raise ValueError("--model: `weakseg bench e2e` needs an exported model directory (weakseg export ...)")
    engines = args.engine or ["torch"]
    device = (args.device or ["cpu"])[0]
    results = []
    for eng in engines:
        r = bench_e2e(args.model, eng, device=device, images=args.images, batch=args.batch, threads=args.threads)
        results.append(r)
        print(f"{eng:>9} on {r['device']}: {r['images_per_s']:.1f} images/s ({r['ms_per_image']:.2f} ms/image; "
              f"verified: max |diff| {r['verify']['max_abs_diff']:.2e}, labels {r['verify']['label_agreement']:.4f})")
    if args.out:
        cmd = "weakseg " + " ".join(sys.argv[1:]) if sys.argv and "weakseg" in sys.argv[0] else "weakseg bench e2e"
        p = write_results(results, args.out, cmd, args.machine or platform.platform())
        print(f"results: {p}")
    return 0


def _export(args: argparse.Namespace) -> int:
    import weakseg
    from weakseg.export.exporter import FORMATS, export, graphs_of

    if args.format not in FORMATS:
        raise ValueError(f"--format: unknown format {args.format!r}; expected one of {', '.join(FORMATS)}")
    classes = None
    check_out_dir(args.out)
    if args.classes is not None:
        classes = class_list(args.classes, background=None)
    if args.method not in weakseg.list_methods():
        raise ValueError(f"NAME: unknown method {args.method!r}; registered: {', '.join(weakseg.list_methods())}")
    from weakseg.core import METHODS

    if not callable(getattr(METHODS.get(args.method), "export_graphs", None)):
        able = [n for n in weakseg.list_methods() if callable(getattr(METHODS.get(n), "export_graphs", None))]
        raise ValueError(f"NAME: method {args.method!r} cannot be exported (it has no export_graphs()); exportable "
                         f"methods: {', '.join(able) or 'none'}")
    method = weakseg.create(args.method, config_file=args.config, set_options=args.set or ())
    graphs = graphs_of(method, args.method)
    manifest = export(graphs, args.format, args.out, classes)
    print(json.dumps({"out": args.out, "format": args.format, "files": manifest["files"],
                      "classes": manifest["classes"]}, indent=2))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from weakseg.demo import DEFAULT_IMAGES, run_demo

    check_out_dir(args.out)
    methods = [m for m in args.methods.split(",") if m] if args.methods else None
    report = run_demo(args.out, num_images=args.images or DEFAULT_IMAGES, methods=methods, overlays=args.overlays,
                      progress=not args.quiet, threads=args.threads)
    print(json.dumps({k: report[k] for k in ("dataset", "num_images", "methods")}, indent=2))
    print(f"report: {Path(args.out) / 'report.md'}")
    return 0


def _output_stems(paths: list[str]) -> list[str]:
    """File-name stems for the outputs of ``paths``: the image's stem, and where stems collide
    (``a/x.png b/x.png``) the shortest run of parent folders that tells the colliding images apart, joined by
    ``_`` (``a_x``, ``b_x``); failing that, with the extension (``x_jpg``, ``c_x_png``). The same file twice
    is refused."""
    resolved = [Path(p).resolve() for p in paths]
    first: dict[Path, str] = {}
    for p, r in zip(paths, resolved):
        if r in first:
            also = f" (also as {first[r]})" if first[r] != p else ""
            raise ValueError(f"IMAGE: {p} is given more than once{also}")
        first[r] = p
    stems = [r.stem for r in resolved]
    out = list(stems)

    def candidates(i: int, depth: int) -> list[str]:
        parents, r = resolved[i].parent.parts[1:], resolved[i]
        tail = [parents[-k:] if k else () for k in range(depth + 1)]
        return ["_".join(t + (r.stem,)) for t in tail[1:]] + ["_".join(t + (r.name.replace(".", "_"),)) for t in tail]

    for stem in dict.fromkeys(stems):
        idx = [i for i, s in enumerate(stems) if s == stem]
        if len(idx) == 1:
            continue
        taken = {s for s in stems if s != stem}
        depth = max(len(resolved[i].parent.parts) - 1 for i in idx)
        cands = {i: candidates(i, depth) for i in idx}
        # each image: its first candidate that no other colliding image has at the same level
        for i in idx:
            out[i] = next((c for lvl, c in enumerate(cands[i]) if c not in taken
                           and all(cands[j][lvl] != c for j in idx if j != i)), cands[i][-1])
        if len({out[i] for i in idx}) < len(idx):  # rare: fall back to one level for the whole group
            for names in zip(*cands.values()):
                if len(set(names)) == len(names) and not taken & set(names):
                    for i, n in zip(idx, names):
                        out[i] = n
                    break
    return out


def _segment(args: argparse.Namespace) -> int:
    import torch

    import weakseg
    from weakseg.eval.visualize import colorize, overlay_panel
    from weakseg.io import check_image_file, read_image, save_png, save_safetensors

    names = class_list(args.classes, background=not args.no_background)
    check_out_dir(args.out)
    for path in args.images:  # every input is checked before the (possibly slow) model load
        check_image_file(path, "IMAGE")
    stems = _output_stems(args.images)
    method = weakseg.create(args.method, config_file=args.config, set_options=args.set or ())
    out = Path(args.out)
    results = []
    for path, stem in zip(args.images, stems):
        image = read_image(path, "IMAGE")
        # the given classes are the ones to segment; --open-vocab lets the method pick among them
        given = None if args.open_vocab else torch.ones(1, len(names), dtype=torch.bool)
        res = method.segment([image], names, given)
        labels = res.labels[0].cpu()
        save_png(colorize(labels), out / f"{stem}_labels.png")
        save_png(overlay_panel(image, None, labels, class_names=names), out / f"{stem}_overlay.png")
        if args.save_scores:
            save_safetensors({"scores": res.scores[0].float(), "labels": labels}, out / f"{stem}_scores.safetensors",
                             metadata={"class_names": json.dumps(res.class_names), "method": args.method})
        counts = torch.bincount(labels.flatten().clamp(0, 255), minlength=len(names))
        results.append({"image": str(path), "output": stem,
                        "pixels": {n: int(counts[i]) for i, n in enumerate(names)}})
    print(json.dumps({"out": str(out), "class_names": names, "images": results}, indent=2))
    return 0


def _eval(args: argparse.Namespace) -> int:
    import weakseg
    from weakseg.eval import evaluate, open_eval_dataset

    ds_kwargs = {}
    if args.dataset == "toyworld" and args.limit is not None:
        ds_kwargs["num_scenes"] = args.limit
    check_out_dir(args.out)
    dataset = open_eval_dataset(args.dataset, args.root, args.split, **ds_kwargs)
    method = weakseg.create(args.method, config_file=args.config, set_options=args.set or ())
    out = args.out or f"outputs/eval/{args.method}_{args.dataset}"
    metrics = evaluate(method, dataset, out, use_image_labels=not args.no_image_labels, limit=args.limit,
                       overlays=args.overlays, resume=not args.no_resume, progress=not args.quiet,
                       method_name=args.method, dataset_name=args.dataset)
    pct = metrics.get("percent", {})
    print(json.dumps({"out": out, "num_images": metrics["num_images"],
                      **{k: v for k, v in pct.items() if k.startswith("miou") or k == "pixel_accuracy"}}, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="weakseg", description="Weakly-supervised and training-free semantic segmentation.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    s = sub.add_parser("info", help="version, compiled ops and CUDA kernels, devices")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(func=_info)

    s = sub.add_parser("bench", help="microbenchmarks of the ops: correctness first, then timing vs references")
    s.add_argument("--ops", nargs="*", default=None, help="ops to run (default: all)")
    s.add_argument("--device", nargs="*", default=None, help="devices (default: cpu, and cuda when present)")
    s.add_argument("--out", default=None, help="directory for results (markdown + json)")
    s.add_argument("--quick", action="store_true", help="small sizes, few repeats (smoke run)")
    s.add_argument("suite", nargs="?", default="ops", choices=["ops", "e2e"],
                   help="ops (default): the op microbenchmarks; e2e: an exported model end to end")
    s.add_argument("--engine", nargs="*", default=None, choices=["torch", "onnx", "aoti", "tensorrt"],
                   help="e2e: engines to time (default: torch)")
    s.add_argument("--model", default=None, metavar="DIR", help="e2e: an exported model directory")
    s.add_argument("--images", type=int, default=32, help="e2e: images per timed pass (default 32)")
    s.add_argument("--batch", type=int, default=4, help="e2e: batch size (default 4)")
    s.add_argument("--threads", type=int, default=None, help="e2e: CPU threads (torch and onnxruntime)")
    s.add_argument("--machine", default=None, help="e2e: machine description for the results file")
    s.set_defaults(func=_bench)

    s = sub.add_parser("demo", help="every method on held-out toy-world scenes: report.json, report.md, overlays")
    s.add_argument("--out", default="outputs/demo", help="output directory (default: outputs/demo)")
    s.add_argument("--images", type=int, default=None, help="number of held-out scenes (default: 100)")
    s.add_argument("--methods", default=None, help="comma-separated methods (default: all with a toy configuration)")
    s.add_argument("--overlays", type=int, default=4, help="overlay panels per method (default: 4)")
    s.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    s.add_argument("--quiet", action="store_true", help="no progress bars")
    s.set_defaults(func=_demo)

    s = sub.add_parser("segment", help="segment images with a method; writes label PNGs and overlays to --out")
    s.add_argument("images", nargs="+", metavar="IMAGE", help="image files (any format PIL reads)")
    s.add_argument("--method", required=True, help="a registered method (weakseg info lists them)")
    s.add_argument("--classes", required=True, help="comma-separated candidate classes, e.g. cat,dog")
    s.add_argument("--no-background", action="store_true", help="no background class: plain argmax over --classes")
    s.add_argument("--config", default=None, help="a TOML/YAML/JSON file of method options")
    s.add_argument("--set", nargs="*", default=None, metavar="KEY=VALUE", help="method options")
    s.add_argument("--out", default="outputs/segment", help="output directory (default: outputs/segment)")
    s.add_argument("--save-scores", action="store_true", help="also write the per-class scores (safetensors)")
    s.add_argument("--open-vocab", action="store_true",
                   help="treat --classes as a vocabulary: the method's tagger picks the classes present")
    s.set_defaults(func=_segment)

    s = sub.add_parser("eval", help="score a method on a dataset: metrics.json, metrics.md, overlays; resumable")
    s.add_argument("--method", required=True, help="a registered method (weakseg info lists them)")
    s.add_argument("--dataset", required=True,
                   help="voc, coco_object, context59, context60, cityscapes, ade20k, coco_stuff, folder or toyworld")
    s.add_argument("--root", default=None, help="dataset root directory (not needed for toyworld)")
    s.add_argument("--split", default=None, help="split (default: val; test for toyworld)")
    s.add_argument("--config", default=None, help="a TOML/YAML/JSON file of method options")
    s.add_argument("--set", nargs="*", default=None, metavar="KEY=VALUE", help="method options")
    s.add_argument("--out", default=None, help="output directory (default: outputs/eval/<method>_<dataset>)")
    s.add_argument("--limit", type=int, default=None, help="only the first N images")
    s.add_argument("--overlays", type=int, default=8, help="image | GT | prediction panels to write")
    s.add_argument("--no-image-labels", action="store_true",
                   help="do not give the method the image-level labels (open-vocabulary protocol)")
    s.add_argument("--no-resume", action="store_true", help="recompute images whose prediction is cached")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=_eval)

    from weakseg.core import COMMANDS, TRAINERS

    for name in COMMANDS.names():  # the command groups methods register (bank, cache, ...)
        COMMANDS.get(name)(sub)

    s = sub.add_parser("export", help="export a method's deployable graphs: ONNX, TensorRT or AOTInductor")
    s.add_argument("method", metavar="NAME", help="a registered method with export_graphs() (diclip, synseg)")
    s.add_argument("--format", required=True, help="onnx, tensorrt or aoti")
    s.add_argument("--out", required=True, metavar="DIR", help="the model directory to write")
    s.add_argument("--classes", default=None,
                   help="comma-separated class list whose text embeddings are written (default: the method's own, "
                        "e.g. a trained head's classes)")
    s.add_argument("--config", default=None, help="a TOML/YAML/JSON file of method options")
    s.add_argument("--set", nargs="*", default=None, metavar="KEY=VALUE", help="method options")
    s.set_defaults(func=_export)

    t = sub.add_parser("train", help="training loops").add_subparsers(dest="train_command", metavar="METHOD")
    for name in TRAINERS.names():  # each trainer adds `weakseg train <method>`
        TRAINERS.get(name)(t)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    # Bad input and failed downloads or file access end in one line and exit status 2 (Ctrl-C: 130); the
    # errors are weakseg's own checks (ValueError, TypeError, KeyError, FileNotFoundError), missing optional
    # packages and OSError (files, hub). Anything else is a bug and keeps its traceback.
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"weakseg {args.command}: interrupted", file=sys.stderr)
        return 130
    except (ValueError, TypeError, KeyError, ImportError, OSError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"weakseg {args.command}: error: {' '.join(str(msg).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
