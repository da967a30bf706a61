"""``weakseg bank build|info``: ModuSeg's feature banks from the command line (registered in
:data:`weakseg.core.COMMANDS`)."""

from __future__ import annotations

import argparse
import json

from weakseg.core import COMMANDS, GENERATED_DATASETS
from weakseg.eval.arguments import check_out_file

__all__ = ["add_parser"]


def _build(args: argparse.Namespace) -> int:
    import weakseg
    from weakseg.eval import open_eval_dataset

    generated = args.dataset in GENERATED_DATASETS
    ds_kwargs = {"num_scenes": args.limit} if generated and args.limit is not None else {}
    check_out_file(args.out)
    dataset = open_eval_dataset(args.dataset, args.root, args.split or "train", **ds_kwargs)
    overrides = {"backbone": args.backbone} if args.backbone else {}
    seg = weakseg.create("moduseg", config_file=args.config, set_options=args.set or (), bank=None, **overrides)
    pseudo = args.pseudo_masks
    if args.pseudo_method:
        pseudo = weakseg.create(args.pseudo_method, config_file=args.pseudo_config, set_options=args.pseudo_set or ())
    bank = seg.build_bank(dataset, args.out, pseudo=pseudo, limit=args.limit, progress=not args.quiet,
                          resume=not args.restart, dataset_name=args.dataset)
    if bank is not None:
        print(json.dumps({"out": args.out, "rows": len(bank), "dim": bank.dim, "backbone": bank.backbone,
                          "per_class": bank.counts()}, indent=2))
    return 0


def _info(args: argparse.Namespace) -> int:
    from weakseg.methods.moduseg import FeatureBank

    bank = FeatureBank.load(args.bank)
    print(json.dumps({"bank": args.bank, "rows": len(bank), "dim": bank.dim, "backbone": bank.backbone,
                      "images": len(bank.samples), "per_class": bank.counts(), "build": bank.build,
                      "filter_report": bank.report}, indent=2))
    return 0


@COMMANDS.register("bank")
def add_parser(sub) -> None:
    bank = sub.add_parser("bank", help="ModuSeg feature banks: build, info")
    bsub = bank.add_subparsers(dest="bank_command", metavar="BANK_COMMAND", required=True)
    s = bsub.add_parser("build", help="build a feature bank from pseudo masks (resumable, torchrun-shardable)")
    src = s.add_mutually_exclusive_group(required=True)
    src.add_argument("--pseudo-masks", metavar="DIR", help="folder of <sample name>.png class-id maps")
    src.add_argument("--pseudo-method", metavar="NAME", help="a registered method run with the image-level labels")
    s.add_argument("--pseudo-set", nargs="*", default=None, metavar="KEY=VALUE", help="options of --pseudo-method")
    s.add_argument("--pseudo-config", default=None, help="a TOML/YAML/JSON file of --pseudo-method options")
    s.add_argument("--dataset", required=True, help="a dataset name (as for eval) whose images build the bank")
    s.add_argument("--root", default=None, help="dataset root directory (not needed for toyworld)")
    s.add_argument("--split", default=None, help="split (default: train)")
    s.add_argument("--limit", type=int, default=None, help="only the first N images")
    s.add_argument("--out", required=True, metavar="BANK", help="the bank file to write (.safetensors)")
    s.add_argument("--backbone", default=None, help="dense features: dinov2 or clip-dense (--set backbone_model=...)")
    s.add_argument("--config", default=None, help="a TOML/YAML/JSON file of moduseg options")
    s.add_argument("--set", nargs="*", default=None, metavar="KEY=VALUE", help="moduseg options (ModuSegConfig)")
    s.add_argument("--restart", action="store_true", help="discard partial results in BANK.parts and start over")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=_build)
    s = bsub.add_parser("info", help="what a feature bank holds")
    s.add_argument("bank", metavar="BANK")
    s.set_defaults(func=_info)
