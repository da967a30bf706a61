"""The toy-world demo recipes: how ``weakseg demo`` runs each method on the toy world (its toy configuration
on the committed toy weights, any setup step, and the method's own unrefined baseline).

Each recipe is registered in :data:`weakseg.core.TOY_DEMOS` under its method's name and returns a
:class:`weakseg.core.DemoEntry`; :func:`weakseg.demo.run_demo` reads that registry. Methods know nothing of
the toy world: this layer composes them with the toy models, the toy scenes and the training loops.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from weakseg.core import METHODS, TOY_DEMOS, DemoEntry
from weakseg.methods.diffsegmenter import DiffSegmenter, DiffSegmenterConfig
from weakseg.methods.iseg import ISeg, ISegConfig
from weakseg.methods.moduseg import ModuSeg, ModuSegConfig
from weakseg.toy import diclip as _diclip_recipe
from weakseg.toy import synseg as _synseg_recipe
from weakseg.toy.world import ToyWorld

__all__ = ["iseg_demo", "diffsegmenter_demo", "moduseg_demo", "MODUSEG_TOY_CONFIG", "MODUSEG_TOY_PSEUDO"]


@TOY_DEMOS.register("iseg")
def iseg_demo(work_dir: Path | None = None, progress: bool = True, backbone=None, **overrides: Any) -> DemoEntry:
    """iSeg's "toy" preset on the toy world's trained SD (or ``backbone``), and its baseline, the fused
    8x8/16x16 cross-attention without the self-attention propagation and without the preset's PAMR (same
    prompt, same KL smoothing and background rule). Nothing to set up."""
    method = ISeg(ISegConfig.from_preset("toy", **overrides), backbone=backbone)
    base = ISeg(ISegConfig.from_preset("toy", **{**overrides, "baseline": True, "pamr_iterations": 0}),
                backbone=method.sd)
    return DemoEntry(method=method, baseline=base,
                     note="fused cross-attention maps, no self-attention propagation, no PAMR")


@TOY_DEMOS.register("diffsegmenter")
def diffsegmenter_demo(work_dir: Path | None = None, progress: bool = True, backbone=None,
                       **overrides: Any) -> DemoEntry:
    """DiffSegmenter's "toy" preset on the toy world's trained SD (or ``backbone``), and its baseline, the
    fused cross-attention maps without the self-attention propagation and without the preset's PAMR (same
    background threshold)."""
    method = DiffSegmenter(DiffSegmenterConfig.from_preset("toy", **overrides), backbone=backbone)
    base = DiffSegmenter(DiffSegmenterConfig.from_preset("toy", **{**overrides, "baseline": True,
                                                                   "pamr_iterations": 0}), backbone=method.sd)
    return DemoEntry(method=method, baseline=base,
                     note="fused cross-attention maps, no self-attention propagation, no PAMR")


# Toy-world settings (64 x 64 scenes, 8 px CLIP patches): the reference's pixel thresholds scaled down
# with the image (300 px of a 500 x 375 image is 0.16 %; a 20 px erosion radius is 4 % of its width);
# superpixels fine enough for the shapes (oracle labelling: benchmarks/results/toyworld_training_notes.md);
# K = 1 for a bank of a few hundred rows in which every scene adds a background row (a large K lets the
# background outvote the shapes: benchmarks/results/ablate_moduseg_toy.md);
# the vote sees the image's classes, which the demo gives every method (the reference ignores them).
MODUSEG_TOY_CONFIG: dict[str, Any] = dict(backbone="clip-dense", backbone_model="toy", proposer="superpixel",
                                  proposer_options=dict(method="felzenszwalb", scale=60.0, sigma=0.5, min_size=12,
                                                        merge_thresh=8.0),
                                  min_area=8, erosion_iterations=2, k=1, use_image_labels=True)


# The pseudo-mask method's settings for ModuSeg's bank, over its toy recipe: iSeg without the PAMR and the
# noise-draw averaging of its toy preset (200 val scenes, ModuSeg: 50.76 from these masks, 50.36 from the PAMR
# ones, 50.58 with 4 noise draws, 48.81 from the full preset's; differences within the noise, chosen on val;
# benchmarks/results/toyworld_v2_2026-12-07.md).
MODUSEG_TOY_PSEUDO: dict[str, dict[str, Any]] = {"iseg": {"pamr_iterations": 0, "background_value": 0.6,
                                                           "noise_draws": 1}}


@TOY_DEMOS.register("moduseg")
def moduseg_demo(work_dir: Path | None = None, progress: bool = True, *, pseudo_method: str = "iseg",
                 pseudo=None, backbone=None, num_train: int = 200, pseudo_overrides: dict | None = None,
                 **overrides: Any) -> DemoEntry:
    """ModuSeg on the toy world: a bank from ``pseudo_method``'s pseudo masks (its toy recipe, run with the
    image-level labels) on ``num_train`` toy training scenes (``ToyWorld(64, "train")``), the toy CLIP's
    dense features as the backbone, superpixel proposals; the bank is cached under ``work_dir`` and reused
    while its settings (backbone weights included) are unchanged. The baseline is the pseudo-mask method.

    ``pseudo`` (a segmenter) and ``backbone`` (a dense extractor) may be injected (tests).
    ``pseudo_overrides``: config values for ``pseudo_method``'s toy recipe (None: its entry in
    :data:`MODUSEG_TOY_PSEUDO`, if any). ``overrides``: ModuSegConfig values over :data:`MODUSEG_TOY_CONFIG`.
    ``work_dir=None``: a fresh temporary folder."""
    work_dir = Path(work_dir) if work_dir is not None else Path(tempfile.mkdtemp(prefix="moduseg_toy_"))
    work_dir.mkdir(parents=True, exist_ok=True)
    if pseudo is None:
        if pseudo_method not in TOY_DEMOS:
            raise ValueError(f"moduseg toy demo: pseudo_method {pseudo_method!r} has no toy recipe to make pseudo "
                             f"masks with; known: {', '.join(TOY_DEMOS.names())}; or pass pseudo=<a segmenter>")
        METHODS.get(pseudo_method)  # an unknown method name fails here, naming the known ones
        kw = MODUSEG_TOY_PSEUDO.get(pseudo_method, {}) if pseudo_overrides is None else pseudo_overrides
        pseudo = TOY_DEMOS.get(pseudo_method)(work_dir / pseudo_method, progress=progress, **kw).method
    config = ModuSegConfig.from_dict({**MODUSEG_TOY_CONFIG, **overrides})
    seg = ModuSeg(config, backbone=backbone)
    world = ToyWorld(64, "train", num_scenes=num_train)
    tag = pseudo_method if isinstance(pseudo_method, str) else type(pseudo).__name__
    bank_path = work_dir / f"moduseg_bank_{tag}_{num_train}.safetensors"
    seg.build_bank(world, bank_path, pseudo=pseudo, progress=progress, dataset_name="toyworld", rank=0, world_size=1)
    seg.config = seg.config.replace(bank=str(bank_path))
    note = (f"baseline: {tag}, whose pseudo masks on {num_train} toy training scenes (image-level labels) "
            f"built the bank; ModuSeg labels superpixel proposals by {config.k}-NN retrieval in it")
    return DemoEntry(method=seg, baseline=pseudo, note=note)


TOY_DEMOS.register("synseg")(_synseg_recipe.toy_demo)
TOY_DEMOS.register("diclip")(_diclip_recipe.toy_demo)
