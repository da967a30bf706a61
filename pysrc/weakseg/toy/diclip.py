"""DiCLIP on the toy world: the demo entry (:func:`toy_demo`) and the ablation ladder
(:func:`ablation_ladder`, the paper's Table IV on toy scenes).

The demo builds, under ``work_dir`` (the demo gives ``<out>/work/diclip``), a key-value cache (generated
by the toy SD with a short class prompt, or from toy training scenes) and trains the adapter + head for a
short run, both in a subfolder ``run-<key>`` keyed on everything that shapes them (the method's resolved
config, the cache and training settings, the number of training scenes and a digest of the CLIP and SD
weights; written out as ``settings.json``). Both are reused only under the same key (the training resumes
if it was interrupted); other settings or weights get a fresh folder. The method it
returns is the trained head; the baseline is the raw patch-text CAM (no VCE, no cache, no refinement).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from pathlib import Path
from typing import Any

import torch

from weakseg.core import DemoEntry
from weakseg.io import state_digest

__all__ = ["toy_demo", "ablation_ladder", "TOY_CACHE", "TOY_TRAIN", "prepare_toy", "RUNGS"]

# cache build on the toy world: 64 px images from the toy SD with a short prompt (the toy text encoder
# knows captions like "a photo of a red circle on grass", not the paper's long template)
TOY_CACHE: dict[str, Any] = dict(source="generated", images_per_class=6, gen_prompt="a photo of a {c}", gen_steps=15,
                                 gen_guidance=7.5, gen_size=64, gen_resize=None, gen_batch=20, fg_centroids=4,
                                 bg_centroids=6, batch_size=8)
# a short run that fits the demo's budget on a 2-core CPU; pseudo labels refined by CAA only, as the toy
# preset's CAMs (the SD walk spreads them, see PRESETS["toy"]; the head trained on CAA + walk pseudo labels
# scored below the raw CAM: benchmarks/results/toyworld_training_notes.md). 300 iterations, chosen on 100 toy
# val scenes: 33.2 mIoU after 120, 37.6 after 300, 38.0 after 600 (benchmarks/results/toyworld_v2_2026-12-06.md).
# The CAA affinity is never gated by the head's own affinity prediction (caa_seg_from past the run's end; the
# reference gates from 4,000 of 20,000 iterations): after 150 of 300 iterations that prediction is still
# untrained and the pseudo labels lose the small shapes. 200 val scenes, training seeds 0 / 1 / 2 (inference
# at scales 1.0 + 1.5 without CRF): 45.4 / 47.5 / 43.7 against 39.8 / 36.1 / 28.2 with the gate from
# iteration 150 (benchmarks/results/toyworld_v2_2026-12-07.md)
TOY_TRAIN: dict[str, Any] = dict(iterations=300, batch_size=4, warmup_iters=10, caa_seg_from=10 ** 9, save_every=100,
                                 log_every=20, scale_range=(0.75, 1.5), refine=("caa",))
TOY_TRAIN_SCENES = 400


def _method(clip, sd, preset: str, **overrides):
    from weakseg.methods.diclip import DiCLIP, DiCLIPConfig

    return DiCLIP(DiCLIPConfig.from_dict({"preset": preset, **overrides}), clip=clip, sd=sd)


def run_settings(base, copts: dict[str, Any], train_config, train_scenes: int) -> dict[str, Any]:
    """What shapes the toy cache and trained run: the method's resolved config, the cache and training
    settings, the training scenes and the weights' digest (JSON-able)."""
    def plain(x):
        return json.loads(json.dumps(x, default=str, sort_keys=True))

    return {"method_config": plain(dataclasses.asdict(base.config)), "cache": plain(copts),
            "train": plain(dataclasses.asdict(train_config)), "train_scenes": int(train_scenes),
            "weights": state_digest(base.clip, base.sd.vae, base.sd.unet_model, base.sd.text_encoder)}


def prepare_toy(work_dir: Path, progress: bool = True, clip=None, sd=None, preset: str = "toy",
                cache_options: dict | None = None, train_options: dict | None = None,
                train_scenes: int = TOY_TRAIN_SCENES) -> dict[str, Any]:
    """Build (or reuse, under the same settings and weights) the toy cache and trained checkpoint in
    ``work_dir/run-<key>``; returns the paths (``run_dir`` among them), the models and the class names."""
    from weakseg.toy.world import ToyWorld
    from weakseg.methods.diclip.cache import CacheBuildConfig, KVCache, build_cache
    from weakseg.train.diclip import DiCLIPTrainConfig, train_diclip

    from weakseg.io import write_json

    base = _method(clip, sd, preset, cam_source="patch")
    clip, sd = base.clip, base.sd
    copts = {**TOY_CACHE, **(cache_options or {})}
    train_config = DiCLIPTrainConfig.from_dict({**TOY_TRAIN, **(train_options or {})})
    settings = run_settings(base, copts, train_config, train_scenes)
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    root = Path(work_dir) / f"run-{key}"
    root.mkdir(parents=True, exist_ok=True)
    if not (root / "settings.json").exists():
        write_json(root / "settings.json", settings)
    world = ToyWorld(split="train", num_scenes=train_scenes)
    names = list(world.class_names)
    cache_path = root / "cache.safetensors"
    if not cache_path.exists():
        build_cache(base, names, cache_path, CacheBuildConfig.from_dict(copts),
                    dataset=world if copts.get("source") == "dataset" else None, work_dir=root / "cache.work",
                    progress=progress)
    base.cache = KVCache.load(cache_path)
    model_path = root / "train" / "model.safetensors"
    if not model_path.exists():
        train_diclip(base, world, names, root / "train", train_config, progress=progress)
    return {"cache": str(cache_path), "checkpoint": str(model_path), "clip": clip, "sd": sd, "class_names": names,
            "preset": preset, "train_config": train_config, "run_dir": str(root)}


