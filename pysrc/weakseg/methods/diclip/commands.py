"""``weakseg cache build``: DiCLIP's key-value cache from the command line (registered in
:data:`weakseg.core.COMMANDS`)."""

from __future__ import annotations

import argparse
import json

from weakseg.core import COMMANDS, parse_set_options
from weakseg.eval.arguments import check_out_file, class_names_arg, open_train_dataset

__all__ = ["add_parser"]


def _build(args: argparse.Namespace) -> int:
    import weakseg
    from weakseg.methods.diclip.cache import CacheBuildConfig, build_cache

    check_out_file(args.out)
    opts = parse_set_options(args.build or (), CacheBuildConfig)
    dataset = None
    if args.dataset:
        if args.classes:
            raise ValueError("--classes: the class names come from --dataset; give one of the two")
        dataset = open_train_dataset(args.dataset, args.root, args.split, args.limit)
        opts.setdefault("source", "dataset")
        names = list(dataset.class_names)
    else:
        if not args.classes:
            raise ValueError("cache build: give --dataset (real images) or --classes (generated images)")
        opts.setdefault("source", "generated")
        names = class_names_arg(args.classes)
    method = weakseg.create("diclip", config_file=args.config, set_options=args.set or ())
    if args.images_per_class is not None:
        opts["images_per_class"] = args.images_per_class
    if args.limit is not None and args.dataset:
        opts["max_images"] = args.limit
    cache = build_cache(method, names, args.out, CacheBuildConfig.from_dict(opts), dataset=dataset,
                        work_dir=args.work_dir, progress=not args.quiet)
    print(json.dumps({"out": args.out, "keys": cache.num_keys, "embed_dim": cache.embed_dim,
                      "class_names": cache.class_names, "counts": cache.meta.get("counts")}, indent=2))
    return 0


@COMMANDS.register("cache")
def add_parser(sub) -> None:
    c = sub.add_parser("cache", help="DiCLIP's key-value cache").add_subparsers(dest="cache_command", metavar="ACTION")
    s = c.add_parser("build", help="build the cache from SD-generated images (--classes) or a dataset (--dataset)")
    s.add_argument("--out", required=True, help="the cache file to write (.safetensors)")
    s.add_argument("--classes", default=None, help="voc, coco, toyworld or a,b,c (generated images)")
    s.add_argument("--dataset", default=None, help="build from real images: voc, coco_object, ..., toyworld")
    s.add_argument("--root", default=None, help="dataset root directory")
    s.add_argument("--split", default=None, help="dataset split (default: train)")
    s.add_argument("--limit", type=int, default=None, help="use only the first N dataset images")
    s.add_argument("--images-per-class", type=int, default=None, help="generated images per class (default 100)")
    s.add_argument("--work-dir", default=None, help="per-image results (default: <out>.work); reruns resume there")
    s.add_argument("--config", default=None, help="a TOML/YAML/JSON file of DiCLIP options")
    s.add_argument("--set", nargs="*", default=None, metavar="KEY=VALUE", help="DiCLIP options (e.g. preset=voc)")
    s.add_argument("--build", nargs="*", default=None, metavar="KEY=VALUE",
                   help="build options (fg_centroids, bg_centroids, gen_steps, ...; see CacheBuildConfig)")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=_build)
