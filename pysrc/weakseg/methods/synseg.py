"""SynSeg (``weakseg.create("synseg")``): a frozen CLIP ViT, FiLM fusion of the class text into the visual
tokens, a CLIPSeg-style decoder, trained from image-caption pairs with the Feature Synergy Structure (FSS)
and four Multi-Category Contrastive losses (MCCL). specs/synseg.md; tags there: [P] paper, [B] a
building block (CLIPSeg / CCAM / TCL), [R] reconstruction — every [R] choice is a config field here.

Model (§1): the activations of the ViT blocks ``extract_layers`` (0-based, (3, 6, 9)) are reduced to
``reduce_dim`` (64) by one Linear each and decoded deep to shallow: ``a = reduce(h_9)``, FiLM
(``film_mul(t) ⊙ a + film_add(t)``), block; ``a = reduce(h_6) + a``, block; ... (one post-norm
transformer layer per extracted layer, 4 heads, FFN 2048, ReLU). The patch tokens are reshaped to the
grid and a transposed convolution (k = s = patch) gives one logit map per (image, class) at input
resolution. For K classes the encoder runs once and the decoder sees B·K rows in one batched pass.

FSS (§2, training): ``m = avgpool(sigmoid(logits))`` on the patch grid, ``A = [m; 1 − m]``,
``[f̃; b̃] = A F / (A 1 + ε)`` (F = post-decoder patch tokens), then the projector maps both into the
text space. MCCL (§3): bounded cosine ``ŝ = ε + (1 − 2ε)(s + 1)/2``; L_ft = −log ŝ(f_c, t_c),
L_fb = 1[s(f_c, b_c) > 0.1] · −log(1 − ŝ(f_c, b_c)) (gate without gradient), L_bb = −log ŝ(b_c, b_c′),
L_ff = −log(1 − ŝ(f_c, f_c′)) over the ordered pairs c ≠ c′ of one image; weighted sum.

Inference (§5): ``views=5`` runs the whole image and its 4 quadrants (each resized to ``size``) as one
batch and fuses ½(global + stitched local) (``fusion="max"`` as an option); ``views=1`` is the
single-view fast path. With a background class first, label = argmax over [τ, P_1..P_C] (TCL's rule,
``bg_threshold`` τ = 0.5); without one, plain argmax. ``mode="patch"``: the training-free baseline (raw
CLIP patch-text cosine, per-class min-max, the same background rule).

Models: ``clip_model`` = an open_clip name (+ ``clip_pretrained`` tag), a local folder, ``"tiny"``
(random, tests) or ``"toy"`` (the toy world's CLIP). ``checkpoint``: the trained head
(``weakseg train synseg``). Presets: ``default``, ``toy``, ``tiny``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from weakseg.core import (BACKBONES, METHODS, PresetConfig, SegmentationOutput, check_segment_inputs, check_weights,
                          read_safetensors_file)
from weakseg.methods.common import BackgroundRule, minmax_per_class, scores_to_labels

__all__ = ["SynSeg", "SynSegConfig", "SynSegHead", "PRESETS", "bounded_cos", "fss_pool", "mccl_losses",
           "split_views", "stitch_views", "read_head_file", "MODEL_FORMAT", "LOSS_NAMES"]

MODEL_FORMAT = "weakseg-synseg-model"
LOSS_NAMES = ("ft", "fb", "bb", "ff")

PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    # the toy world's CLIP (weakseg.toy): 64 px, 8x8 patches of 8 px, width 128, 4 blocks, text dim 64
    "toy": dict(clip_model="toy", clip_pretrained=None, size=64, extract_layers=(1, 2, 3), reduce_dim=32,
                decoder_heads=4, decoder_ffn=128),
    # tiny random CLIP (tests): 64 px, 8x8 patches, width 64, 3 blocks; spec §6 decoder sizes
    "tiny": dict(clip_model="tiny", clip_pretrained=None, size=64, extract_layers=(0, 1, 2), reduce_dim=8,
                 decoder_heads=2, decoder_ffn=32),
}


@dataclass
class SynSegConfig(PresetConfig):
    """Defaults: specs/synseg.md (CLIP ViT-B/16 openai at 224 px).

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

    PRESETS = PRESETS  # (class attribute, not a field) the named presets above

    def __post_init__(self) -> None:
        self._apply_preset()
        self.extract_layers = tuple(int(i) for i in self.extract_layers)
        self.loss_weights = tuple(float(w) for w in self.loss_weights)
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
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
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
        if self.fb_gate is not None and not -1 <= self.fb_gate <= 1:
            bad("fb_gate", "a cosine in [-1, 1] or None")

    def head_arch(self, width: int, embed_dim: int, grid: tuple[int, int], patch: int) -> dict[str, Any]:
        """What a trained head file must match."""
        return {"width": width, "embed_dim": embed_dim, "grid": list(grid), "patch": patch,
                "extract_layers": list(self.extract_layers), "reduce_dim": self.reduce_dim,
                "decoder_heads": self.decoder_heads, "decoder_ffn": self.decoder_ffn,
                "decoder_activation": self.decoder_activation, "film": self.film, "upsample": self.upsample,
                "projector": self.projector}


