"""DiffSegmenter: Stable Diffusion cross-attention maps, fused over resolutions and propagated once by
the UNet's 64x64 self-attention (specs/diffsegmenter_iseg.md, prefix DS).

Per image and candidate class ``c`` (one conditional UNet item each, batched):

1. the image is resized bilinearly to ``image_size`` (512), encoded by the VAE as a **posterior
   sample**, noised to each timestep of ``timesteps`` (t = 100) with one noise draw per image (all of
   its classes and timesteps share it); the generator is re-seeded with ``config.seed`` for every image,
   so an image's result does not depend on the batch it comes in;
2. prompt ``"a photograph of {c}++"`` with the reference's class words (``rename_classes``: VOC's
   plane, buses, table, people, plant, monitor by default; the ``code-context`` / ``code-coco`` presets
   write the Context / COCO scripts' words and ``"a photography of {c}++"``) + an optional caption
   continuation; ``word++`` = Compel weight 1.21 on the class tokens (``StableDiffusionBackbone.
   encode_prompt``); one UNet pass at t;
3. cross-attention of every cross layer, averaged over layers and heads per resolution (8/16/32/64 for
   a 512² input; in general latent/8 … latent), the class token column(s) selected (with the token
   after the class if the next whitespace word ends in "ing", ``fuse_ing`` / ``ing_rule``), bilinearly
   upsampled to the latent grid, min-max normalised and weighted ``cross_weights`` = [0.3, 0.5, 0.1, 0.1]
   → ``x`` (P,), P = latent pixels;
4. ``M = mean_{l,h} softmax(Q_lh K_lhᵀ/√d) · x`` over the 64x64 self-attention layers
   (``down_blocks.0`` ×2 + ``up_blocks.3`` ×3, every head). ``propagation="reference"`` (what "auto",
   the default, picks on the CPU while two P x P float32 maps per item fit ``attention_budget_mib``)
   keeps one running mean of the probabilities in the UNet pass, the captured layers computing their
   output from the same probabilities (each map formed once, as in the reference's processor), then
   A @ x; ``propagation="fused"`` (auto on CUDA or over the budget) is plain attention with V = x:
   ``scaled_dot_product_attention(q, k, x)`` per layer from the captured q/k, never forming a P x P map
   (tested to agree);
5. M averaged over timesteps, bilinearly upsampled to the image size, per-class min-max; background =
   constant τ (``bg_threshold``), label = argmax over [τ, M_1, …].

``baseline=True`` skips step 4 (the fused cross-attention maps with the same background rule).

Differences from the reference code, all output-preserving or documented (docs/methods.md):

- the reference runs the batch [uncond "", prompt] and keeps the conditional half's attention; the noise
  prediction is never used and UNet batch items are independent, so only the conditional item is run;
- the reference reads fixed token positions (4, and 5 for the "ing" word; Context / COCO 3 + L) after
  renaming classes to its words; here the positions are found by tokenizing, so multi-token class names
  work (``class_token``: mean of all their tokens by default, or the first / last); the COCO script's
  "ing" token 5 + L (the token after the "ing" word) is read as 4 + L;
- captions: the reference seeds BLIP-large with "a photograph of {c}" and appends BLIP's continuation;
  here a caption is optional: ``segment(..., captions=[...])`` (one user text per image, appended after
  the class phrase), or BLIP when ``config.captioner`` names a ``BlipForConditionalGeneration`` model, or
  none (the default: the prompt is just "a photograph of {c}++", so the "ing" fusion has nothing to fuse);
- min-max without the reference's 0 / 0 on constant maps: a range at the rounding level of the values
  gives 0 (``methods.common.minmax_per_class``);
- candidate classes: the image-level labels when given (weakly-supervised), else CLIP zero-shot tagging
  (``open_vocab="clip"``, the reference reads a precomputed JSON whose generator is unpublished) or every
  class (``open_vocab="all"``);
- τ: the reference reports the best τ of a sweep 0.30…0.74 **on the evaluation set**; the default here
  is a fixed 0.5 and :func:`sweep_bg_threshold` reproduces the sweep for those who want the protocol.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch
import torch.nn.functional as F

from weakseg.backbones.attention import LayerCapture
from weakseg.core import BACKBONES, METHODS, PresetConfig, SegmentationOutput, check_segment_inputs
from weakseg.methods.common import (BackgroundRule, StageTimer, clip_tag_classes, has_background, image_label_mask,
                                    load_tagger_clip, minmax_per_class, resize_maps, scores_to_labels)

__all__ = ["DiffSegmenterConfig", "DiffSegmenter", "PRESETS", "SELF_ATTENTION_LAYERS", "CROSS_ATTENTION_LAYERS",
           "build_prompt", "class_token_positions", "caption_continuation", "caption_seed",
           "fuse_cross_attention", "propagate_fused", "propagate_reference", "sweep_bg_threshold"]

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
    # the 2x2 and 4x4 grids are too coarse for 8-14 px objects, so the finer grids carry the weight
    "toy": {"model": "toy", "image_size": 64, "prompt_template": "a photo of a {c}", "rename_classes": None,
            "cross_weights": (0.0, 0.2, 0.4, 0.4), "clip_model": "toy", "clip_pretrained": None},
}

# ----------------------------------------------------------------------------------------- backbone hook

def _torch_dtype(config: "DiffSegmenterConfig") -> torch.dtype:
    name = config.dtype
    if name == "auto":
        name = "float16" if str(config.device).startswith("cuda") else "float32"
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def _load_backbone(config: "DiffSegmenterConfig"):
    dtype = _torch_dtype(config)
    sd = BACKBONES.build("stable-diffusion", config.model, cache_dir=config.cache_dir, device=config.device,
                         dtype=dtype)
    return sd.to(config.device, dtype) if sd.dtype != dtype or sd.device != torch.device(config.device) else sd


# ----------------------------------------------------------------------------------------- config

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

    PRESETS = PRESETS  # (class attribute, not a field) the named presets above

    def __post_init__(self) -> None:
        self.timesteps = tuple(int(t) for t in (self.timesteps if isinstance(self.timesteps, (list, tuple))
                                                 else (self.timesteps,)))
        self.cross_weights = tuple(float(w) for w in self.cross_weights)
        self._apply_preset()
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
        if self.image_size <= 0 or self.image_size % 8:
            raise ValueError(f"DiffSegmenterConfig.image_size: expected a positive multiple of 8, got {self.image_size}")
        if self.batch_size < 1 or self.tag_topk < 1:
            raise ValueError(f"DiffSegmenterConfig: batch_size and tag_topk must be >= 1, got "
                             f"{self.batch_size} and {self.tag_topk}")
        if self.dtype in ("float16", "bfloat16") and not str(self.device).startswith("cuda"):
            raise ValueError(f"DiffSegmenterConfig.dtype={self.dtype!r} needs a GPU (device='cuda'), got "
                             f"device={self.device!r}")


# ----------------------------------------------------------------------------------------- prompts, tokens

def build_prompt(template: str, name: str, continuation: str = "", weight_words: str = "all") -> str:
    """The class prompt: ``template`` with ``{c}`` = ``name``, then the caption continuation (if any)
    after one space. A multi-word name followed by a weight (``{c}++``) is parenthesised with
    ``weight_words="all"``, so Compel's weight covers every word of it (``(potted plant)++``); with
    ``"last"`` it is not, and the weight falls on the last word (``potted plant++``, the reference's
    Context / COCO scripts)."""
    if weight_words not in ("all", "last"):
        raise ValueError(f"build_prompt: weight_words must be 'all' or 'last', got {weight_words!r}")
    weighted = "{c}+" in template
    group = weighted and weight_words == "all" and len(name.split()) > 1
    prompt = template.format(c=f"({name})" if group else name)
    cont = continuation.strip()
    return f"{prompt} {cont}" if cont else prompt


def caption_continuation(caption: str | None, name: str, seed: str = CAPTION_SEED) -> str:
    """What a caption adds after the class phrase: the caption without a leading ``seed`` (formatted
    with the class; compared case-insensitively, as BLIP lower-cases), else the whole caption."""
    if not caption:
        return ""
    text = " ".join(str(caption).split())
    head = seed.format(c=name)
    if text.lower().startswith(head.lower()):
        text = text[len(head):]
    return text.strip()


def caption_seed(template: str) -> str:
    """BLIP's seed text for a prompt template: the template without Compel's ``++`` ("a photograph of
    {c}++" -> "a photograph of {c}", as the reference seeds BLIP)."""
    return template.replace("++", "")


def class_token_positions(sd, prompt: str, name: str, mode: str = "mean", fuse_ing: bool = True,
                          ing_rule: str = "code") -> list[int]:
    """Token positions (0 = start-of-text) whose cross-attention maps are averaged into the class map:
    the class phrase's tokens (all, the first or the last, by ``mode``) and, with ``fuse_ing``, the
    word right after it when that word ends in "ing" (DS: ptp_stable_best.py L515-518). ``ing_rule``:
    "code" tests the reference's word, ``prompt.split(" ")[i]`` right after the class phrase with its
    punctuation (so "sitting," does not end in "ing"), and fuses the one token after the class; "word"
    tests the BPE word after the class (letters only) and fuses all of its tokens."""
    from weakseg.backbones.diffusion import parse_prompt_weights

    if ing_rule not in ("code", "word"):
        raise ValueError(f"class_token_positions: ing_rule must be 'code' or 'word', got {ing_rule!r}")
    span = sd.token_indices(prompt, name)
    pos = span if mode == "mean" else [span[0]] if mode == "first" else [span[-1]]
    if not fuse_ing:
        return list(pos)
    text, _ = parse_prompt_weights(prompt)
    ids = sd.tokenizer(text, add_special_tokens=True).input_ids[: sd.tokenizer.model_max_length - 1]
    if ing_rule == "code":
        nxt = span[-1] + 1
        before = len(sd.tokenizer.decode(ids[1:span[0]]).split())  # whitespace words before the class
        words = prompt.split(" ")
        i = before + len(name.split())
        if i < len(words) and words[i].endswith("ing") and nxt < len(ids) \
                and ids[nxt] not in sd.tokenizer.all_special_ids:
            return list(pos) + [nxt]
        return list(pos)
    toks = sd.tokenizer.convert_ids_to_tokens(ids)
    word, nxt = [], span[-1] + 1
    while nxt < len(toks) and ids[nxt] not in sd.tokenizer.all_special_ids:
        word.append(nxt)
        if toks[nxt].endswith("</w>"):
            break
        nxt += 1
    text_word = "".join(toks[i] for i in word).replace("</w>", "")
    if word and text_word.isalpha() and text_word.lower().endswith("ing"):
        return list(pos) + word
    return list(pos)


# ----------------------------------------------------------------------------------------- attention maths

def fuse_cross_attention(cross: Sequence[torch.Tensor], tokens: Sequence[Sequence[int]],
                         weights: Sequence[float], latent_hw: tuple[int, int]) -> torch.Tensor:
    """DS's cross-attention fusion. ``cross``: per resolution, coarsest first, (N, r_h, r_w, T) or
    (N, r_h*r_w, T) head/layer means with the grid given by ``latent_hw`` halved; ``tokens``: per item the
    token positions to average. Each resolution's token map is bilinearly upsampled (align_corners=False)
    to ``latent_hw``, min-max normalised per item, weighted and summed. Returns (N, h, w) float32."""
    if len(cross) != len(weights):
        raise ValueError(f"fuse_cross_attention: {len(weights)} weights (cross_weights) for {len(cross)} "
                         f"cross-attention resolutions; give one weight per resolution, coarsest first")
    h, w = latent_hw
    N = cross[0].shape[0]
    if len(tokens) != N:
        raise ValueError(f"fuse_cross_attention: {len(tokens)} token lists for {N} items")
    out = torch.zeros(N, h, w, dtype=torch.float32, device=cross[0].device)
    for maps, wt in zip(cross, weights):
        if maps.dim() == 3:
            P = maps.shape[1]
            rh, rw = h, w
            while rh * rw > P:
                rh, rw = (rh + 1) // 2, (rw + 1) // 2
            maps = maps.reshape(N, rh, rw, maps.shape[-1])
        sel = torch.stack([maps[i, :, :, list(t)].float().mean(-1) for i, t in enumerate(tokens)])  # (N, rh, rw)
        up = resize_maps(sel[:, None], (h, w))
        out += float(wt) * minmax_per_class(up)[:, 0]
    return out


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q kᵀ/√d) v with SDPA; on CUDA v is zero-padded to the head width so the fused
    (flash / memory-efficient) kernels apply."""
    width = v.shape[-1]
    if q.is_cuda and width != q.shape[-1]:
        v = F.pad(v, (0, q.shape[-1] - width))
    return F.scaled_dot_product_attention(q, k, v.to(q.dtype))[..., :width]


def propagate_fused(qk: Sequence[tuple[torch.Tensor, torch.Tensor]], x: torch.Tensor) -> torch.Tensor:
    """``mean over layers l and heads h of softmax(Q_lh K_lhᵀ/√d) · x`` without forming any P x P map.
    ``qk``: per layer (q, k), each (N, H_l, P, d_l); ``x``: (N, P) or (N, P, K). Returns float32 of
    ``x``'s shape. Every (layer, head) map counts once, as in the reference's mean over the 40 maps."""
    vec = x.dim() == 2
    v = (x[..., None] if vec else x).float()
    acc = torch.zeros_like(v)
    count = 0
    for q, k in qk:
        H = q.shape[1]
        out = _attend(q, k, v[:, None].expand(-1, H, -1, -1))
        acc += out.float().sum(1)
        count += H
    acc /= count
    return acc[..., 0] if vec else acc


def propagate_reference(attn: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The reference code's product: ``attn`` (N, P, P) the mean self-attention (rows = queries) times
    ``x`` (N, P) or (N, P, K)."""
    vec = x.dim() == 2
    out = torch.bmm(attn.float(), (x[..., None] if vec else x).float())
    return out[..., 0] if vec else out