def toy_demo(work_dir: Path, progress: bool = True, clip=None, sd=None, preset: str = "toy",
             cache_options: dict | None = None, train_options: dict | None = None,
             train_scenes: int = TOY_TRAIN_SCENES, **overrides) -> DemoEntry:
    """The DemoEntry of DiCLIP: method = the trained head on the toy CLIP (no SD at inference), baseline =
    the raw patch-text CAM without VCE and cache. ``clip`` / ``sd`` replace the toy-world models (tests
    pass tiny random ones with ``preset="tiny"``); ``overrides`` are DiCLIPConfig fields of the method's
    inference (e.g. ``crf``, ``test_scales``)."""
    p = prepare_toy(work_dir, progress, clip, sd, preset, cache_options, train_options, train_scenes)
    method = _method(p["clip"], p["sd"], preset, **{"mode": "head", "checkpoint": p["checkpoint"],
                                                     "head_use_image_labels": True, **overrides})
    baseline = _method(p["clip"], p["sd"], preset, vce=False, cam_source="patch", refine=())
    return DemoEntry(method=method, baseline=baseline,
                     note="baseline: DiCLIP's raw patch-text CAM (CLIP surgery, no SD attention, no cache, no "
                          "refinement); method: the segmentation head trained on DiCLIP pseudo labels (VCE, "
                          "cache, adapter, the training run's refinement: CAA on the toy world), argmax over "
                          "the image's classes like the baseline, after the preset's DenseCRF")


RUNGS = ("raw", "+vce", "+static cache", "+adapter", "+refinement (pseudo labels)", "head")


def ablation_ladder(work_dir: Path, num_scenes: int = 40, progress: bool = True, clip=None, sd=None,
                    preset: str = "toy", split: str = "test", **prepare_kw) -> dict[str, float]:
    """mIoU (%, "present" convention, image-level labels given) of each rung on ``num_scenes`` toy scenes:
    raw patch-text CAM -> + VCE -> + static cache -> + dynamic adapter (all without refinement) -> the
    dynamic CAM through the training run's refinement (the pseudo labels; on the toy world CAA only, see
    :data:`TOY_TRAIN`) -> the trained head (its argmax restricted to the image's classes, as the CAM rungs
    are). Also the reference's pseudo-label refinement (CAA + 5 SD-walk steps) and the training-free full
    pipeline (static cache + the preset's refinement)."""
    from tqdm.auto import tqdm

    from weakseg.toy.world import ToyWorld
    from weakseg.eval.metrics import ConfusionMatrix
    from weakseg.train.diclip import DiCLIPTrainConfig

    p = prepare_toy(work_dir, progress, clip, sd, preset, **prepare_kw)
    c, s, ck, cache = p["clip"], p["sd"], p["checkpoint"], p["cache"]

    def pseudo_refine(cfg):
        return dict(refine=cfg.refine, caa_threshold=cfg.caa_threshold, walk_steps=cfg.walk_steps)

    rungs = {
        "raw": dict(vce=False, cam_source="patch", refine=()),
        "+vce": dict(vce=True, cam_source="patch", refine=()),
        "+static cache": dict(vce=True, cam_source="static", cache=cache, refine=()),
        "+adapter": dict(vce=True, cam_source="dynamic", checkpoint=ck, refine=()),
        "+refinement (pseudo labels)": dict(vce=True, cam_source="dynamic", checkpoint=ck,
                                            **pseudo_refine(p["train_config"])),
        "head": dict(mode="head", checkpoint=ck, head_use_image_labels=True),
        "+caa/walk (the reference's pseudo labels)": dict(vce=True, cam_source="dynamic", checkpoint=ck,
                                                          **pseudo_refine(DiCLIPTrainConfig())),
        "static + refinement (training-free)": dict(vce=True, cam_source="static", cache=cache),
    }
    world = ToyWorld(split=split, num_scenes=num_scenes)
    names = list(world.class_names)
    scenes = [world[i] for i in range(num_scenes)]
    out: dict[str, float] = {}
    for name, opts in tqdm(rungs.items(), desc="diclip ladder", disable=not progress):
        m = _method(c, s, preset, **opts)
        cm = ConfusionMatrix(len(names))
        for sc in scenes:
            lab = torch.zeros(1, len(names), dtype=torch.bool)
            lab[0, sc.image_labels] = True
            res = m.segment([sc.image], names, lab)
            cm.update(res.labels[0], sc.label)
        v = cm.miou("present")
        out[name] = round(100 * v, 2) if not math.isnan(v) else float("nan")
    return out


def main(argv=None) -> int:
    """``python -m weakseg.toy.diclip --work DIR [--scenes N]``: the ablation ladder on the toy
    world (the committed toy weights), printed as JSON."""
    import argparse
    import json

    ap = argparse.ArgumentParser(prog="python -m weakseg.toy.diclip", description=main.__doc__)
    ap.add_argument("--work", required=True, help="work directory (cache and training run are kept there)")
    ap.add_argument("--scenes", type=int, default=40, help="held-out toy scenes to score")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    print(json.dumps(ablation_ladder(Path(args.work), num_scenes=args.scenes, progress=not args.quiet), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
