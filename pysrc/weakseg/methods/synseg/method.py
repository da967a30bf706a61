"""SynSeg (``weakseg.create("synseg")``): a frozen CLIP ViT, FiLM fusion of the class text into the visual
tokens, a CLIPSeg-style decoder, trained from image-caption pairs with the Feature Synergy Structure (FSS)
and four Multi-Category Contrastive losses (MCCL). docs/specs/synseg.md; tags there: [P] paper, [B] a
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

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from weakseg.core import BACKBONES, METHODS, SegmentationOutput, check_segment_inputs, check_weights
from weakseg.methods.common import BackgroundRule, minmax_per_class, pamr_maps, scores_to_labels
from weakseg.methods.synseg.config import SynSegConfig
from weakseg.methods.synseg.head import SynSegHead, read_head_file
from weakseg.methods.synseg.views import split_views, stitch_views

__all__ = ["SynSeg", "load_clip"]


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
        fg = pamr_maps(items, fg, self.config.pamr_iterations, self.config.pamr_dilations)
        scores, labels = scores_to_labels(fg, names, allowed, BackgroundRule("constant", self.config.bg_threshold))
        return SegmentationOutput(scores=scores, labels=labels, class_names=names)

    # ------------------------------------------------------------------ deployment
    def export_graphs(self):
        """The :class:`weakseg.export.ExportGraphs` of the single-view model: image_model(images,
        text_embeddings) -> sigmoid maps (B, C, S, S) (B, C dynamic), text_model(tokens) -> (C, E), the
        TCL background rule (label 0 where every class map is below τ). The 5-view split and stitch stay
        in host code (:func:`split_views`, :func:`stitch_views`), and so does PAMR when
        ``pamr_iterations`` > 0 (:class:`weakseg.methods.common.PAMR` on the stitched maps, before the rule)."""
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