# ----------------------------------------------------------------------------------------- method

@METHODS.register("diffsegmenter", config=DiffSegmenterConfig)
class DiffSegmenter:
    """DiffSegmenter (module docstring). ``backbone``, ``clip`` and ``captioner`` may be given ready-made
    (a ``StableDiffusionBackbone``, a ``CLIPBackbone``, a ``(model, processor)`` BLIP pair); otherwise
    they come from the config (CLIP and BLIP lazily, when first needed)."""

    def __init__(self, config: DiffSegmenterConfig | None = None, backbone=None, clip=None, captioner=None):
        self.config = config if config is not None else DiffSegmenterConfig()
        self.timer = StageTimer()  # seconds per stage: "unet", "refine"
        if not isinstance(self.config, DiffSegmenterConfig):
            raise TypeError(f"DiffSegmenter: expected a DiffSegmenterConfig, got {type(self.config).__name__}")
        self.sd = backbone if backbone is not None else _load_backbone(self.config)
        self._clip = clip
        self._captioner = captioner

    # ------------------------------------------------------------------ helpers
    def _renamed(self, names: Sequence[str]) -> list[str]:
        table = self.config.rename_classes
        if table is None:
            return list(names)
        from weakseg.data.classnames import CLASS_RENAMES, rename_classes

        dataset = {"voc": "voc", "context": "context59", "coco": "coco_object"}[table]
        return rename_classes(names, CLASS_RENAMES[dataset]["diffsegmenter"])

    def self_attention_layers(self) -> list[str]:
        """The names of the UNet's self-attention layers that the propagation averages."""
        from fnmatch import fnmatchcase

        return [n for n in self.sd.attention_layers("self") if any(fnmatchcase(n, p) for p in SELF_ATTENTION_LAYERS)]

    def propagation_for(self, items: int, pixels: int) -> str:
        """The propagation ("fused" / "reference") of a UNet call over ``items`` prompts at ``pixels``
        latent pixels: ``config.propagation`` unless "auto" (see :class:`DiffSegmenterConfig`)."""
        cfg = self.config
        if cfg.propagation != "auto":
            return cfg.propagation
        if self.sd.device.type != "cpu":
            return "fused"
        need = 2 * items * pixels * pixels * 4
        return "reference" if need <= cfg.attention_budget_mib * 2 ** 20 else "fused"

    def capture_specs(self, propagation: str | None = None) -> list[LayerCapture]:
        """What one UNet pass records: every cross layer's per-resolution head mean (N, P_r, 77); for the
        propagation, the 64x64 self layers' q/k (fused) or their per-resolution mean (reference).
        ``propagation``: "fused" / "reference" (default: ``config.propagation``, "auto" read as
        "fused")."""
        propagation = propagation or self.config.propagation
        if self.config.baseline or propagation in ("fused", "auto"):
            specs = [LayerCapture(CROSS_ATTENTION_LAYERS, store="mean", group="resolution")]
            if not self.config.baseline:
                specs.append(LayerCapture(SELF_ATTENTION_LAYERS, store="qk"))
            return specs
        # every map formed once in the UNet pass, its output computed from it (the references' processors)
        return [LayerCapture(CROSS_ATTENTION_LAYERS, store="mean", group="resolution", reuse=True),
                LayerCapture(SELF_ATTENTION_LAYERS, store="mean", group="resolution", reuse=True)]

    def _tagger(self):
        if self._clip is None:
            c = self.config
            self._clip = load_tagger_clip(c.clip_model, c.clip_pretrained, c.cache_dir, c.device)
        return self._clip

    def _blip(self):
        if self._captioner is None:
            from transformers import BlipForConditionalGeneration, BlipProcessor

            name = self.config.captioner
            local = os.path.isdir(os.path.expanduser(name))
            src = os.path.expanduser(name) if local else name
            try:
                proc = BlipProcessor.from_pretrained(src, cache_dir=self.config.cache_dir, local_files_only=local)
                model = BlipForConditionalGeneration.from_pretrained(src, cache_dir=self.config.cache_dir,
                                                                     local_files_only=local)
            except (OSError, ValueError) as e:
                raise OSError(f"DiffSegmenterConfig.captioner={name!r}: could not load a BLIP captioning model "
                              f"(expected a hub name or a directory with a BlipForConditionalGeneration and its "
                              f"processor): {e}") from e
            dtype = _torch_dtype(self.config)
            self._captioner = (model.to(self.config.device, dtype).eval(), proc)
        return self._captioner

    @torch.no_grad()
    def caption(self, image: torch.Tensor, name: str) -> str:
        """BLIP conditional caption of ``image`` seeded with "a photograph of {name}"; returns the
        continuation after the seed (what DS appends to its prompt)."""
        model, proc = self._blip()
        seed = caption_seed(self.config.prompt_template).format(c=name)
        inputs = proc(images=image.permute(1, 2, 0).cpu().numpy(), text=seed, return_tensors="pt")
        inputs = {k: (v.to(model.device, model.dtype) if v.is_floating_point() else v.to(model.device))
                  for k, v in inputs.items()}
        kw = {} if self.config.caption_max_new_tokens is None else {"max_new_tokens": self.config.caption_max_new_tokens}
        out = model.generate(**inputs, **kw)
        return caption_continuation(proc.decode(out[0], skip_special_tokens=True), name,
                                    caption_seed(self.config.prompt_template))

    def prompts_for(self, name: str, continuation: str = "") -> tuple[str, list[int]]:
        """(prompt, token positions) of class ``name`` (already renamed) with a caption continuation."""
        cfg = self.config
        prompt = build_prompt(cfg.prompt_template, name, continuation, cfg.weight_words)
        return prompt, class_token_positions(self.sd, prompt, name, cfg.class_token, cfg.fuse_ing, cfg.ing_rule)

    # ------------------------------------------------------------------ the pipeline
    def candidates(self, images: list[torch.Tensor], class_names: Sequence[str],
                   image_labels: torch.Tensor | None) -> torch.Tensor:
        """(B, C) bool: the classes run through the UNet per image (background never is)."""
        B, C = len(images), len(class_names)
        if image_labels is not None:
            return image_label_mask(image_labels, B, C, "cpu")
        if self.config.open_vocab == "all":
            return torch.ones(B, C, dtype=torch.bool)
        same = all(im.shape == images[0].shape for im in images)
        batch = torch.stack(images) if same else images
        return clip_tag_classes(self._tagger(), batch, class_names, topk=self.config.tag_topk,
                                threshold=self.config.tag_threshold).cpu()

    @torch.no_grad()
    def class_maps(self, images: list[torch.Tensor], items: list[tuple[int, str, str]]) -> torch.Tensor:
        """Score maps at the latent grid for (image index, class name, caption continuation) items:
        (N, h, w) float32, averaged over the configured timesteps, before min-max."""
        cfg, sd = self.config, self.sd
        # per image: its own generator, so batching never changes an image's noise
        latents, noises = [], []
        for im in images:
            g = torch.Generator(device=sd.device).manual_seed(cfg.seed)
            z = sd.encode_images([im], size=cfg.image_size, sample=True, generator=g, resample="bilinear")
            noises.append(torch.randn(z.shape, generator=g, device=z.device, dtype=torch.float32).to(z.dtype))
            latents.append(z)
        z = torch.cat(latents)
        eps = torch.cat(noises)
        hw = tuple(z.shape[-2:])
        prompts, tokens = [], []
        for _, name, cont in items:
            p, t = self.prompts_for(name, cont)
            prompts.append(p)
            tokens.append(t)
        out = torch.zeros(len(items), *hw, dtype=torch.float32, device=sd.device)
        self_names = self.self_attention_layers()
        for s in range(0, len(items), cfg.batch_size):
            chunk = list(range(s, min(s + cfg.batch_size, len(items))))
            idx = torch.tensor([items[i][0] for i in chunk], device=sd.device)
            embeds, _ = sd.encode_prompt([prompts[i] for i in chunk])
            acc = torch.zeros(len(chunk), *hw, dtype=torch.float32, device=sd.device)
            propagation = self.propagation_for(len(chunk), hw[0] * hw[1])
            for t in cfg.timesteps:
                with self.timer("unet", sd.device):
                    zt, _ = sd.add_noise(z[idx], t, noise=eps[idx])
                    _, store = sd.unet(zt, t, embeds, capture=self.capture_specs(propagation))
                with self.timer("refine", sd.device):
                    x = self._refine(store, tokens, chunk, hw, self_names, propagation)
                acc += x
                store.reset()
            out[s:s + len(chunk)] = acc / len(cfg.timesteps)
        return out

    def _refine(self, store, tokens, chunk, hw, self_names, propagation: str) -> torch.Tensor:
        """Fused cross-attention maps of a chunk, propagated once by the 64x64 self-attention."""
        cfg = self.config
        cross = [store.resolution_mean("cross", r) for r in reversed(store.resolutions("cross"))]
        x = fuse_cross_attention(cross, [tokens[i] for i in chunk], cfg.cross_weights, hw)
        if cfg.baseline:
            return x
        grids = {store.grid(n) for n in self_names}
        if grids != {hw}:
            raise ValueError(f"DiffSegmenter: the self-attention layers {self_names} run at "
                             f"{sorted(grids)}, not at the latent grid {hw}")
        flat = x.flatten(1)
        if propagation == "fused":
            m = propagate_fused([store.qk(n) for n in self_names], flat)
        else:
            m = propagate_reference(store.resolution_mean("self", hw), flat)
        return m.view_as(x)

    def segment(self, images, class_names: Sequence[str], image_labels: torch.Tensor | None = None,
                captions: Sequence[str | None] | None = None) -> SegmentationOutput:
        """images: RGB uint8 (B, 3, H, W) or a list of (3, H, W) of one size; class_names: the C
        candidates (channel 0 = background when it is named so); image_labels: (B, C) bool of the
        classes present (weakly-supervised), else the candidates come from ``open_vocab``;
        captions: optional text per image (or None entries) appended after the class phrase of every
        prompt of that image (overrides ``config.captioner``). Scores (B, C, H, W) in [0, 1]."""
        inp = check_segment_inputs(images, class_names, image_labels)
        items_in, names, B = inp.images, inp.class_names, inp.batch
        if captions is not None and (isinstance(captions, str) or len(captions) != B):
            raise ValueError(f"captions: expected a list of {B} strings or None (one per image), got {captions!r}")
        bg = int(has_background(names))
        fg_names = self._renamed(names[bg:])
        allowed = self.candidates(items_in, names, image_labels)
        items, where = [], []
        for b in range(B):
            for j, name in enumerate(fg_names):
                if not allowed[b, bg + j]:
                    continue
                if captions is not None:
                    cont = caption_continuation(captions[b], name, caption_seed(self.config.prompt_template))
                elif self.config.captioner is not None or self._captioner is not None:
                    cont = self.caption(items_in[b], name)
                else:
                    cont = ""
                items.append((b, name, cont))
                where.append((b, j))
        H, W = inp.size
        device = self.sd.device
        fg = torch.zeros(B, len(fg_names), H, W, dtype=torch.float32, device=device)
        if items:
            maps = self.class_maps(items_in, items)
            up = minmax_per_class(resize_maps(maps[:, None], (H, W)))[:, 0]
            for n, (b, j) in enumerate(where):
                fg[b, j] = up[n]
        scores, labels = scores_to_labels(fg, names, allowed.to(device),
                                          BackgroundRule("constant", self.config.bg_threshold))
        return SegmentationOutput(scores.cpu(), labels.cpu(), names)


