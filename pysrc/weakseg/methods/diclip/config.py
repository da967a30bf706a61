"""DiCLIP's config (:class:`DiCLIPConfig`), its presets (:data:`PRESETS`) and option constants (the SD
layers of VCE and the walk, the CAM sources, the refinement steps). docs/specs/diclip.md §6; the
segmenter is :mod:`weakseg.methods.diclip.method`, the text rows :mod:`weakseg.methods.diclip.prompts`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from weakseg.core import PresetConfig, is_int
from weakseg.data.classnames import VOC_CLASSES
from weakseg.methods.diclip import refine as reflib
from weakseg.methods.diclip.prompts import DICLIP_BACKGROUND_WORDS, DICLIP_VOC20

__all__ = ["DiCLIPConfig", "PRESETS", "VCE_LAYER", "WALK_LAYER", "CAM_SOURCES", "REFINE_STEPS", "MODES", "FLIPS",
           "DTYPES", "SD21_BASE", "SD15", "TOY_STUFF"]

SD21_BASE = "stabilityai/stable-diffusion-2-1-base"
SD15 = "runwayml/stable-diffusion-v1-5"
VCE_LAYER = "up_blocks.1.attentions.2.transformer_blocks.0.attn1"
WALK_LAYER = "up_blocks.3.attentions.1.transformer_blocks.0.attn1"
CAM_SOURCES = ("static", "dynamic", "patch")
REFINE_STEPS = ("caa", "walk", "par")
MODES = ("cam", "head")
FLIPS = ("code", "all", "none")
DTYPES = ("auto", "float32", "float16", "bfloat16")
TOY_STUFF = ("grass", "sky", "sand", "water", "brick")

PRESETS: dict[str, dict[str, Any]] = {
    "voc": {},
    "coco": dict(class_prompts={}, walk_steps=10, caa_threshold=0.88),
    # the toy world (weakseg.toy): 64 px scenes, CLIP 8x8 patches, SD 16x16 latents with 2 heads per layer;
    # VCE from the 8x8 self-attention (on CLIP's grid: the SD-analogous 4x4 one is too coarse for 8-14 px
    # objects), the walk (when asked for) on the 16x16 (full latent) one as SD's 40x40. Refinement: CAA
    # only: on toy val scenes CAA raised the static-cache CAM's mIoU and the walk lowered it (the toy SD's
    # 16x16 self-attention spreads the CAMs of the toy CLIP over the background);
    # benchmarks/results/diclip_toy_refine.md. The head's inference: one scale and the reference's DenseCRF
    # with a colour kernel of 20 (the code's 3 is for photos; toy objects are flat colours on textured
    # stuff). Chosen on 200 val scenes over three training seeds: 45.5 (scales 1.0 + 1.5, no CRF) -> 61.1
    # (benchmarks/results/toyworld_v2_2026-12-07.md)
    "toy": dict(clip_model="toy", sd_model="toy", size=64, templates="a photo of a {}.", class_prompts={},
                refine=("caa",),
                background_words=TOY_STUFF, vce_layer="up_blocks.2.attentions.1.transformer_blocks.0.attn1",
                vce_heads=(0, 1), walk_heads=(0, 1), test_scales=(1.0,), crf=True, crf_bi_rgb=20.0,
                head_dim=64, head_heads=4, gen_model=None),
    # tiny random models (tests): 64 px, CLIP 8x8 patches, SD 8x8 latents with 4 heads per layer
    "tiny": dict(clip_model="tiny", sd_model="tiny", size=64, templates="a photo of a {}.", class_prompts={},
                 background_words=("grass", "sky"), test_scales=(1.0,), head_dim=32, head_heads=4, head_blocks=1,
                 gen_model=None),
}


@dataclass
class DiCLIPConfig(PresetConfig):
    """Defaults: the reference code on VOC (docs/specs/diclip.md §6).

    mode: "cam" (training-free CAM pipeline) or "head" (the trained head; needs ``checkpoint``).
    clip_model / clip_pretrained / sd_model / gen_model / cache_dir / dtype: the models ("tiny", "toy",
    hub names, local folders); ``gen_model`` generates the cache images (the code loads SD v1.5; None =
    ``sd_model``, the paper's 2.1). size: the square input side of CLIP and SD (320 -> a 20x20 grid).
    pos_interp: position-embedding resampling ("bilinear"). feature_norm: "tokens" (the code's norm over
    the token axis), "channels" or "none". surgery_layers: 3.
    templates / class_prompts / synonym_sep / background_words: text rows (the "a clean origami {}."
    template; dataset name -> prompt name, VOC's with the reference's synonyms, formatted whole as the
    code does when ``synonym_sep`` is None; DiCLIP's 25 background words).
    vce / vce_layer / vce_heads / vce_head_mode / vce_threshold / vce_weight: VCE on, the SD layer and
    heads (1, 2), "chain" (Â₁Â₂, the code) or "mean" (paper), 0.2 (paper 5e-4), weight 1.0.
    acr / acr_clusters / acr_kmeans_iterations / acr_iterations / acr_recluster / acr_exact_seeds: ACR on,
    9 requested clusters (the code's grid gives 16 seeds; ``acr_exact_seeds`` gives 9), 5 k-means
    iterations, 3 passes (idempotent unless ``acr_recluster``, the paper's recursive variant).
    t / sd_prompt: 101, "". cache / static_weight / cache_activation / cache_beta: the key-value cache
    file, 0.5, "relu" (the code) or "exp" (the paper's exp(−β(1 − s))).
    cam_source: "static", "dynamic" or "patch" (see the module docstring; "static" without a cache is
    "patch"). dynamic_weight: 0.1 (paper 0.5). checkpoint: a trained adapter + head (``weakseg train
    diclip``). refine: the steps in order ("caa", "walk"; "par" as an option). caa_threshold / caa_layers /
    caa_attention: 0.88 (LAM inference; training uses 0.79), the last 6 blocks, "code" (the surgery blocks
    enter as their original-path attention summed over the heads, the others head-averaged, as the
    authors' clip_custom.py hands them to refine_cams_with_aff), "surgery" (the surgery blocks as their
    head-summed surgery matrix M, VCE bias included) or "head-mean" (every block head-averaged). walk_layer / walk_heads / walk_ent / walk_steps: the 40x40 layer, heads (1, 2), 0.02,
    10. par_dilations / par_iterations: PAR. adapter_prompts / adapter_dropout / adapter_zero_bias /
    adapter_text_values: 92 prompts, 0.1, the code's default biases and one-hot fc2 (paper: zero biases,
    text-weighted values). head_dim / head_blocks / head_heads / head_dropout: 256, 3, 8, 0.1.
    test_scales / flip / merge_scale / head_use_image_labels: multi-scale inference of the head, the
    code's flips, logits merged at 0.4 × the image size; the head ignores image-level labels unless set.
    crf + crf_*: DenseCRF (pydensecrf2) on the head's softmax (the code's parameters).
    """

    mode: str = "cam"
    clip_model: str = "ViT-B-16"
    clip_pretrained: str | None = "openai"
    sd_model: str = SD21_BASE
    gen_model: str | None = SD15
    cache_dir: str | None = None
    dtype: str = "auto"
    seed: int = 0
    size: int = 320
    pos_interp: str = "bilinear"
    feature_norm: str = "tokens"
    surgery_layers: int = 3
    templates: Any = "origami"
    class_prompts: dict = field(default_factory=lambda: dict(zip(VOC_CLASSES[1:], DICLIP_VOC20)))
    synonym_sep: str | None = None
    background_words: tuple = DICLIP_BACKGROUND_WORDS
    vce: bool = True
    vce_layer: str = VCE_LAYER
    vce_heads: tuple = (1, 2)
    vce_head_mode: str = "chain"
    vce_threshold: float = 0.2
    vce_weight: float = 1.0
    acr: bool = True
    acr_clusters: int = 9
    acr_kmeans_iterations: int = 5
    acr_iterations: int = 3
    acr_recluster: bool = False
    acr_exact_seeds: bool = False
    t: int = 101
    sd_prompt: str = ""
    cache: str | None = None
    static_weight: float = 0.5
    cache_activation: str = "relu"
    cache_beta: float = 1.0
    cam_source: str = "static"
    dynamic_weight: float = 0.1
    checkpoint: str | None = None
    refine: tuple = ("caa", "walk")
    caa_threshold: float = 0.88
    caa_layers: int = 6
    caa_attention: str = "code"
    walk_layer: str = WALK_LAYER
    walk_heads: tuple = (1, 2)
    walk_ent: float = 0.02
    walk_steps: int = 10
    par_dilations: tuple = (1, 2, 4, 8, 12, 24)
    par_iterations: int = 20
    adapter_prompts: int = 92
    adapter_dropout: float = 0.1
    adapter_zero_bias: bool = False
    adapter_text_values: bool = False
    head_dim: int = 256
    head_blocks: int = 3
    head_heads: int = 8
    head_dropout: float = 0.1
    test_scales: tuple = (0.7, 1.0, 1.2, 1.5)
    flip: str = "code"
    merge_scale: float = 0.4
    head_use_image_labels: bool = False
    crf: bool = False
    crf_iterations: int = 10
    crf_pos_xy: float = 1.0
    crf_pos_w: float = 3.0
    crf_bi_xy: float = 67.0
    crf_bi_rgb: float = 3.0
    crf_bi_w: float = 4.0

    PRESETS = PRESETS  # (class attribute, not a field) the named presets above

    def __post_init__(self) -> None:
        self._apply_preset()
        for n in ("vce_heads", "walk_heads", "refine", "par_dilations", "test_scales", "background_words"):
            setattr(self, n, tuple(getattr(self, n)))
        if isinstance(self.templates, list):
            self.templates = tuple(self.templates)
        self._validate()

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "DiCLIPConfig":
        if "caa_surgery" in values:
            raise ValueError("DiCLIPConfig.caa_surgery: replaced by caa_attention = 'code' (the authors' code, the "
                             "default) | 'surgery' (what caa_surgery=true did) | 'head-mean' (what caa_surgery=false "
                             "did); rename the option")
        return super().from_dict(values)

    def _validate(self) -> None:
        def bad(name, want):
            raise ValueError(f"DiCLIPConfig.{name}: expected {want}, got {getattr(self, name)!r}")

        if self.mode not in MODES:
            bad("mode", " or ".join(MODES))
        if self.cam_source not in CAM_SOURCES:
            bad("cam_source", "one of " + ", ".join(CAM_SOURCES))
        if self.dtype not in DTYPES:
            bad("dtype", "one of " + ", ".join(DTYPES))
        if self.dtype in ("float16", "bfloat16") and not str(self.device).startswith("cuda"):
            raise ValueError(f"DiCLIPConfig.dtype: {self.dtype} runs only on a GPU (device={self.device!r})")
        if self.vce_head_mode not in ("chain", "mean"):
            bad("vce_head_mode", "'chain' or 'mean'")
        if self.feature_norm not in ("tokens", "channels", "none"):
            bad("feature_norm", "'tokens', 'channels' or 'none'")
        if self.cache_activation not in ("relu", "exp"):
            bad("cache_activation", "'relu' or 'exp'")
        if self.caa_attention not in reflib.CAA_ATTENTION:
            bad("caa_attention", "one of " + ", ".join(reflib.CAA_ATTENTION))
        if self.flip not in FLIPS:
            bad("flip", "one of " + ", ".join(FLIPS))
        if any(s not in REFINE_STEPS for s in self.refine):
            bad("refine", "a list of steps from " + ", ".join(REFINE_STEPS))
        for n in ("size", "surgery_layers", "acr_clusters", "acr_kmeans_iterations", "acr_iterations", "caa_layers",
                  "head_dim", "head_blocks", "head_heads", "par_iterations", "crf_iterations"):
            v = getattr(self, n)
            if not is_int(v, 1):
                bad(n, "an int >= 1")
        for n in ("walk_steps", "adapter_prompts", "t"):
            v = getattr(self, n)
            if not is_int(v, 0):
                bad(n, "an int >= 0")
        if not self.vce_heads or not self.walk_heads:
            raise ValueError("DiCLIPConfig.vce_heads / walk_heads: expected at least one head index")
        if not self.test_scales or any(not s > 0 for s in self.test_scales):
            bad("test_scales", "a non-empty list of positive scales")
        if self.mode == "head" and not self.checkpoint:
            raise ValueError("DiCLIPConfig.checkpoint: mode='head' needs a trained checkpoint (weakseg train diclip)")
        if not isinstance(self.class_prompts, dict):
            bad("class_prompts", "a mapping of dataset class name -> prompt name")

    def torch_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            return torch.float16 if str(self.device).startswith("cuda") else torch.float32
        return getattr(torch, self.dtype)
