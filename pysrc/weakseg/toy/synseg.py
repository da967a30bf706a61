"""SynSeg on the toy world: the demo entry (:func:`toy_demo`, SynSeg trained on toy captions only) and
the loss ablation (:func:`ablation`, the paper's Table III on toy scenes)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import torch

from weakseg.core import DemoEntry
from weakseg.methods.synseg import SynSeg, SynSegConfig
from weakseg.toy import load_toy_clip
from weakseg.toy.world import ToyCaptions, ToyWorld
from weakseg.train.synseg import SynSegTrainConfig, train_synseg

__all__ = ["TOY_TRAIN", "TOY_TRAIN_SCENES", "TOY_TRAIN_CROPS", "train_toy", "toy_demo", "ablation"]

# a short run on toy captions that fits the demo's budget on one CPU thread
TOY_TRAIN: dict[str, Any] = dict(iterations=400, batch_size=16, save_every=100, log_every=25,
                                 scale_range=(0.6, 1.0))
TOY_TRAIN_SCENES = 400
# single-object crops added to the training captions (ToyCaptions(crops=...)): with the crops CLIP, 800 crops
# raised SynSeg on 200 val scenes from 36.2 to 39.5 (benchmarks/results/toyworld_v2_2026-12-06.md)
TOY_TRAIN_CROPS = 800


def train_toy(work_dir: Path, clip=None, preset: str = "toy", progress: bool = True,
              train_options: dict | None = None, train_scenes: int = TOY_TRAIN_SCENES, train_crops: int = TOY_TRAIN_CROPS,
              **overrides) -> Path:
    """Train (or reuse) SynSeg under ``work_dir/train`` on ``train_scenes`` toy-world captions plus
    ``train_crops`` single-object crops (:class:`~weakseg.toy.world.ToyCaptions`); returns the model path."""

    model_path = Path(work_dir) / "train" / "model.safetensors"
    if not model_path.exists():
        method = SynSeg(SynSegConfig.from_dict({"preset": preset, **overrides}), clip=clip)
        opts = {**TOY_TRAIN, **(train_options or {})}
        train_synseg(method, ToyCaptions(num_scenes=train_scenes, size=method.config.size, crops=train_crops),
                     model_path.parent, SynSegTrainConfig.from_dict(opts), progress=progress)
    return model_path


def toy_demo(work_dir: Path, progress: bool = True, clip=None, preset: str = "toy", train_options: dict | None = None,
             train_scenes: int = TOY_TRAIN_SCENES, train_crops: int = TOY_TRAIN_CROPS, **overrides):
    """The DemoEntry of SynSeg on the toy world: method = the head trained on toy captions only (no masks),
    baseline = the raw CLIP patch-text similarity with the same background threshold. ``clip`` replaces the
    toy CLIP (tests pass the tiny random one with ``preset="tiny"``); without it the committed toy CLIP is
    loaded, and a missing one raises FileNotFoundError naming its path."""

    if clip is None:
        clip = load_toy_clip()
    model = train_toy(work_dir, clip, preset, progress, train_options, train_scenes, train_crops, **overrides)
    method = SynSeg(SynSegConfig.from_dict({"preset": preset, **overrides, "checkpoint": str(model)}), clip=clip)
    baseline = SynSeg(SynSegConfig.from_dict({"preset": preset, **overrides, "mode": "patch", "pamr_iterations": 0}),
                      clip=clip)
    return DemoEntry(method=method, baseline=baseline,
                     note="baseline: raw CLIP patch-text cosine (per-class min-max) with the same background "
                          "threshold, no PAMR; method: FiLM + decoder trained on toy captions with FSS + MCCL, "
                          "the preset's PAMR")


def ablation(work_dir: Path, subsets: dict[str, Sequence[float]] | None = None, num_scenes: int = 40,
             clip=None, preset: str = "toy", progress: bool = True, train_options: dict | None = None,
             train_scenes: int = TOY_TRAIN_SCENES, views: Sequence[int] = (5,), train_crops: int = TOY_TRAIN_CROPS,
             **overrides) -> dict[str, Any]:
    """The loss ablation (the paper's Table III) on the toy world: for each ``subsets`` entry (name -> the
    four loss weights), train on toy captions (under ``work_dir/<name>``, reused when present) and score
    mIoU (%, all classes, image-level labels given as in the demo; and open-vocabulary without them) on
    ``num_scenes`` held-out scenes. Returns {name: {"weights", "miou", "miou_open", "final_loss"}} plus the
    untrained head and the patch baseline."""
    from weakseg.eval.metrics import ConfusionMatrix

    if clip is None:
        clip = load_toy_clip()
    if subsets is None:
        subsets = {"all four": (1, 1, 1, 1), "no ft": (0, 1, 1, 1), "no fb": (1, 0, 1, 1), "no bb": (1, 1, 0, 1),
                   "no ff": (1, 1, 1, 0), "ft only": (1, 0, 0, 0)}
    world = ToyWorld(split="test", num_scenes=num_scenes)
    names = list(world.class_names)
    scenes = [world[i] for i in range(num_scenes)]

    def score(m) -> tuple[float, float]:
        res = []
        for use_labels in (True, False):
            cm = ConfusionMatrix(len(names))
            for sc in scenes:
                lab = None
                if use_labels:
                    lab = torch.zeros(1, len(names), dtype=torch.bool)
                    lab[0, sc.image_labels] = True
                cm.update(m.segment([sc.image], names, lab).labels[0], sc.label)
            res.append(round(100 * cm.miou("all"), 2))
        return res[0], res[1]

    out: dict[str, Any] = {}
    for v in views:
        base = {"preset": preset, **overrides, "views": v}
        for name, opts in (("patch baseline", {"mode": "patch"}), ("untrained head", {})):
            miou, open_ = score(SynSeg(SynSegConfig.from_dict({**base, **opts}), clip=clip))
            out[f"{name} (views={v})"] = {"weights": None, "miou": miou, "miou_open": open_, "final_loss": None}
        for name, w in subsets.items():
            wd = Path(work_dir) / name.replace(" ", "_")
            model = train_toy(wd, clip, preset, progress, train_options, train_scenes, train_crops,
                              **{**overrides, "loss_weights": tuple(w)})
            m = SynSeg(SynSegConfig.from_dict({**base, "loss_weights": tuple(w), "checkpoint": str(model)}), clip=clip)
            log = [json.loads(x) for x in (model.parent / "log.jsonl").read_text().splitlines()]
            miou, open_ = score(m)
            out[f"{name} (views={v})"] = {"weights": list(w), "miou": miou, "miou_open": open_,
                                          "final_loss": {k: round(log[-1][k], 4) for k in ("ft", "fb", "bb", "ff")}}
    return out