# ----------------------------------------------------------------------------------------- FSS and MCCL

def bounded_cos(u: torch.Tensor, v: torch.Tensor, eps: float = 1e-4, mode: str = "bounded"
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(ŝ, s): the raw cosine ``s`` of L2-normalised ``u``, ``v`` over the last axis and its bounded map
    ``ŝ ∈ [ε, 1 − ε]`` ("bounded": ε + (1 − 2ε)(clamp(s, −1, 1) + 1)/2) or CCAM's clamp of ``s`` to
    [5e-4, 0.9995] ("clamp")."""
    s = (F.normalize(u, dim=-1) * F.normalize(v, dim=-1)).sum(-1)
    if mode == "bounded":
        return eps + (1 - 2 * eps) * (s.clamp(-1, 1) + 1) / 2, s
    if mode == "clamp":
        return s.clamp(5e-4, 0.9995), s
    raise ValueError(f"mode: expected 'bounded' or 'clamp', got {mode!r}")


def fss_pool(logits: torch.Tensor, tokens: torch.Tensor, grid: tuple[int, int], norm: str = "mean",
             eps: float = 1e-6) -> torch.Tensor:
    """The synergy pair of each decoder row: logits (R, S, S) (or (..., S, S) with R rows in all), tokens
    (R, h·w, D) -> (R, 2, D) = [foreground; background] features. The sigmoid map is average-pooled to
    the patch grid (m), duplicated as [m; 1 − m] and multiplied with the tokens; ``norm="mean"`` divides
    by the pooled areas (+ eps), ``"hw"`` by h·w (CCAM)."""
    R, N, _ = tokens.shape
    S = logits.shape[-2:]
    m = F.adaptive_avg_pool2d(torch.sigmoid(logits.reshape(R, 1, *S)), grid).flatten(1)
    if m.shape[1] != N:
        raise ValueError(f"fss_pool: the {tuple(grid)} grid has {m.shape[1]} cells for {N} tokens")
    a = torch.stack([m, 1 - m], dim=1)  # (R, 2, N)
    sums = torch.einsum("rpn,rnd->rpd", a, tokens)
    if norm == "mean":
        return sums / (a.sum(-1, keepdim=True) + eps)
    if norm == "hw":
        return sums / N
    raise ValueError(f"norm: expected 'mean' or 'hw', got {norm!r}")


def mccl_losses(fg: torch.Tensor, bg: torch.Tensor, text: torch.Tensor, valid: torch.Tensor | None = None,
                weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0), eps: float = 1e-4, mode: str = "bounded",
                gate: float | None = 0.1) -> dict[str, torch.Tensor]:
    """The four MCCL losses on fg, bg, text (B, K, E) with ``valid`` (B, K) bool (padded categories off).

    Per image n with K_n valid categories and the K_n(K_n − 1) ordered pairs P_n:
    ft = mean_c −log ŝ(f_c, t_c); fb = (1/K_n) Σ_c 1[s(f_c, b_c) > gate] · −log(1 − ŝ(f_c, b_c));
    bb = mean_P −log ŝ(b_c, b_c′); ff = mean_P −log(1 − ŝ(f_c, f_c′)) (0 when K_n < 2). Each term is averaged
    over the images with K_n >= 1. Returns {"loss": Σ λ·term, "ft", "fb", "bb", "ff"}."""
    if fg.shape != bg.shape or fg.shape != text.shape or fg.dim() != 3:
        raise ValueError(f"mccl_losses: expected fg, bg, text of one shape (B, K, E), got {tuple(fg.shape)}, "
                         f"{tuple(bg.shape)}, {tuple(text.shape)}")
    B, K, _ = fg.shape
    if valid is None:
        valid = torch.ones(B, K, dtype=torch.bool, device=fg.device)
    if valid.shape != (B, K):
        raise ValueError(f"valid: expected shape ({B}, {K}), got {tuple(valid.shape)}")
    valid = valid.to(fg.device, torch.bool)
    vf = valid.to(fg.dtype)
    kn = vf.sum(1)
    has = kn > 0
    n_img = has.to(fg.dtype).sum().clamp_min(1)

    ft_hat, _ = bounded_cos(fg, text, eps, mode)
    fb_hat, fb_raw = bounded_cos(fg, bg, eps, mode)
    ft_i = (-torch.log(ft_hat) * vf).sum(1) / kn.clamp_min(1)
    with torch.no_grad():
        g = (fb_raw > gate).to(fg.dtype) if gate is not None else torch.ones_like(fb_raw)
    fb_i = (-torch.log1p(-fb_hat) * g * vf).sum(1) / kn.clamp_min(1)

    pair = valid[:, :, None] & valid[:, None, :] & ~torch.eye(K, dtype=torch.bool, device=fg.device)[None]
    pf = pair.to(fg.dtype)
    npair = pf.sum((1, 2)).clamp_min(1)
    bb_hat, _ = bounded_cos(bg[:, :, None], bg[:, None, :], eps, mode)
    ff_hat, _ = bounded_cos(fg[:, :, None], fg[:, None, :], eps, mode)
    bb_i = (-torch.log(bb_hat) * pf).sum((1, 2)) / npair
    ff_i = (-torch.log1p(-ff_hat) * pf).sum((1, 2)) / npair

    terms = {n: (t * has.to(fg.dtype)).sum() / n_img for n, t in zip(LOSS_NAMES, (ft_i, fb_i, bb_i, ff_i))}
    total = sum(float(w) * terms[n] for w, n in zip(weights, LOSS_NAMES))
    return {"loss": total, **terms}


# ----------------------------------------------------------------------------------------- modules

class _FiLM(nn.Module):
    def __init__(self, embed_dim: int, dim: int, kind: str):
        super().__init__()

        def make():
            if kind == "linear":
                return nn.Linear(embed_dim, dim)
            return nn.Sequential(nn.Linear(embed_dim, dim), nn.ReLU(), nn.Linear(dim, dim))

        self.mul, self.add = make(), make()

    def forward(self, a: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.mul(t)[:, None] * a + self.add(t)[:, None]


class SynSegHead(nn.Module):
    """Everything SynSeg trains: the reduce Linears, FiLM, the decoder blocks, the upsampling head and the
    projector. Inputs: the frozen ViT's block outputs (B, 1 + h·w, width) at ``extract_layers`` (in that
    order) and text embeddings (K, E) shared by the batch or (B, K, E) per image."""

    def __init__(self, width: int, embed_dim: int, grid: tuple[int, int], patch: int, *, num_layers: int = 3,
                 reduce_dim: int = 64, heads: int = 4, ffn: int = 2048, activation: str = "relu",
                 film: str = "linear", upsample: str = "simple", projector: str = "linear", seed: int = 0):
        super().__init__()
        if upsample == "complex" and patch % 4:
            raise ValueError(f"upsample='complex' needs a patch size divisible by 4, got {patch}")
        self.grid = (int(grid[0]), int(grid[1]))
        self.patch = int(patch)
        D = reduce_dim
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.reduces = nn.ModuleList([nn.Linear(width, D) for _ in range(num_layers)])
            self.film = _FiLM(embed_dim, D, film)
            self.blocks = nn.ModuleList([nn.TransformerEncoderLayer(D, heads, ffn, dropout=0.0, activation=activation,
                                                                    batch_first=True, norm_first=False)
                                         for _ in range(num_layers)])
            if upsample == "simple":
                self.upsample = nn.ConvTranspose2d(D, 1, kernel_size=patch, stride=patch)
            else:
                k = patch // 4
                self.upsample = nn.Sequential(nn.Conv2d(D, D, 3, padding=1), nn.ReLU(),
                                              nn.ConvTranspose2d(D, D // 2, 4, stride=4), nn.ReLU(),
                                              nn.ConvTranspose2d(D // 2, 1, k, stride=k))
            self.projector = (nn.Linear(D, embed_dim) if projector == "linear" else
                              nn.Sequential(nn.Linear(D, D), nn.GELU(), nn.Linear(D, embed_dim)))

    def decode(self, acts: Sequence[torch.Tensor], text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (logits (B, K, S, S), post-decoder patch tokens (B·K, h·w, D)); row b·K + k = image b, class k."""
        if len(acts) != len(self.reduces):
            raise ValueError(f"acts: expected {len(self.reduces)} layer activations, got {len(acts)}")
        B, T, _ = acts[0].shape
        if text.dim() == 2:
            text = text.unsqueeze(0).expand(B, text.shape[0], text.shape[1])
        K = text.shape[1]
        t = text.reshape(B * K, text.shape[-1]).to(acts[0].dtype)
        a = None
        for i, (h, red, blk) in enumerate(zip(reversed(list(acts)), self.reduces, self.blocks)):
            r = red(h)  # reduce before expanding to B·K rows
            r = r.unsqueeze(1).expand(B, K, T, r.shape[-1]).reshape(B * K, T, r.shape[-1])
            a = r if a is None else r + a
            if i == 0:
                a = self.film(a, t)
            a = blk(a)
        tokens = a[:, 1:]
        gh, gw = self.grid
        x = tokens.transpose(1, 2).reshape(B * K, tokens.shape[-1], gh, gw)
        logits = self.upsample(x)
        return logits.reshape(B, K, logits.shape[-2], logits.shape[-1]), tokens

    def forward(self, acts: Sequence[torch.Tensor], text: torch.Tensor, fss_norm: str = "mean",
                fss_eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training pass: (logits (B, K, S, S), fg (B, K, E), bg (B, K, E)) — FSS pooling + projector."""
        logits, tokens = self.decode(acts, text)
        B, K = logits.shape[:2]
        pair = self.projector(fss_pool(logits, tokens, self.grid, fss_norm, fss_eps))  # (B·K, 2, E)
        pair = pair.reshape(B, K, 2, pair.shape[-1])
        return logits, pair[:, :, 0], pair[:, :, 1]


def read_head_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A trained SynSeg head (safetensors) -> (weights, metadata with "arch")."""
    tensors, info = read_safetensors_file(path, (MODEL_FORMAT, "weakseg-synseg-checkpoint"), "SynSegConfig.checkpoint",
                                          "train one with `weakseg train synseg`")
    return {k: v for k, v in tensors.items() if not k.startswith(("optim.", "rng."))}, info


# ----------------------------------------------------------------------------------------- views

def split_views(image: torch.Tensor) -> tuple[list[torch.Tensor], list[tuple[int, int, int, int]]]:
    """(3, H, W) -> ([whole, top-left, top-right, bottom-left, bottom-right], the quadrants' (y0, y1, x0, x1))."""
    H, W = image.shape[-2:]
    if H < 2 or W < 2:
        raise ValueError(f"images: the 5-view inference needs images of at least 2x2 pixels, got {H}x{W} "
                         f"(use views=1)")
    hy, hx = H // 2, W // 2
    boxes = [(0, hy, 0, hx), (0, hy, hx, W), (hy, H, 0, hx), (hy, H, hx, W)]
    return [image] + [image[:, y0:y1, x0:x1] for y0, y1, x0, x1 in boxes], boxes


def stitch_views(probs: torch.Tensor, boxes: Sequence[tuple[int, int, int, int]], size: tuple[int, int],
                 fusion: str = "mean") -> torch.Tensor:
    """probs (5, C, S, S) of [whole, 4 quadrants] -> (C, H, W): the whole map upsampled, the quadrants
    resized into their boxes, fused by ``mean`` (½(global + local)) or ``max``."""
    H, W = size
    glob = F.interpolate(probs[:1], size=(H, W), mode="bilinear", align_corners=False)[0]
    local = torch.empty_like(glob)
    for q, (y0, y1, x0, x1) in enumerate(boxes, start=1):
        local[:, y0:y1, x0:x1] = F.interpolate(probs[q:q + 1], size=(y1 - y0, x1 - x0), mode="bilinear",
                                               align_corners=False)[0]
    return 0.5 * (glob + local) if fusion == "mean" else torch.maximum(glob, local)


# ----------------------------------------------------------------------------------------- graphs

class _ImageGraph(nn.Module):
    """images (B, 3, S, S) normalised, text (C, E) -> sigmoid probabilities (B, C, S, S)."""

    def __init__(self, clip, head: SynSegHead, layers: Sequence[int], pos_interp: str, size: int):
        from weakseg.backbones.clip import interpolate_pos_embed

        super().__init__()
        self.clip, self.head, self.layers = clip, head, tuple(layers)
        # the grid is fixed by the input size: resample the position embedding once, here, so the exported
        # graph holds no (bicubic) resampling
        grid = (size // clip.patch_size[0], size // clip.patch_size[1])
        with torch.no_grad():
            pos = interpolate_pos_embed(clip.model.visual.positional_embedding, grid, mode=pos_interp,
                                        src_grid=clip.native_grid)
        self.register_buffer("pos", pos.detach().clone(), persistent=False)

    def forward(self, images: torch.Tensor, text_embeddings: torch.Tensor) -> torch.Tensor:
        acts = self.clip.encode_layers(images, self.layers, pos=self.pos)
        return torch.sigmoid(self.head.decode(acts, text_embeddings)[0])


class _TextGraph(nn.Module):
    def __init__(self, clip):
        super().__init__()
        self.clip = clip

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.clip.model.encode_text(tokens, normalize=True)


# ----------------------------------------------------------------------------------------- segmenter

def load_clip(config: SynSegConfig, device=None):
    """The frozen CLIP the model spec ``config.clip_model`` names (tiny, toy, an open_clip name or a folder)."""
    return BACKBONES.build("clip", config.clip_model, pretrained=config.clip_pretrained, cache_dir=config.cache_dir,
                           device=device or config.device, pos_interp=config.pos_interp)


@METHODS.register("synseg", config=SynSegConfig)
class SynSeg:
    """The SynSeg segmenter (see the module docstring). ``clip``: a CLIPBackbone to use instead of
    ``config.clip_model``; ``head``: a SynSegHead instead of ``config.checkpoint`` / a fresh one."""

    def __init__(self, config: SynSegConfig | None = None, clip=None, head: SynSegHead | None = None):
        self.config = cfg = config or SynSegConfig()
        self.clip = clip if clip is not None else load_clip(cfg)
        self.clip.eval().requires_grad_(False)
        ph, pw = self.clip.patch_size
        if ph != pw:
            raise ValueError(f"SynSeg needs square patches, the CLIP has {ph}x{pw}")
        if cfg.size % ph:
            raise ValueError(f"SynSegConfig.size: expected a multiple of the patch size {ph}, got {cfg.size}")
        L = self.clip.num_layers
        if max(cfg.extract_layers) >= L:
            raise ValueError(f"SynSegConfig.extract_layers: block indices must be < {L} (the CLIP's depth), got "
                             f"{list(cfg.extract_layers)}")
        self.grid = (cfg.size // ph, cfg.size // ph)
        self.patch = ph
        self.arch = cfg.head_arch(self.clip.width, self.clip.embed_dim, self.grid, ph)
        self.trained_steps = None
        if head is None:
            head = self.new_head(seed=cfg.seed)
            if cfg.checkpoint:
                weights, info = read_head_file(cfg.checkpoint)
                if info.get("arch") != self.arch:
                    had = info["arch"] if isinstance(info.get("arch"), dict) else {}
                    diff = {k: (had.get(k), v) for k, v in self.arch.items() if had.get(k) != v}
                    raise ValueError(f"SynSegConfig.checkpoint: {cfg.checkpoint!r} was trained for another model "
                                     f"(file vs config: {diff})")
                check_weights(weights, head.state_dict(), cfg.checkpoint, "SynSegConfig.checkpoint")
                head.load_state_dict(weights)
                self.trained_steps = info.get("step")
        self.head = head.to(self.clip.device).eval()
        self._text_cache: dict[str, torch.Tensor] = {}

    def new_head(self, seed: int = 0) -> SynSegHead:
        a = self.arch
        return SynSegHead(a["width"], a["embed_dim"], self.grid, self.patch, num_layers=len(a["extract_layers"]),
                          reduce_dim=a["reduce_dim"], heads=a["decoder_heads"], ffn=a["decoder_ffn"],
                          activation=a["decoder_activation"], film=a["film"], upsample=a["upsample"],
                          projector=a["projector"], seed=seed)

    @property
    def device(self) -> torch.device:
        return self.clip.device

    # ------------------------------------------------------------------ text
    def text_embeddings(self, names: Sequence[str]) -> torch.Tensor:
        """(C, E) L2-normalised prompt embeddings of ``names``, cached per name."""
        names = [str(n) for n in names]
        missing = list(dict.fromkeys(n for n in names if n not in self._text_cache))
        if missing:
            emb = self.clip.class_embeddings(missing, templates=self.config.templates,
                                             synonym_sep=self.config.synonym_sep).embeddings.float()
            for n, e in zip(missing, emb):
                self._text_cache[n] = e
        return torch.stack([self._text_cache[n] for n in names]).to(self.device)

    # ------------------------------------------------------------------ dense maps
    def probs(self, pixels: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Normalised views (V, 3, S, S), text (C, E) -> sigmoid maps (V, C, S, S) (one batched pass)."""
        acts = self.clip.encode_layers(pixels, self.config.extract_layers, self.config.pos_interp)
        return torch.sigmoid(self.head.decode(acts, text.to(pixels.device))[0].float())

    def patch_similarity(self, pixels_u8: list[torch.Tensor], text: torch.Tensor) -> torch.Tensor:
        """The baseline: raw CLIP patch-text cosine (V, C, h, w), per-class min-max to [0, 1]."""
        out = self.clip(pixels_u8, size=self.config.size)
        sim = torch.einsum("vhwd,cd->vchw", F.normalize(out.patch.float(), dim=-1),
                           F.normalize(text.float(), dim=-1))
        return minmax_per_class(sim, eps=1e-12)

    def _view_maps(self, views: list[torch.Tensor], text: torch.Tensor) -> torch.Tensor:
        if self.config.mode == "patch":
            sim = self.patch_similarity(views, text)
            return F.interpolate(sim, size=(self.config.size,) * 2, mode="bilinear", align_corners=False)
        return self.probs(self.clip.preprocess(views, size=self.config.size), text)

    @torch.no_grad()
    def class_maps(self, items: list[torch.Tensor], fg_names: Sequence[str]) -> list[torch.Tensor]:
        """Per image, the fused per-class maps (C, H, W) in [0, 1] at its size."""
        cfg = self.config
        text = self.text_embeddings(fg_names)
        views, plan = [], []
        for im in items:
            if cfg.views == 5:
                vs, boxes = split_views(im)
            else:
                vs, boxes = [im], None
            plan.append((len(views), boxes, tuple(im.shape[-2:])))
            views.extend(vs)
        maps = self._view_maps(views, text).cpu()
        out = []
        for start, boxes, size in plan:
            if boxes is None:
                out.append(F.interpolate(maps[start:start + 1], size=size, mode="bilinear", align_corners=False)[0])
            else:
                out.append(stitch_views(maps[start:start + 5], boxes, size, cfg.fusion))
        return out

    # ------------------------------------------------------------------ Segmenter
    def segment(self, images, class_names: Sequence[str], image_labels: torch.Tensor | None = None
                ) -> SegmentationOutput:
        """images: RGB uint8 (B, 3, H, W) or a list of same-sized (3, H, W); class_names: the candidate classes, the background first where the dataset has one (its channel is
        the constant τ); image_labels: optional (B, C) bool restricting each image's classes."""
        inp = check_segment_inputs(images, class_names, image_labels, min_foreground=1)
        items, names, allowed = inp.images, inp.class_names, inp.allowed
        fg_names = names[1:] if inp.background else names
        fg = torch.stack(self.class_maps(items, fg_names))
        scores, labels = scores_to_labels(fg, names, allowed, BackgroundRule("constant", self.config.bg_threshold))
        return SegmentationOutput(scores=scores, labels=labels, class_names=names)

    # ------------------------------------------------------------------ deployment
    def export_graphs(self):
        """The :class:`weakseg.export.ExportGraphs` of the single-view model: image_model(images,
        text_embeddings) -> sigmoid maps (B, C, S, S) (B, C dynamic), text_model(tokens) -> (C, E), the
        TCL background rule (label 0 where every class map is below τ). The 5-view split and stitch stay
        in host code (:func:`split_views`, :func:`stitch_views`)."""
        from weakseg.backbones.text import resolve_templates
        from weakseg.export import ExportGraphs

        if self.config.mode != "decoder":
            raise ValueError("SynSegConfig.mode: only mode='decoder' can be exported")
        clip = self.clip
        templates = list(resolve_templates(self.config.templates))
        return ExportGraphs(
            image_model=_ImageGraph(clip, self.head, self.config.extract_layers, self.config.pos_interp, self.config.size).eval(),
            text_model=_TextGraph(clip).eval(), tokenize=clip.tokenizer, prompt=templates[0],
            input_size=self.config.size, mean=tuple(float(v) for v in clip.mean.flatten()),
            std=tuple(float(v) for v in clip.std.flatten()),
            context_length=int(getattr(clip.model, "context_length", 77)), embed_dim=clip.embed_dim,
            background={"kind": "threshold", "value": float(self.config.bg_threshold)}, method="synseg",
            metadata={"scores": "sigmoid probabilities", "views": 1, "templates": templates,
                      "background_note": "threshold applies to datasets with a background class; use "
                                         "{'kind': 'none'} otherwise",
                      "arch": self.arch, "checkpoint": self.config.checkpoint})