# ----------------------------------------------------------------------------------------- tau sweep

def sweep_bg_threshold(pairs: Iterable[tuple[torch.Tensor, torch.Tensor]], class_names: Sequence[str],
                       thresholds: Sequence[float] | None = None, ignore_index: int = 255,
                       convention: str = "all") -> tuple[float, dict[float, float]]:
    """The reference's τ protocol (DS: evaluation_voc12.py): for every τ in ``thresholds`` (default
    0.30, 0.31, …, 0.74) label each image by argmax([τ, fg scores]) and compute the dataset mIoU
    (``convention`` of ``ConfusionMatrix.miou``; "all" is DS's mean over every class). ``pairs`` yields
    (scores, gt): the method's scores (1, C, H, W) or (C, H, W) (channel 0, the background, is replaced
    by τ) and the ground truth (H, W) int. Returns (best τ, {τ: mIoU}).

    NOTE: the reference tunes τ on the **evaluation set** itself and reports the best mIoU, an optimistic
    protocol; to avoid it, sweep on a held-out split and fix ``bg_threshold`` for the evaluation."""
    from weakseg.eval.metrics import ConfusionMatrix

    if not has_background(class_names):
        raise ValueError("sweep_bg_threshold: class_names has no background class (channel 0) to threshold")
    taus = [round(0.30 + 0.01 * i, 2) for i in range(45)] if thresholds is None else [float(t) for t in thresholds]
    if not taus:
        raise ValueError("sweep_bg_threshold: thresholds is empty")
    C = len(class_names)
    cms = {t: ConfusionMatrix(C, ignore_index=ignore_index) for t in taus}
    n = 0
    for scores, gt in pairs:
        s = scores[0] if scores.dim() == 4 else scores
        if s.shape[0] != C or s.shape[-2:] != gt.shape[-2:]:
            raise ValueError(f"sweep_bg_threshold: scores {tuple(scores.shape)} do not match {C} classes and the "
                             f"ground truth {tuple(gt.shape)}")
        fg = s[1:].float()
        for t in taus:
            full = torch.cat([torch.full_like(fg[:1], t), fg])
            cms[t].update(full.argmax(0), gt.long())
        n += 1
    if n == 0:
        raise ValueError("sweep_bg_threshold: pairs is empty")
    curve = {t: float(cm.miou(convention)) for t, cm in cms.items()}
    best = max(taus, key=lambda t: (curve[t], -t))
    return best, curve
