"""DiffSegmenter's config (:class:`DiffSegmenterConfig`), its presets (:data:`PRESETS`) and option
constants: the attention layers, the resolution weights, the prompt template.
docs/specs/diffsegmenter_iseg.md (prefix DS); the segmenter is :mod:`weakseg.methods.diffsegmenter.method`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from weakseg.core import PresetConfig, is_int
from weakseg.methods.common import PAMR_DILATIONS, check_pamr_options

__all__ = ["DiffSegmenterConfig", "PRESETS", "DEFAULT_MODEL", "SELF_ATTENTION_LAYERS", "CROSS_ATTENTION_LAYERS",
           "DS_WEIGHTS", "PROMPT_TEMPLATE", "CAPTION_SEED", "RENAME_TABLES", "PROPAGATIONS"]

DEFAULT_MODEL = "runwayml/stable-diffusion-v1-5"
# The 64x64 (full latent resolution) self-attention layers of the SD layouts: down_blocks.0 x 2 and
# up_blocks.3 x 3 (DS: ptp_stable_best.py L525, all 40 maps of SD 1.5 = 5 layers x 8 heads).
SELF_ATTENTION_LAYERS = ("down_blocks.0.attentions.*.transformer_blocks.0.attn1",
                         "up_blocks.3.attentions.*.transformer_blocks.0.attn1")
# Every cross-attention layer (down, mid, up), averaged per resolution.
CROSS_ATTENTION_LAYERS = ("re:.*attn2",)
DS_WEIGHTS = (0.3, 0.5, 0.1, 0.1)  # for the resolutions latent/8, /4, /2, /1 (8, 16, 32, 64 at 512²)
PROMPT_TEMPLATE = "a photograph of {c}++"
CAPTION_SEED = "a photograph of {c}"

RENAME_TABLES = ("voc", "context", "coco")
PROPAGATIONS = ("auto", "fused", "reference")
PRESETS: dict[str, dict[str, Any]] = {
    # the public code (DS:open_vocabulary/voc12/ptp_stable_best.py): one timestep, t = 100, VOC words
    "code": {},
    # the Context and COCO-Object scripts (open_vocabulary/voc10/ptp_stable_voc10.py, coco/ptp_stable_coco.py):
    # "a photography of", the weight on the class's last word, its last token read, their class words
    "code-context": {"rename_classes": "context", "prompt_template": "a photography of {c}++", "weight_words": "last",
                     "class_token": "last"},
    "code-coco": {"rename_classes": "coco", "prompt_template": "a photography of {c}++", "weight_words": "last",
                  "class_token": "last"},
    # the paper's best setting (SEM Tab. 5): the maps averaged over t in {1, 50, 100, 150}
    "paper": {"timesteps": (1, 50, 100, 150)},
    # the baseline: fused cross-attention maps, no self-attention propagation
    "baseline": {"baseline": True},
    # the toy world's SD (weakseg.toy: 64 px, 16x16 latents, cross-attention at 2/4/8/16): its text
    # encoder knows the caption form "a photo of a red circle ..." (no "photograph", no Compel weight);
    # the coarse grids are too coarse for 8-14 px objects: the 16x16 one alone, chosen on toy val scenes (200
    # scenes: 37.8 mIoU with weights 0/0.2/0.4/0.4 and threshold 0.5, 42.8 with these at 0.6;
    # benchmarks/results/toyworld_v2_2026-12-06.md); then PAMR (10 iterations, not DiffSegmenter's; see the
    # config) with the threshold re-chosen for it: 48.2 at 0.55 (0.5 / 0.6 / 0.65: 48.1 / 47.7 / 47.4;
    # toyworld_v2_2026-12-07.md)
    "toy": {"model": "toy", "image_size": 64, "prompt_template": "a photo of a {c}", "rename_classes": None,
            "cross_weights": (0.0, 0.0, 0.0, 1.0), "bg_threshold": 0.55, "clip_model": "toy",
            "clip_pretrained": None, "pamr_iterations": 10},
}


@dataclass
class DiffSegmenterConfig(PresetConfig):
    """Every default of the reference code (DS: open_vocabulary/voc12/ptp_stable_best.py).

    model: SD weights — a hub name (default SD v1.5; the hub also mirrors it as
        "stable-diffusion-v1-5/stable-diffusion-v1-5"), a local diffusers directory (read offline), or any
        other model spec of the stable-diffusion backbone (``tiny``, ``tiny:sd15``, ``toy``; see
        :class:`weakseg.core.ModelSpec`).
    cache_dir: download cache of the hub models (and of the tiny models' offline tokenizer files).
    dtype: "auto" (float16 on CUDA, float32 on CPU), "float32", "float16" or "bfloat16" (reduced
        precision only on a GPU).
    image_size: side of the square the image is resized to before the VAE (512 → 64x64 latents).
    timesteps: the UNet timesteps whose maps are averaged ((100,) in the code; (1, 50, 100, 150) the paper).
    noise_draws: noise draws per image (1, the reference's); with more, the maps of every (timestep, draw)
        are averaged (the draws come in turn from the image's re-seeded generator after its posterior
        sample, the first one the reference's), as DIFT averages its features over noise draws. Not
        DiffSegmenter's.
    prompt_template: the class prompt; ``{c}`` is the class name, ``++`` Compel's up-weighting.
    weight_words: which words of a multi-word class name ``++`` weights: "all" (the phrase in parentheses,
        ``(potted plant)++``) or "last" (``potted plant++``, the reference's Context / COCO scripts).
    class_token: which tokens of a multi-token class name give its map: "mean" (all, averaged), "first",
        "last" (the Context / COCO scripts read the last). Single-token names (the VOC renames) are unaffected.
    fuse_ing: average the class map with the next word's if that word ends in "ing" (the code's fusion).
    ing_rule: how the "ing" word is found: "code" (the reference: the whitespace word after the class
        phrase in the prompt, punctuation included, ``split(" ")[i].endswith("ing")``; the one token after
        the class is fused, so "dog++ sitting, looking" fuses nothing) or "word" (the BPE word after the
        class, letters only, all its tokens: "sitting" in "sitting," fuses).
    cross_weights: weights of the min-max normalised cross-attention at the resolutions latent/8, /4,
        /2, /1 (coarsest first; 8/16/32/64 at 512²); one weight per cross-attention resolution of the UNet.
    baseline: skip the self-attention product (the fused cross-attention maps are the scores).
    propagation: "fused" (SDPA from q/k per layer after the UNet pass, no P x P map), "reference" (the
        head-mean probabilities captured in the UNet pass, whose 64x64 self-attention layers then compute
        their output from them, so every map is formed once; one P x P float32 buffer, then A @ x) or
        "auto" (the default: "reference" on the CPU when a chunk's two P x P float32 maps per item — the
        mean and one head's map — fit ``attention_budget_mib``, else "fused"; on CUDA always "fused").
        Same result up to rounding.
    attention_budget_mib: the memory "auto" allows the captured P x P maps of one UNet call (2048 MiB: 8
        items at 512², P = 4096).
    bg_threshold: the constant background score τ in [0, 1].
    pamr_iterations / pamr_dilations: PAMR (:class:`weakseg.methods.common.PAMR`) on the class maps at image
        size, after their min-max and before the background rule; 0 iterations (the default) = off. Not part
        of DiffSegmenter (its code has no post-processing); the TCL protocol's (10 iterations at dilations
        1, 2, 4, 8, 12, 24), an option for users and the toy preset.
    rename_classes: the reference's class words for a dataset, put in the prompts (outputs keep the
        caller's names; names not in the table are unchanged): "voc" (the default, the single-token words
        plane, buses, table, people, plant, monitor), "context" (airplane, plant, monitor), "coco"
        (motorbike, aeroplane, sofa, pottedplant, diningtable, tvmonitor, toothbrus — as the reference
        spells it) or None (the names as given; ``CLASS_RENAMES[...]["diffsegmenter"]`` holds the tables).
    batch_size: (image, class) items per UNet call.
    open_vocab: candidates when no image labels are given: "clip" (CLIP zero-shot tagging, top
        ``tag_topk`` with probability ≥ ``tag_threshold``) or "all" (every class).
    clip_model / clip_pretrained: the tagger's CLIP (``CLIPBackbone.from_pretrained``; "tiny" = a
        tiny random CLIP for tests).
    captioner: None (no caption) or a BLIP captioning model (hub name or local directory of a
        ``BlipForConditionalGeneration`` + its processor), seeded with "a photograph of {c}".
    caption_max_new_tokens: BLIP's generation length (``generate``'s default when None).
    preset: None or a name in PRESETS; its values fill in the fields given no explicit value (through
        ``from_dict`` / ``from_preset`` / ``weakseg.create``: exactly the fields not named; through the
        plain constructor: the fields still at their default).
    """

    model: str = DEFAULT_MODEL
    cache_dir: str | None = None
    dtype: str = "auto"
    image_size: int = 512
    timesteps: tuple[int, ...] = (100,)
    noise_draws: int = 1
    prompt_template: str = PROMPT_TEMPLATE
    weight_words: str = "all"
    class_token: str = "mean"
    fuse_ing: bool = True
    ing_rule: str = "code"
    cross_weights: tuple[float, ...] = DS_WEIGHTS
    baseline: bool = False
    propagation: str = "auto"
    attention_budget_mib: float = 2048.0
    bg_threshold: float = 0.5
    rename_classes: str | None = "voc"
    batch_size: int = 8
    open_vocab: str = "clip"
    clip_model: str = "ViT-B-16"
    clip_pretrained: str | None = "openai"
    tag_topk: int = 3
    tag_threshold: float = 0.1
    captioner: str | None = None
    caption_max_new_tokens: int | None = None
    pamr_iterations: int = 0
    pamr_dilations: tuple = PAMR_DILATIONS

    PRESETS = PRESETS  # (class attribute, not a field) the named presets above

    def __post_init__(self) -> None:
        self.timesteps = tuple(int(t) for t in (self.timesteps if isinstance(self.timesteps, (list, tuple))
                                                 else (self.timesteps,)))
        self.cross_weights = tuple(float(w) for w in self.cross_weights)
        self._apply_preset()
        if isinstance(self.pamr_dilations, list):
            self.pamr_dilations = tuple(self.pamr_dilations)
        if isinstance(self.rename_classes, bool):  # the former switch: True = the VOC words
            self.rename_classes = "voc" if self.rename_classes else None
        if self.rename_classes in ("none", ""):
            self.rename_classes = None
        if self.rename_classes is not None and self.rename_classes not in RENAME_TABLES:
            raise ValueError(f"DiffSegmenterConfig.rename_classes: expected one of {', '.join(RENAME_TABLES)} or "
                             f"None, got {self.rename_classes!r}")
        if not self.timesteps or min(self.timesteps) < 0 or max(self.timesteps) >= 1000:
            raise ValueError(f"DiffSegmenterConfig.timesteps: expected timesteps in [0, 1000), got {self.timesteps}")
        if not self.cross_weights or min(self.cross_weights) < 0:
            raise ValueError(f"DiffSegmenterConfig.cross_weights: expected non-negative weights, got {self.cross_weights}")
        if "{c}" not in self.prompt_template:
            raise ValueError(f"DiffSegmenterConfig.prompt_template: must contain '{{c}}', got {self.prompt_template!r}")
        choices = {"class_token": ("mean", "first", "last"), "propagation": PROPAGATIONS,
                   "weight_words": ("all", "last"), "ing_rule": ("code", "word"),
                   "open_vocab": ("clip", "all"), "dtype": ("auto", "float32", "float16", "bfloat16")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"DiffSegmenterConfig.{name}: expected one of {', '.join(allowed)}, "
                                 f"got {getattr(self, name)!r}")
        if not self.attention_budget_mib >= 0:
            raise ValueError(f"DiffSegmenterConfig.attention_budget_mib: expected a number >= 0, got "
                             f"{self.attention_budget_mib}")
        if not 0 <= self.bg_threshold <= 1:
            raise ValueError(f"DiffSegmenterConfig.bg_threshold: expected a value in [0, 1], got {self.bg_threshold}")
        check_pamr_options("DiffSegmenterConfig", self.pamr_iterations, self.pamr_dilations)
        if self.image_size <= 0 or self.image_size % 8:
            raise ValueError(f"DiffSegmenterConfig.image_size: expected a positive multiple of 8, got {self.image_size}")
        if not is_int(self.noise_draws, 1):
            raise ValueError(f"DiffSegmenterConfig.noise_draws: expected an int >= 1, got {self.noise_draws!r}")
        if self.batch_size < 1 or self.tag_topk < 1:
            raise ValueError(f"DiffSegmenterConfig: batch_size and tag_topk must be >= 1, got "
                             f"{self.batch_size} and {self.tag_topk}")
        if self.dtype in ("float16", "bfloat16") and not str(self.device).startswith("cuda"):
            raise ValueError(f"DiffSegmenterConfig.dtype={self.dtype!r} needs a GPU (device='cuda'), got "
                             f"device={self.device!r}")
