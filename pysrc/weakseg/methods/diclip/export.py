"""DiCLIP's deployable graphs (:class:`weakseg.export.ExportGraphs`).

What is deployed, and why (docs/specs/diclip.md §1, §5):

* The SD pass (VCE, ACR), CAA and the SD random walk are *not* in the graph. ACR runs KL k-means and the
  walk runs ``refine_propagate`` (custom ops, data-dependent loops), SD is a second large model, and the
  reference's segmentation inference (``tools/infer_seg_voc.py`` / ``eval_seg``) does not run SD either.
  The deployed path is the CLIP image tower, one forward at the fixed input size.
* With a trained head (``mode="head"`` or a checkpoint with a head): ``variant="head"`` — CLIP's 12 raw
  original-path layers -> the segmentation head -> logits on the patch grid -> bilinear upsampling to
  the input size (single scale, no flip, no CRF: multi-scale/flip averaging is N forwards of this graph
  and, like the optional DenseCRF on its softmax, is left to the caller). The head's classifier is
  closed-vocabulary, so the text embeddings *select* its classes: each input row picks the trained class
  whose text embedding (baked into the graph) is the most cosine-similar, and the graph returns that
  class's logits. The class list is free at run time
  as any subset / order of the trained classes (include "background": it is class 0 of the head);
  background rule "none". The dynamic adapter is a training-time CAM source (it feeds the pseudo
  labels, §3c) and is not used by head inference, so it is not exported.
* Without a head: ``variant="cam"`` — the training-free patch-text CAM (``cam_source="patch"``, no VCE,
  no refinement): CLIP original path + surgery path in the last ``surgery_layers`` blocks -> token
  features -> feature-surgery similarity against the input text rows plus DiCLIP's background words
  (baked in) -> min-max over tokens -> upsampled to the input size -> per-class min-max. Fully open
  vocabulary. Background rule "threshold 0.5": DiCLIP's bg = 1 − max(fg), argmax, i.e. background where
  the best class scores below 0.5. This equals ``DiCLIP.segment`` with ``vce=False, refine=(),
  cam_source="patch"`` on images already at ``size`` (tests/test_export.py checks it).

The position embedding is resampled once at export (the config's ``pos_interp``, bilinear for DiCLIP)
and stored as a buffer: the graph has a fixed grid and no resize of its own weights at run time.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from weakseg.backbones.clip import split_names, interpolate_pos_embed
from weakseg.backbones.text import resolve_templates
from weakseg.export.graphs import ExportGraphs
from weakseg.methods.diclip import cam as camlib

__all__ = ["CLIPTextGraph", "DiCLIPCamGraph", "DiCLIPHeadGraph", "diclip_export_graphs", "VARIANTS"]

VARIANTS = ("auto", "head", "cam")


class CLIPTextGraph(nn.Module):
    """tokens (P, context_length) int64 -> (P, D) L2-normalised CLIP text embeddings."""

    def __init__(self, clip_model: nn.Module):
        super().__init__()
        self.clip = clip_model

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.clip.encode_text(tokens, normalize=True).float()


class _Tower(nn.Module):
    def __init__(self, clip, size: int, pos_interp: str):
        super().__init__()
        self.backbone = clip
        ph, pw = clip.patch_size
        self.grid = (size // ph, size // pw)
        self.size = int(size)
        vis = clip.model.visual
        pos = interpolate_pos_embed(vis.positional_embedding.detach(), self.grid, mode=pos_interp,
                                    src_grid=clip.native_grid)
        self.register_buffer("pos", pos.float().clone(), persistent=True)

    def upsample(self, maps: torch.Tensor) -> torch.Tensor:
        return F.interpolate(maps, size=(self.size, self.size), mode="bilinear", align_corners=False)


class DiCLIPCamGraph(_Tower):
    """(images (B, 3, S, S) normalised, text (C, D)) -> per-class CAM scores (B, C, S, S) in [0, 1]."""

    def __init__(self, clip, size: int, pos_interp: str, surgery_layers: int, feature_norm: str,
                 background_rows: torch.Tensor):
        super().__init__(clip, size, pos_interp)
        self.surgery_layers = int(surgery_layers)
        self.feature_norm = feature_norm
        self.register_buffer("background_rows", background_rows.float().reshape(-1, clip.embed_dim).clone())

    def forward(self, images: torch.Tensor, text_embeddings: torch.Tensor) -> torch.Tensor:
        out = self.backbone.encode_normalized(images, self.pos, surgery_layers=self.surgery_layers)
        feats = camlib.token_features(out.cls, out.patch, self.feature_norm)
        rows = torch.cat([text_embeddings.float(), self.background_rows], dim=0)
        s = camlib.minmax_tokens(camlib.surgery_similarity(feats, rows))
        C = text_embeddings.shape[0]
        B = images.shape[0]
        h, w = self.grid
        cam = s[:, 1:, :C].transpose(1, 2).reshape(B, C, h, w)
        up = self.upsample(cam).flatten(2)
        lo = up.amin(dim=2, keepdim=True)
        hi = up.amax(dim=2, keepdim=True)
        return ((up - lo) / (hi - lo + 1e-12)).reshape(B, C, self.size, self.size)


class DiCLIPHeadGraph(_Tower):
    """(images (B, 3, S, S) normalised, text (C, D)) -> head logits (B, C, S, S) of the trained classes
    nearest (cosine) to the text rows."""

    def __init__(self, clip, head: nn.Module, size: int, pos_interp: str, class_rows: torch.Tensor):
        super().__init__(clip, size, pos_interp)
        self.head = head
        self.register_buffer("class_rows", F.normalize(class_rows.float(), dim=-1).clone())

    def forward(self, images: torch.Tensor, text_embeddings: torch.Tensor) -> torch.Tensor:
        out = self.backbone.encode_normalized(images, self.pos, return_layers=True)
        logits, _ = self.head(out.layers, self.grid)
        pick = (F.normalize(text_embeddings.float(), dim=-1) @ self.class_rows.T).argmax(dim=1)
        return self.upsample(logits.float().index_select(1, pick))


def _prompt_texts(method, name: str) -> list[str]:
    """DiCLIP's prompt texts of one class (class_prompts rename, synonyms, templates), as
    ``CLIPBackbone.class_embeddings`` builds them."""
    cfg = method.config
    _, parts = split_names(method.prompt_name(name), cfg.synonym_sep, "class_names")
    return [t.replace("{}", p) for p in parts for t in resolve_templates(cfg.templates)]


def diclip_export_graphs(method, variant: str = "auto") -> ExportGraphs:
    """The :class:`ExportGraphs` of a built :class:`DiCLIP` (see the module docstring)."""
    if variant not in VARIANTS:
        raise ValueError(f"variant: expected one of {', '.join(VARIANTS)}, got {variant!r}")
    cfg = method.config
    clip = method.clip.float().eval()
    if variant == "auto":
        variant = "head" if method.head is not None else "cam"
    ctx = int(getattr(clip.model, "context_length", 77))
    text_model = CLIPTextGraph(clip.model).eval()

    def tokenize(texts: Sequence[str]) -> torch.Tensor:
        return clip.tokenizer(list(texts)).to(clip.device)

    common = dict(text_model=text_model, tokenize=tokenize, prompt=resolve_templates(cfg.templates)[0],
                  input_size=int(cfg.size), mean=tuple(float(v) for v in clip.mean.flatten().tolist()),
                  std=tuple(float(v) for v in clip.std.flatten().tolist()), context_length=ctx,
                  embed_dim=int(clip.embed_dim), method="diclip",
                  prompts_for=lambda name: _prompt_texts(method, name))
    if variant == "head":
        if method.head is None:
            raise ValueError("variant='head': this DiCLIP has no trained head (load a checkpoint: "
                             "--set checkpoint=PATH mode=head)")
        probe = ExportGraphs(image_model=nn.Identity(), **common)
        class_rows = probe.text_embeddings(method.head_classes)
        graph = DiCLIPHeadGraph(clip, method.head.float().eval(), cfg.size, cfg.pos_interp, class_rows).eval()
        return ExportGraphs(image_model=graph, background={"kind": "none"}, default_classes=tuple(method.head_classes),
                            metadata={"variant": "head", "trained_classes": list(method.head_classes),
                                      "class_selection": "nearest trained class by text-embedding cosine"},
                            **common)
    words = list(cfg.background_words)
    if words:
        bg = clip.class_embeddings(words, templates=cfg.templates, synonym_sep=cfg.synonym_sep).embeddings.float()
    else:
        bg = torch.zeros(0, clip.embed_dim)
    graph = DiCLIPCamGraph(clip, cfg.size, cfg.pos_interp, cfg.surgery_layers, cfg.feature_norm, bg).eval()
    return ExportGraphs(image_model=graph, background={"kind": "threshold", "value": 0.5},
                        metadata={"variant": "cam", "background_words": words,
                                  "equivalent_config": {"vce": False, "refine": [], "cam_source": "patch"}},
                        **common)
