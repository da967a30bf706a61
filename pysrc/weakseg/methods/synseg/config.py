"""SynSeg's config (:class:`SynSegConfig`), its presets (:data:`PRESETS`) and constants (the head file
format, the loss names). docs/specs/synseg.md; the segmenter is :mod:`weakseg.methods.synseg.method`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from weakseg.core import PresetConfig, is_int
from weakseg.methods.common import PAMR_DILATIONS, check_pamr_options

__all__ = ["SynSegConfig", "PRESETS", "MODEL_FORMAT", "LOSS_NAMES"]

MODEL_FORMAT = "weakseg-synseg-model"
LOSS_NAMES = ("ft", "fb", "bb", "ff")

PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    # the toy world's CLIP (weakseg.toy): 64 px, 8x8 patches of 8 px, width 128, 4 blocks, text dim 64;
    # PAMR (the TCL protocol's, 10 iterations) and background threshold 0.5, chosen on 200 toy val scenes:
    # no PAMR at 0.6 (the best threshold without it) 39.5, PAMR at 0.5 / 0.6 / 0.7: 48.0 / 46.1 / 34.9
    # (benchmarks/results/toyworld_v2_2026-12-07.md)
    "toy": dict(clip_model="toy", clip_pretrained=None, size=64, extract_layers=(1, 2, 3), reduce_dim=32,
                decoder_heads=4, decoder_ffn=128, bg_threshold=0.5, pamr_iterations=10),
    # tiny random CLIP (tests): 64 px, 8x8 patches, width 64, 3 blocks; spec §6 decoder sizes
    "tiny": dict(clip_model="tiny", clip_pretrained=None, size=64, extract_layers=(0, 1, 2), reduce_dim=8,
                 decoder_heads=2, decoder_ffn=32),
}


@dataclass
class SynSegConfig(PresetConfig):
    """Defaults: docs/specs/synseg.md (CLIP ViT-B/16 openai at 224 px).

    mode: "decoder" (SynSeg) or "patch" (the training-free baseline, raw patch-text similarity).
    clip_model / clip_pretrained / cache_dir / pos_interp: the frozen CLIP. size: the square input side.
    extract_layers: ViT block indices (0-based; (3, 6, 9) = HF CLIPSeg, (3, 7, 9) = CLIPSeg's yaml).
    reduce_dim / decoder_heads / decoder_ffn / decoder_activation: 64, 4, 2048, "relu" [B].
    film: "linear" (CLIPSeg's two Linears) or "mlp" (2-layer) [R]. upsample: "simple" (ConvT k = s =
    patch) or "complex" (CLIPSeg's Conv3x3 + 2 ConvT; patch a multiple of 4) [B].
    projector: "linear" (D -> text dim) or "mlp" (Linear, GELU, Linear) [R].
    fss_norm: "mean" (weighted mean, [R]) or "hw" (CCAM's sum / HW [B]). fss_eps: its ε.
    cos_mode: "bounded" (ε + (1 − 2ε)(s + 1)/2, [R]) or "clamp" (CCAM's clamp to [5e-4, 0.9995], [B]).
    cos_eps: 1e-4. fb_gate: the raw-cosine gate of L_fb (0.1 [P]; None disables it).
    loss_weights: (λ_ft, λ_fb, λ_bb, λ_ff), all 1.0 [R].
    templates / synonym_sep: text prompts ("single" = "a photo of a {}." [B]; "ensemble" etc.) and the
    synonym separator of class names (None = names verbatim).
    views: 5 (whole + 4 quadrants, [P]) or 1 (fast path). fusion: "mean" or "max" of global and local [R].
    bg_threshold: τ of the background rule (0.5 [R]). checkpoint: the trained head file.
    pamr_iterations / pamr_dilations: PAMR on the fused class maps before the background rule (the TCL
    evaluation protocol's post-processing: 10 iterations at dilations 1, 2, 4, 8, 12, 24; 0 = off, the
    default, as SynSeg's own evaluation).
    """

    mode: str = "decoder"
    clip_model: str = "ViT-B-16"
    clip_pretrained: str | None = "openai"
    cache_dir: str | None = None
    pos_interp: str = "bicubic"
    size: int = 224
    extract_layers: tuple = (3, 6, 9)
    reduce_dim: int = 64
    decoder_heads: int = 4
    decoder_ffn: int = 2048
    decoder_activation: str = "relu"
    film: str = "linear"
    upsample: str = "simple"
    projector: str = "linear"
    fss_norm: str = "mean"
    fss_eps: float = 1e-6
    cos_mode: str = "bounded"
    cos_eps: float = 1e-4
    fb_gate: float | None = 0.1
    loss_weights: tuple = (1.0, 1.0, 1.0, 1.0)
    templates: Any = "single"
    synonym_sep: str | None = None
    views: int = 5
    fusion: str = "mean"
    bg_threshold: float = 0.5
    checkpoint: str | None = None
    pamr_iterations: int = 0
    pamr_dilations: tuple = PAMR_DILATIONS

    PRESETS = PRESETS  # (class attribute, not a field) the named presets above

    def __post_init__(self) -> None:
        self._apply_preset()
        self.extract_layers = tuple(int(i) for i in self.extract_layers)
        self.loss_weights = tuple(float(w) for w in self.loss_weights)
        if isinstance(self.pamr_dilations, list):
            self.pamr_dilations = tuple(self.pamr_dilations)
        if isinstance(self.templates, list):
            self.templates = tuple(self.templates)
        self._validate()

    def _validate(self) -> None:
        def bad(name, want):
            raise ValueError(f"SynSegConfig.{name}: expected {want}, got {getattr(self, name)!r}")

        choices = {"mode": ("decoder", "patch"), "film": ("linear", "mlp"), "upsample": ("simple", "complex"),
                   "projector": ("linear", "mlp"), "fss_norm": ("mean", "hw"), "cos_mode": ("bounded", "clamp"),
                   "fusion": ("mean", "max"), "decoder_activation": ("relu", "gelu"),
                   "pos_interp": ("bicubic", "bilinear", "nearest")}
        for name, ok in choices.items():
            if getattr(self, name) not in ok:
                bad(name, "one of " + ", ".join(repr(o) for o in ok))
        for n in ("size", "reduce_dim", "decoder_heads", "decoder_ffn"):
            v = getattr(self, n)
            if not is_int(v, 1):
                bad(n, "an int >= 1")
        if self.reduce_dim % self.decoder_heads:
            bad("reduce_dim", f"a multiple of decoder_heads={self.decoder_heads}")
        if not self.extract_layers or any(i < 0 for i in self.extract_layers):
            bad("extract_layers", "a non-empty list of block indices >= 0")
        if self.views not in (1, 5):
            bad("views", "5 (whole image + 4 quadrants) or 1 (single view)")
        if len(self.loss_weights) != 4 or any(w < 0 for w in self.loss_weights):
            bad("loss_weights", "4 non-negative weights (ft, fb, bb, ff)")
        if not 0 < self.cos_eps < 0.5:
            bad("cos_eps", "a number in (0, 0.5)")
        if not 0 <= self.bg_threshold <= 1:
            bad("bg_threshold", "a number in [0, 1]")
        check_pamr_options("SynSegConfig", self.pamr_iterations, self.pamr_dilations)
        if self.fb_gate is not None and not -1 <= self.fb_gate <= 1:
            bad("fb_gate", "a cosine in [-1, 1] or None")

    def head_arch(self, width: int, embed_dim: int, grid: tuple[int, int], patch: int) -> dict[str, Any]:
        """What a trained head file must match."""
        return {"width": width, "embed_dim": embed_dim, "grid": list(grid), "patch": patch,
                "extract_layers": list(self.extract_layers), "reduce_dim": self.reduce_dim,
                "decoder_heads": self.decoder_heads, "decoder_ffn": self.decoder_ffn,
                "decoder_activation": self.decoder_activation, "film": self.film, "upsample": self.upsample,
                "projector": self.projector}
