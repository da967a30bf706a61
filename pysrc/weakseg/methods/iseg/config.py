"""iSeg's config (:class:`ISegConfig`), its presets (:data:`PRESETS`) and option constants: the SD 2.1
attention layers and the reference's head subsets, the prompt words (stuff words, class renames, token
words). docs/specs/diffsegmenter_iseg.md §7; the segmenter is :mod:`weakseg.methods.iseg.method`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from weakseg.core import PresetConfig, is_int
from weakseg.data.classnames import CLASS_RENAMES
from weakseg.methods.common import PAMR_DILATIONS, BackgroundRule, check_pamr_options

__all__ = ["ISegConfig", "PRESETS", "VOC_RENAMES", "COCO_RENAMES", "CONTEXT_RENAMES", "SELF_LAYER",
           "CROSS_LAYERS_16", "CROSS_LAYERS_32", "VOC_HEADS_16", "VOC_HEADS_32", "ISEG_BACKGROUND_VOC",
           "ISEG_BACKGROUND_COCO", "VOC_STUFF", "COCO_STUFF", "TOKEN_WORDS", "TAGGERS", "DTYPES", "SD21_BASE"]

SD21_BASE = "stabilityai/stable-diffusion-2-1-base"


def _layer(block: str) -> str:
    return f"{block}.transformer_blocks.0"


SELF_LAYER = _layer("up_blocks.3.attentions.1") + ".attn1"
# forward order (down -> mid -> up): the order in which the reference concatenates heads
CROSS_LAYERS_32 = tuple(_layer(b) + ".attn2" for b in
                        ("down_blocks.1.attentions.1", "up_blocks.2.attentions.0", "up_blocks.2.attentions.1"))
CROSS_LAYERS_16 = tuple(_layer(b) + ".attn2" for b in
                        ("down_blocks.2.attentions.0", "down_blocks.2.attentions.1", "up_blocks.1.attentions.0",
                         "up_blocks.1.attentions.1", "up_blocks.1.attentions.2"))
# the reference's VOC head subsets (att_mean=False), indices into the heads of the layers above
# concatenated in forward order (SD 2.1: 3 x 10 = 30 heads at 32x32, 5 x 20 = 100 at 16x16)
VOC_HEADS_32 = (22, 5, 21, 13, 8, 27, 28, 6, 25)
VOC_HEADS_16 = (76, 1, 43, 17, 81, 6, 44, 27, 2, 8, 22, 20, 60, 78, 12, 83, 94, 47, 88, 96, 3, 33, 46, 52, 77, 93,
                51, 58, 0, 13, 14, 19, 34, 41, 59, 87, 16, 24, 28, 30, 32)

# the background (stuff) words iSeg appends to its SD prompt (VOC; COCO adds three), and the prompt strings
# after the reference code's string-literal concatenation (the COCO string ends in ", ")
ISEG_BACKGROUND_VOC: tuple[str, ...] = (
    "ground", "land", "grass", "tree", "building", "wall", "sky", "lake", "water",
)
ISEG_BACKGROUND_COCO: tuple[str, ...] = ISEG_BACKGROUND_VOC + ("river", "sea", "railway")
VOC_STUFF = ", ".join(ISEG_BACKGROUND_VOC)
COCO_STUFF = ", ".join(ISEG_BACKGROUND_COCO) + ", "
# dataset name -> the name iSeg writes in its prompt (its voc_name20 / coco_name80 / context_name59 tables,
# weakseg.data.classnames.CLASS_RENAMES[...]["iseg"])
VOC_RENAMES = dict(CLASS_RENAMES["voc"]["iseg"])
COCO_RENAMES = dict(CLASS_RENAMES["coco_object"]["iseg"])
CONTEXT_RENAMES = dict(CLASS_RENAMES["context59"]["iseg"])
# prompt name -> indices of the words whose tokens make the class map (others: every token)
TOKEN_WORDS = {"potted plant": [1], "tv monitor": [1], "traffic light": [1], "fire hydrant": [1],
               "baseball bat": [1], "baseball glove": [1], "tennis racket": [1], "wine glass": [1]}

PRESETS: dict[str, dict[str, Any]] = {
    "voc-wsss": dict(ent=0.015, steps=10, background="power", background_value=2.0, heads_16=VOC_HEADS_16,
                     heads_32=VOC_HEADS_32, background_words=VOC_STUFF, background_separator=", ",
                     class_renames=VOC_RENAMES),
    "coco-wsss": dict(ent=0.1, steps=10, background="threshold", background_value=0.45, heads_16=None, heads_32=None,
                      background_words=COCO_STUFF, background_separator=", ", class_renames=COCO_RENAMES),
    "voc-ovs": dict(ent=0.015, steps=8, background="power", background_value=2.0, heads_16=VOC_HEADS_16,
                    heads_32=VOC_HEADS_32, background_words=VOC_STUFF, background_separator="",
                    class_renames=VOC_RENAMES),
    "context-ovs": dict(ent=0.002, steps=5, background="power", background_value=2.0, heads_16=None, heads_32=None,
                        background_words="", background_separator="", class_renames=dict(CONTEXT_RENAMES)),
    "coco-ovs": dict(ent=0.2, steps=10, background="threshold", background_value=0.45, heads_16=None, heads_32=None,
                     background_words=COCO_STUFF, background_separator="", class_renames=COCO_RENAMES),
}

# The toy world's Stable Diffusion (weakseg.toy: 64 px images, 16x16 latents, cross-attention at 16/8/4,
# 2 heads per layer). Its text encoder was trained on captions "a photo of a red circle and a blue star on
# grass", so the prompt keeps that form; the cross-attention grids are the toy's 8x8 and 16x16 ones (1/8 and
# 1/4 of the image, as SD's 64/512 and 128/512 are not: at 64 px the SD-analogous 4x4 grid is too coarse
# for objects of 8-14 px), the refinement uses the 16x16 (full latent) self-attention, as SD's 64x64.
# Chosen on toy *val* scenes (benchmarks/results/ablate_iseg_toy.md; the demo scores the test scenes): the
# first 16x16 self-attention of the last up block (the second one, SD's analogue of the reference layer,
# scored lower), one propagation step (more steps over-smooth a 16x16 grid), and a fixed background
# threshold on the min-max maps instead of (1 - max)^2, the 16x16 cross-attention alone (the 8x8 maps are
# too coarse for 8-14 px objects), and gamma = 1.0 (category enhancement lowered the toy's mIoU).
# PAMR (10 iterations, not in the reference's evaluation; see ISegConfig) with the threshold re-chosen for
# it, on 200 val scenes: 44.4 without PAMR (threshold 0.6), 51.1 with it at 0.55 (0.5 / 0.6 / 0.65: 50.4 /
# 50.4 / 49.1; benchmarks/results/toyworld_v2_2026-12-07.md). The class maps of 4 noise draws averaged (not
# iSeg's; one draw's mIoU moves by 3 points with the seed, 50.7-53.9 over five seeds): 53.6 on 200 val scenes
# (8 / 16 draws: 52.9 / 53.0; on 400 val scenes 51.2 against one draw's 50.0; toyworld_v2_2026-12-07.md).
TOY_SELF_LAYER = _layer("up_blocks.3.attentions.0") + ".attn1"
TOY_CROSS_8 = tuple(_layer(b) + ".attn2" for b in
                    ("down_blocks.1.attentions.0", "up_blocks.2.attentions.0", "up_blocks.2.attentions.1"))
TOY_CROSS_16 = tuple(_layer(b) + ".attn2" for b in
                     ("down_blocks.0.attentions.0", "up_blocks.3.attentions.0", "up_blocks.3.attentions.1"))
PRESETS["toy"] = dict(model="toy", size=64, batch_size=8, prompt_prefix="a photo of a ", class_joiner=" and a ",
                      background_prompt="", background_separator="", background_words="", class_renames={},
                      token_words={}, cross_layers_16=TOY_CROSS_8, cross_layers_32=TOY_CROSS_16, heads_16=None,
                      heads_32=None, cross_weight_16=0.0, cross_weight_32=1.0, gamma=1.0, self_layer=TOY_SELF_LAYER,
                      self_heads=(0, 1), ent=0.015, steps=1,
                      background="threshold", background_value=0.55, clip_model="toy", clip_pretrained=None,
                      tag_templates="single", pamr_iterations=10, noise_draws=4)

TAGGERS = ("clip", "all")
DTYPES = ("auto", "float32", "float16", "bfloat16")


@dataclass
class ISegConfig(PresetConfig):
    """Every default is the reference code's (VOC WSSS, docs/specs/diffsegmenter_iseg.md §7), except the
    cross-attention head subsets (all heads here; the VOC presets use the reference's subsets).

    model: a model spec of the stable-diffusion backbone (:class:`weakseg.core.ModelSpec`): the SD 2.1-base
    hub name, a local diffusers directory, ``tiny`` / ``tiny:sd15`` (random tiny models for tests; 4 heads
    per layer so heads [1, 2] exist) or ``toy`` (the toy-world weights). cache_dir: hub download folder. device: "cpu" / "cuda". dtype: "auto" (float16 on CUDA,
    float32 on CPU), "float32", "float16" or "bfloat16" (reduced precision only on GPU).
    seed: the noise seed, re-applied for every image (1101). t: the UNet timestep (100).
    noise_draws: the number of noise draws per image (1, the reference's); with more, the class maps of
    each draw (drawn in turn from the re-seeded generator: the first is the reference's) are averaged
    before the min-max, as DIFT averages its features over an ensemble of noise draws. Not iSeg's.
    size: side the image is resized to before the VAE (512 -> 64x64 latents). batch_size: images per
    UNet call.
    prompt_prefix / class_joiner / background_prompt / background_separator / background_words: the
    prompt is ``prefix + joiner.join(classes) + background_prompt + separator + words``.
    class_renames: dataset name -> prompt name. token_words: prompt name -> word indices whose tokens
    give the class map (others use all tokens). gamma: the class-token embedding scale (1 = off).
    cross_layers_16 / cross_layers_32: the cross-attention layers of the 16x16 / 32x32 grids (names at
    512 px input), in forward order. heads_16 / heads_32: head subsets, indices into the
    concatenation of those layers' heads (None: all). cross_weight_16 / cross_weight_32: 0.7 / 0.3.
    self_layer / self_heads: the self-attention layer and heads of the refinement ([1, 2]).
    use_cluster / cluster_number / cluster_iterations: KL clustering smoothing (on, 32 -> a 6x6 grid of
    seeds at 64x64, 20 iterations). use_ers / ent / steps: entropy-reduced self-attention and the
    number of propagation steps (0.015, 10). baseline: no self-attention propagation. fused_qk: capture
    q, k and use ``refine_propagate_qk`` (True) or the head-mean probabilities and ``refine_propagate``.
    background / background_value: "power" with the exponent ((1 - max)^2) or "threshold" with the cut
    (COCO 0.45). tagger: open-vocabulary candidates when no image labels are given: "clip" (zero-shot
    tagging with clip_model / clip_pretrained, top tag_topk with probability >= tag_threshold, prompt
    templates tag_templates) or "all" (every class in the prompt). pamr_iterations / pamr_dilations:
    PAMR (:class:`weakseg.methods.common.PAMR`) on the min-max class maps at image size, before the
    background rule; 0 iterations (the default) = off. Not part of iSeg: its code has CRF/PAR
    post-processing but never calls it; this is the TCL protocol's post-processing (10 iterations at
    dilations 1, 2, 4, 8, 12, 24), an option for users and the toy preset. preset: the preset these
    values came from (see :data:`PRESETS`).
    """

    model: str = SD21_BASE
    cache_dir: str | None = None
    dtype: str = "auto"
    seed: int = 1101
    t: int = 100
    noise_draws: int = 1
    size: int = 512
    batch_size: int = 4
    prompt_prefix: str = "a photograph of "
    class_joiner: str = " and "
    background_prompt: str = " and other object and background"
    background_separator: str = ", "
    background_words: str = VOC_STUFF
    class_renames: dict = field(default_factory=lambda: dict(VOC_RENAMES))
    token_words: dict = field(default_factory=lambda: {k: list(v) for k, v in TOKEN_WORDS.items()})
    gamma: float = 1.6
    cross_layers_16: tuple = CROSS_LAYERS_16
    cross_layers_32: tuple = CROSS_LAYERS_32
    heads_16: tuple | None = None
    heads_32: tuple | None = None
    cross_weight_16: float = 0.7
    cross_weight_32: float = 0.3
    self_layer: str = SELF_LAYER
    self_heads: tuple = (1, 2)
    use_cluster: bool = True
    cluster_number: int = 32
    cluster_iterations: int = 20
    use_ers: bool = True
    ent: float = 0.015
    steps: int = 10
    baseline: bool = False
    fused_qk: bool = True
    background: str = "power"
    background_value: float = 2.0
    tagger: str = "clip"
    clip_model: str = "ViT-B-16"
    clip_pretrained: str = "openai"
    tag_topk: int = 3
    tag_threshold: float = 0.1
    tag_templates: str = "ensemble"
    pamr_iterations: int = 0
    pamr_dilations: tuple = PAMR_DILATIONS

    PRESETS = PRESETS  # (class attribute, not a field) the named presets above

    def __post_init__(self) -> None:
        self._apply_preset()
        if isinstance(self.pamr_dilations, list):
            self.pamr_dilations = tuple(self.pamr_dilations)
        for name in ("cross_layers_16", "cross_layers_32", "self_heads"):
            setattr(self, name, tuple(getattr(self, name)))
        for name in ("heads_16", "heads_32"):
            v = getattr(self, name)
            setattr(self, name, None if v is None else tuple(int(h) for h in v))
        self._validate()

    def _validate(self) -> None:
        def bad(name, want):
            raise ValueError(f"ISegConfig.{name}: expected {want}, got {getattr(self, name)!r}")

        if self.dtype not in DTYPES:
            bad("dtype", "one of " + ", ".join(DTYPES))
        if self.dtype in ("float16", "bfloat16") and not str(self.device).startswith("cuda"):
            raise ValueError(f"ISegConfig.dtype: {self.dtype} runs only on a GPU (device={self.device!r}); use "
                             "float32 or 'auto' on the CPU")
        if self.tagger not in TAGGERS:
            bad("tagger", "one of " + ", ".join(TAGGERS))
        for name in ("size", "batch_size", "cluster_number", "cluster_iterations", "tag_topk", "noise_draws"):
            v = getattr(self, name)
            if not is_int(v, 1):
                bad(name, "an int >= 1")
        if not is_int(self.steps, 0):
            bad("steps", "an int >= 0")
        if not self.ent >= 0:
            bad("ent", "a number >= 0")
        if not self.gamma > 0:
            bad("gamma", "a number > 0")
        if self.cross_weight_16 == 0 and self.cross_weight_32 == 0:
            raise ValueError("ISegConfig.cross_weight_16 / cross_weight_32: at least one must be non-zero")
        if not self.self_heads:
            bad("self_heads", "a non-empty list of head indices")
        BackgroundRule(self.background, float(self.background_value))  # raises with the field named
        check_pamr_options("ISegConfig", self.pamr_iterations, self.pamr_dilations)

    @property
    def background_rule(self) -> BackgroundRule:
        return BackgroundRule(self.background, float(self.background_value))

    def torch_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            return torch.float16 if str(self.device).startswith("cuda") else torch.float32
        return getattr(torch, self.dtype)
