"""ModuSeg (``weakseg.create("moduseg")``): class-agnostic mask proposals labelled by cosine KNN
retrieval in an offline feature bank built from eroded pseudo masks (specs/moduseg.md; the reference
code's semantics and defaults).

Offline, the bank (:meth:`ModuSeg.build_bank`, ``weakseg bank build``), per training image:

1. A pseudo label map: a PNG from a directory (values = class ids, 255 = ignore), or the output of any
   weakseg method run with the image-level labels: its scores are restricted to the image's classes
   (the background always allowed; "logit filtering") and arg-maxed; with ``pseudo_majority`` every
   proposal region then takes the majority class of its pixels (the reference's "map correction").
2. Semantic Boundary Purification (``sbp``): ``weakseg.ops.erode_labels`` with a 3x3 square x 20
   iterations (one 41x41 window; image borders erode nothing); a pixel keeps its class iff its whole
   window agrees.
3. One region per (image, class) present after erosion (background included), all components merged;
   regions under ``min_area`` (300) pixels are dropped.
4. Soft-Masked Feature Aggregation: ONE backbone forward per image at native resolution (padded
   bottom/right to the patch multiple, never resized); each region's mask, zero-padded the same way,
   weights the patch tokens by its covered fraction of each patch (``weakseg.ops.masked_area_pool``),
   the weighted mean is L2-normalised. ``pooling="hard"`` (ablation) uses binary weights: the mask
   sampled at each patch's centre pixel (nearest).
5. After all images: per-class outlier filtering (``outlier_filter``): for every foreground class the
   ``fg_drop_ratio`` (25 %) of its vectors farthest (Euclidean) from the plain mean of the class's
   unit vectors are dropped; the background drops ``bg_drop_ratio`` (0).

The bank is one safetensors file (:class:`FeatureBank`): ``vectors`` (N, D) float32 unit rows,
``labels`` (N,) int64, ``sample_index`` (N,) int64 into the JSON list of sample ids; metadata:
format name and version, backbone id, dim, class names, the build settings and the filter report.
Rows are ordered by (image index, class), so the bank does not depend on how the build was sharded or
interrupted. Building is resumable: finished images are persisted in ``<out>.parts/`` (atomic
chunk files of ``flush_every`` images, flushed on interruption too) and skipped by a rerun; under
``torchrun`` (RANK / WORLD_SIZE) rank r takes images i % world == r and rank 0 merges exactly.

Online (:meth:`ModuSeg.segment`), per image: proposals from any registered proposer (SAM / SAM2,
precomputed masks from disk, classical superpixels), kept if score >= ``score_thresh`` and area >=
``min_area``; the same SMFA encoding over one backbone forward; ``weakseg.ops.knn_vote`` with K = 25
(cosine; winner = most votes, then the larger summed similarity, then the smaller class id;
confidence = mean similarity of the winning voters) or FAISS (``search="faiss"``: ``IndexFlatIP``,
``IndexIVFFlat`` above ``faiss_ivf_threshold`` bank rows, nlist = min(sqrt N, 1024), nprobe =
min(32, nlist)); optional per-class NMS (IoU 0.4); proposals painted in ascending confidence so the
most confident wins; proposals voted background and unassigned pixels become background.

Differences from the reference code, each deliberate:
- vote ties in (count, summed similarity) go to the smaller class id (the ``knn_vote`` op's contract);
  the reference takes the label seen first in rank order. Exact float ties only.
- the backbone is DINOv2 / CLIP dense features (C-RADIOv4 is not available here) and the proposer any
  weakseg proposer (EntitySeg's Mask2Former is not); EntitySeg's score threshold 0.6 applies to the
  calibrated proposers (sam, sam2, disk); the superpixel proposer's scores are area fractions, so by
  default it is not thresholded.
- FAISS IVF is trained on the bank in its fixed (image, class) order, so results are reproducible.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from weakseg.core import (BACKBONES, IGNORE_INDEX, METHODS, PROPOSERS, MethodConfig, ModelSpec, SegmentationOutput,
                          check_segment_inputs, read_safetensors)
from weakseg.io import hash_file, save_safetensors, write_json
from weakseg.methods.common import StageTimer, has_background

__all__ = ["ModuSeg", "ModuSegConfig", "FeatureBank", "BankError", "BANK_FORMAT", "BANK_FORMAT_VERSION",
           "build_bank", "load_backbone", "load_proposer", "encode_regions", "purify_regions", "exact_topk",
           "pseudo_labels_from_scores", "majority_in_regions", "outlier_filter", "vote_from_neighbors",
           "FaissSearch", "nms_per_class", "PseudoMaskDir"]

BANK_FORMAT = "weakseg-moduseg-bank"
BANK_FORMAT_VERSION = 1
_PART_FORMAT = "weakseg-moduseg-bank-part"
_BANK_KEYS = ("vectors", "labels", "sample_index")
_BANK_META = ("format", "format_version", "backbone", "dim", "class_names", "samples")
SEARCHES = ("auto", "op", "gemm", "faiss")
POOLINGS = ("soft", "hard")
UNASSIGNED = ("background", "ignore")
# EntitySeg's thresholds (inference 0.6, inside CorrCLIP 0.5) for proposers whose scores are confidences
_CALIBRATED = ("sam", "sam2", "disk")
# the families whose features are not dense patch tokens (the other registered backbones are dense extractors)
_NOT_DENSE = ("clip", "stable-diffusion")


class BankError(ValueError):
    """A feature bank file that is missing, corrupt, or does not fit the segmenter."""


# ================================================================================================ config
@dataclass
class ModuSegConfig(MethodConfig):
    """Every default is the reference code's (specs/moduseg.md §4) unless noted.

    bank: path of the feature bank (safetensors) used by ``segment``.
    backbone: dense feature extractor, ``"dinov2"`` or ``"clip-dense"``. backbone_model: hub name or local
    directory (None: facebook/dinov2-base / ViT-B-16), ``"tiny"`` (random tiny weights, tests) or ``"toy"``
    (clip-dense over the toy-world CLIP). backbone_layer / backbone_layernorm / backbone_pad: DINOv2 token
    options (the last block's raw tokens without the final LayerNorm, as the reference takes from C-RADIO;
    zero padding). clip_pretrained / clip_surgery_layers: the CLIP weights tag and DiCLIP's surgery path.
    backbone_id: overrides the id written into / checked against the bank (for injected backbones).
    cache_dir: hub download folder.

    proposer: ``"sam"``, ``"sam2"``, ``"disk"`` or ``"superpixel"``; proposer_model: hub name / local dir
    (sam, sam2; None = the proposer's default; "tiny" = random tiny weights), or the mask directory (disk);
    proposer_options: keyword options of the proposer's constructor. score_thresh: proposals scoring
    below are dropped (None: 0.6 for sam / sam2 / disk, none for superpixel, whose scores are area
    fractions). min_area: the pixel-area floor of bank regions and proposals (300).

    k: neighbours that vote (25). search: ``"op"`` (weakseg.ops.knn_vote, which never holds the queries x bank
    similarities on the GPU), ``"gemm"`` (exact: one library GEMM for every similarity, ``torch.topk``, the
    same vote; on the CPU about 3x faster than the op's kernel at 40 queries x 20k rows), ``"auto"`` (the
    default: "op" on a GPU, "gemm" on the CPU; op and gemm give the same votes) or ``"faiss"``. faiss_ivf_threshold:
    banks with more rows use IndexIVFFlat (1e5); faiss_nlist_max / faiss_nprobe: 1024 / 32.
    nms / nms_iou: per-class NMS (on, 0.4; a no-op for disjoint proposals except the area floor).
    unassigned: label of pixels no proposal claims: "background" (class 0; the reference, also for
    datasets without a background class, where class 0 is a real class) or "ignore" (255).
    use_image_labels: restrict the vote to bank rows of the image's classes (+ background) when
    image-level labels are given (off: the reference ignores them at inference). check_backbone: refuse
    a bank built with another backbone id.

    Build: sbp (on) with erosion_kernel x erosion_iterations (3 x 20); pooling "soft" (SMFA) or "hard"
    (binary patch weights, ablation; used at build and inference); background_in_bank (on);
    outlier_filter (on) with fg_drop_ratio / bg_drop_ratio (0.25 / 0.0); pseudo_majority: per-proposal
    majority of the pseudo labels (needs a proposer), proposals scoring >= pseudo_score_thresh (None:
    0.5 for calibrated proposers); flush_every: images per persisted partial-result chunk.
    """

    bank: str | None = None
    backbone: str = "dinov2"
    backbone_model: str | None = None
    backbone_layer: int = -1
    backbone_layernorm: bool = False
    backbone_pad: str = "zero"
    clip_pretrained: str | None = "openai"
    clip_surgery_layers: int = 0
    backbone_id: str | None = None
    cache_dir: str | None = None
    proposer: str = "sam"
    proposer_model: str | None = None
    proposer_options: dict = field(default_factory=dict)
    score_thresh: float | None = None
    min_area: int = 300
    k: int = 25
    search: str = "auto"
    faiss_ivf_threshold: int = 100_000
    faiss_nlist_max: int = 1024
    faiss_nprobe: int = 32
    nms: bool = True
    nms_iou: float = 0.4
    unassigned: str = "background"
    use_image_labels: bool = False
    check_backbone: bool = True
    sbp: bool = True
    erosion_kernel: int = 3
    erosion_iterations: int = 20
    pooling: str = "soft"
    background_in_bank: bool = True
    outlier_filter: bool = True
    fg_drop_ratio: float = 0.25
    bg_drop_ratio: float = 0.0
    pseudo_majority: bool = False
    pseudo_score_thresh: float | None = None
    flush_every: int = 16

    def __post_init__(self) -> None:
        def bad(name: str, want: str):
            raise ValueError(f"ModuSegConfig.{name}: expected {want}, got {getattr(self, name)!r}")

        dense = [n for n in BACKBONES.names() if n not in _NOT_DENSE]
        if self.backbone not in dense:
            bad("backbone", "a registered dense-feature backbone: " + ", ".join(dense))
        if self.proposer not in PROPOSERS:
            bad("proposer", "a registered proposer: " + ", ".join(PROPOSERS.names()))
        if self.search not in SEARCHES:
            bad("search", "one of " + ", ".join(SEARCHES))
        if self.pooling not in POOLINGS:
            bad("pooling", "one of " + ", ".join(POOLINGS))
        if self.unassigned not in UNASSIGNED:
            bad("unassigned", "one of " + ", ".join(UNASSIGNED))
        if self.backbone_pad not in ("zero", "mean"):
            bad("backbone_pad", "'zero' or 'mean'")
        if not isinstance(self.proposer_options, dict):
            bad("proposer_options", "a dict of proposer constructor options")
        for name in ("k", "flush_every", "erosion_kernel", "faiss_nlist_max", "faiss_nprobe"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                bad(name, "an int >= 1")
        if self.erosion_kernel % 2 == 0:
            bad("erosion_kernel", "an odd int")
        for name in ("min_area", "erosion_iterations", "faiss_ivf_threshold", "clip_surgery_layers"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                bad(name, "an int >= 0")
        for name in ("fg_drop_ratio", "bg_drop_ratio", "nms_iou"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not 0.0 <= float(v) <= 1.0:
                bad(name, "a number in [0, 1]")
        for name in ("score_thresh", "pseudo_score_thresh"):
            v = getattr(self, name)
            if v is not None and not isinstance(v, (int, float)):
                bad(name, "a number or None")

    def inference_score_thresh(self) -> float | None:
        if self.score_thresh is not None:
            return float(self.score_thresh)
        return 0.6 if self.proposer in _CALIBRATED else None

    def pseudo_thresh(self) -> float | None:
        if self.pseudo_score_thresh is not None:
            return float(self.pseudo_score_thresh)
        return 0.5 if self.proposer in _CALIBRATED else None

    def build_settings(self) -> dict[str, Any]:
        """The settings that shape the per-image bank entries (recorded in the bank and the parts)."""
        return {"sbp": bool(self.sbp), "erosion_kernel": self.erosion_kernel,
                "erosion_iterations": self.erosion_iterations, "min_area": self.min_area, "pooling": self.pooling,
                "background_in_bank": bool(self.background_in_bank), "pseudo_majority": bool(self.pseudo_majority),
                "pseudo_proposer": self.proposer if self.pseudo_majority else None,
                "pseudo_score_thresh": self.pseudo_thresh() if self.pseudo_majority else None}

    def filter_settings(self) -> dict[str, Any]:
        return {"outlier_filter": bool(self.outlier_filter), "fg_drop_ratio": float(self.fg_drop_ratio),
                "bg_drop_ratio": float(self.bg_drop_ratio)}




# ================================================================================================ backbones
def _file_digest(path: Path, n: int = 12) -> str:
    return hash_file(hashlib.sha256(), path).hexdigest()[:n]


def load_backbone(config: ModuSegConfig):
    """(dense extractor, backbone id) for ``config``. The id names the model and every option that
    changes the features, so a bank built with other features is refused at load."""
    name = config.backbone
    spec = ModelSpec.parse(config.backbone_model or BACKBONES.get(name).DEFAULT_SPEC, "ModuSegConfig.backbone_model")
    if name == "dinov2":
        opts = dict(layer=config.backbone_layer, layernorm=config.backbone_layernorm, pad=config.backbone_pad)
        ident_opts = f"layer={config.backbone_layer};layernorm={int(config.backbone_layernorm)};pad={config.backbone_pad}"
    elif name == "clip-dense":
        opts = dict(surgery_layers=config.clip_surgery_layers, pretrained=config.clip_pretrained)
        ident_opts = (f"surgery={config.clip_surgery_layers}" if spec.kind not in ("hub", "path") else
                      f"pretrained={config.clip_pretrained};surgery={config.clip_surgery_layers}")
    else:  # another registered dense backbone: its spec alone
        opts, ident_opts = {}, ""
    ext = BACKBONES.build(name, spec, cache_dir=config.cache_dir, device=config.device, **opts)
    model = spec.raw
    if spec.kind not in ("tiny", "hub", "path", "random"):  # a model source (toy): name its weights' content
        weights = sorted(spec.source_path(name).glob("*.safetensors"))
        model += "@" + ",".join(_file_digest(w) for w in weights)
    ident = f"{name}:{model}" + (f";{ident_opts}" if ident_opts else "")
    ext.backbone_id = ident  # a segmenter handed this extractor (backbone=...) keeps the id
    return ext, ident


def load_proposer(config: ModuSegConfig):
    """The mask proposer named by ``config.proposer`` (``proposer_options`` go to its constructor)."""
    try:
        return _load_proposer(config)
    except TypeError as e:
        if "argument" not in str(e):
            raise
        raise TypeError(f"ModuSegConfig.proposer_options: {dict(config.proposer_options)} do not fit proposer "
                        f"{config.proposer!r} ({e})") from None


def _load_proposer(config: ModuSegConfig):
    if config.proposer == "disk" and not config.proposer_model:
        raise ValueError("ModuSegConfig.proposer_model: proposer='disk' needs the directory of precomputed masks")
    return PROPOSERS.build(config.proposer, config.proposer_model or None, cache_dir=config.cache_dir,
                           device=config.device, **dict(config.proposer_options))


# ================================================================================================ pieces
def encode_regions(features, masks: torch.Tensor, pooling: str = "soft") -> tuple[torch.Tensor, torch.Tensor]:
    """SMFA of M regions of one image: ``features`` a :class:`~weakseg.backbones.PatchFeatures` (B = 1),
    ``masks`` (M, H, W) bool at the image's resolution -> (vectors (M, D) float32 L2-normalised,
    weights (M,) = the summed patch weights; a region with weight < 1e-6 has no usable vector).

    soft: each mask is zero-padded like the image and every patch weighs its covered fraction
    (``masked_area_pool``); hard: binary weights, the padded mask at each patch's centre pixel."""
    from weakseg.ops import masked_area_pool

    if pooling not in POOLINGS:
        raise ValueError(f"pooling: expected one of {', '.join(POOLINGS)}, got {pooling!r}")
    tokens = features.tokens
    if tokens.shape[0] != 1:
        raise ValueError(f"features: expected the tokens of one image (B = 1), got B = {tokens.shape[0]}")
    if masks.dim() != 3 or tuple(masks.shape[-2:]) != tuple(features.image_size):
        raise ValueError(f"masks: expected (M, H, W) at the image size {tuple(features.image_size)}, "
                         f"got {tuple(masks.shape)}")
    M = masks.shape[0]
    D = tokens.shape[1]
    if M == 0:
        return tokens.new_zeros(0, D, dtype=torch.float32), tokens.new_zeros(0, dtype=torch.float32)
    top, left, bottom, right = features.padding
    m = masks.to(tokens.device, torch.bool)
    if top or left or bottom or right:
        m = F.pad(m, (left, right, top, bottom), value=False)
    if pooling == "hard":
        p = features.patch_size
        h, w = features.grid_size
        m = m[:, p // 2::p, p // 2::p][:, :h, :w]
    pooled, area = masked_area_pool(tokens.float(), m[None])
    vecs = F.normalize(pooled[0].float(), dim=1)
    return vecs, area[0].float()


def purify_regions(label_map: torch.Tensor, num_classes: int, *, sbp: bool = True, kernel: int = 3,
                   iterations: int = 20, min_area: int = 300, skip: Sequence[int] = (),
                   ignore_index: int = IGNORE_INDEX) -> tuple[list[int], torch.Tensor]:
    """Semantic Boundary Purification and region extraction of one pseudo label map (H, W) int.

    With ``sbp`` each present class's mask is eroded as the reference does (``cv2.erode``, a kernel x
    kernel square, ``iterations`` times; pixels outside the image count as foreground, so borders never
    erode: the same result as ``weakseg.ops.erode_labels`` with kernel x iterations); then one region per
    class present (all its pixels, components merged), classes in ``skip`` left out, regions under
    ``min_area`` pixels dropped. Only the classes present in the map are eroded (the reference erodes
    every class of the dataset). Returns (classes ascending, masks (R, H, W) bool)."""
    import cv2

    if label_map.dim() != 2:
        raise ValueError(f"label_map: expected an (H, W) class-id map, got shape {tuple(label_map.shape)}")
    lab = label_map.to(torch.int64).cpu()
    ig = num_classes + 1  # the ignore id while eroding (num_classes itself stays an invalid id)
    lab = torch.where(lab == ignore_index, ig, lab)
    lo, hi = (int(v) for v in torch.aminmax(lab)) if lab.numel() else (0, 0)
    hist = torch.bincount(lab.flatten(), minlength=ig + 1) if lo >= 0 and hi <= ig else None
    if hist is None or int(hist[num_classes]) > 0:
        bad = (lab < 0) | (lab == num_classes) | (lab > ig)
        vals = torch.unique(lab[bad])[:8].tolist()
        raise ValueError(f"label_map: class ids must lie in [0, {num_classes}) or be {ignore_index} (ignore), "
                         f"found {vals}")
    skip = set(int(s) for s in skip)
    present = [c for c in range(num_classes) if int(hist[c]) > 0 and c not in skip]
    # uint8 for cv2 when the ids fit, else int32 compares (the masks are uint8 either way)
    arr = lab.numpy().astype(np.uint8 if ig < 256 else np.int32)
    square = np.ones((kernel, kernel), np.uint8)
    classes, masks = [], []
    for c in present:
        m = (arr == c).astype(np.uint8)
        if sbp and iterations > 0:
            m = cv2.erode(m, square, iterations=iterations)
        if cv2.countNonZero(m) >= max(min_area, 1):
            classes.append(c)
            masks.append(torch.from_numpy(m))
    if not classes:
        return [], torch.zeros(0, *lab.shape, dtype=torch.bool, device=label_map.device)
    return classes, torch.stack(masks).bool().to(label_map.device)


def pseudo_labels_from_scores(scores: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Logit filtering: per-class scores (C, H, W) with the classes not in ``allowed`` (C,) bool set to
    -inf, then argmax (first maximum on ties) -> (H, W) int64."""
    if scores.dim() != 3 or allowed.shape != (scores.shape[0],):
        raise ValueError(f"pseudo_labels_from_scores: expected scores (C, H, W) and allowed (C,), got "
                         f"{tuple(scores.shape)} and {tuple(allowed.shape)}")
    if not bool(allowed.any()):
        raise ValueError("pseudo_labels_from_scores: no class is allowed")
    s = scores.float().masked_fill(~allowed.to(scores.device).view(-1, 1, 1), float("-inf"))
    return s.nan_to_num(nan=float("-inf")).argmax(0)


def majority_in_regions(label_map: torch.Tensor, masks: torch.Tensor, num_classes: int,
                        ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Every region of ``masks`` (M, H, W) bool takes the most frequent class of its pixels (ties: the
    smaller class id; ignored pixels do not vote); pixels outside every region keep their label."""
    out = label_map.clone()
    for m in masks:
        vals = label_map[m]
        vals = vals[vals != ignore_index]
        if vals.numel():
            out[m] = int(torch.bincount(vals, minlength=num_classes).argmax())
    return out


class PseudoMaskDir:
    """Pseudo label maps on disk: ``root/<sample name>.png`` (or ``root/<name's last part>.png``), a
    single-channel PNG of class ids (palette or grey; 255 = ignore) at the image's size."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise FileNotFoundError(f"--pseudo-masks: directory {self.root} does not exist (expected a folder of "
                                    f"<sample name>.png class-id maps)")

    def path_for(self, name: str) -> Path:
        tried = [self.root / f"{name}.png", self.root / f"{Path(name).name}.png"]
        for p in tried:
            if p.is_file():
                return p
        raise FileNotFoundError(f"--pseudo-masks: no pseudo mask for sample {name!r}; tried "
                                f"{', '.join(str(p) for p in dict.fromkeys(tried))}")

    def __call__(self, name: str, size: tuple[int, int]) -> torch.Tensor:
        from weakseg.data.datasets import read_id_png

        path = self.path_for(name)
        arr = read_id_png(path)
        if tuple(arr.shape) != tuple(size):
            raise ValueError(f"--pseudo-masks: {path} is {arr.shape[0]}x{arr.shape[1]}, the image of sample {name!r} "
                             f"is {size[0]}x{size[1]}")
        return torch.from_numpy(arr)


def outlier_filter(vectors: torch.Tensor, labels: torch.Tensor, fg_drop_ratio: float = 0.25,
                   bg_drop_ratio: float = 0.0, background: int | None = 0) -> tuple[torch.Tensor, dict]:
    """Per-class prototype purification: for each class, the centroid is the plain mean of its unit
    vectors (not re-normalised); the floor(n * ratio) vectors farthest from it (Euclidean; equal
    distances drop the later row first) are dropped. ``background`` (class id or None) uses
    ``bg_drop_ratio``, every other class ``fg_drop_ratio``. Returns (keep (N,) bool, {class: [kept,
    dropped]})."""
    keep = torch.ones(labels.shape[0], dtype=torch.bool, device=labels.device)
    report: dict[int, list[int]] = {}
    for c in torch.unique(labels).tolist():
        rows = torch.nonzero(labels == c).flatten()
        ratio = bg_drop_ratio if background is not None and c == background else fg_drop_ratio
        n_drop = int(math.floor(rows.numel() * float(ratio) + 1e-9))
        if n_drop:
            v = vectors[rows].double()
            dist = (v - v.mean(0, keepdim=True)).norm(dim=1)
            # descending distance; among equal distances the later row goes first
            order = torch.sort(dist.flip(0), descending=True, stable=True).indices
            drop = rows.flip(0)[order[:n_drop]]
            keep[drop] = False
        report[int(c)] = [int(rows.numel() - n_drop), n_drop]
    return keep, report


# ================================================================================================ bank
@dataclass
class FeatureBank:
    """The offline bank: ``vectors`` (N, D) float32 unit rows, ``labels`` (N,) int64 class ids into
    ``class_names``, ``sample_index`` (N,) int64 into ``samples`` (the id of the image each row came from),
    ``backbone`` (the feature extractor's id), ``build`` (the settings it was built with) and ``report``
    (the outlier filter's per-class counts)."""

    vectors: torch.Tensor
    labels: torch.Tensor
    sample_index: torch.Tensor
    samples: list[str]
    class_names: list[str]
    backbone: str
    build: dict = field(default_factory=dict)
    report: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        v, l, s = self.vectors, self.labels, self.sample_index
        if v.dim() != 2 or v.dtype != torch.float32:
            raise BankError(f"FeatureBank.vectors: expected (N, D) float32, got {tuple(v.shape)} {v.dtype}")
        if l.shape != (v.shape[0],) or l.dtype != torch.int64:
            raise BankError(f"FeatureBank.labels: expected ({v.shape[0]},) int64, got {tuple(l.shape)} {l.dtype}")
        if s.shape != (v.shape[0],) or s.dtype != torch.int64:
            raise BankError(f"FeatureBank.sample_index: expected ({v.shape[0]},) int64, got {tuple(s.shape)} {s.dtype}")
        if l.numel() and (int(l.min()) < 0 or int(l.max()) >= len(self.class_names)):
            raise BankError(f"FeatureBank.labels: expected class ids in [0, {len(self.class_names)}), found "
                            f"[{int(l.min())}, {int(l.max())}]")
        if s.numel() and (int(s.min()) < 0 or int(s.max()) >= len(self.samples)):
            raise BankError(f"FeatureBank.sample_index: expected indices into the {len(self.samples)} sample ids")

    def __len__(self) -> int:
        return self.vectors.shape[0]

    @property
    def dim(self) -> int:
        return self.vectors.shape[1]

    @property
    def sample_ids(self) -> list[str]:
        """The sample id of every row."""
        return [self.samples[i] for i in self.sample_index.tolist()]

    def counts(self) -> dict[str, int]:
        c = torch.bincount(self.labels, minlength=len(self.class_names))
        return {n: int(c[i]) for i, n in enumerate(self.class_names)}

    def metadata(self) -> dict[str, str]:
        return {"format": BANK_FORMAT, "format_version": str(BANK_FORMAT_VERSION), "backbone": self.backbone,
                "dim": str(self.dim), "class_names": json.dumps(self.class_names), "samples": json.dumps(self.samples),
                "build": json.dumps(self.build, sort_keys=True), "report": json.dumps(self.report, sort_keys=True)}

    def save(self, path: str | os.PathLike) -> Path:
        """Write the bank atomically (a temporary file in the same folder, then a rename)."""
        p = Path(path)
        save_safetensors({"vectors": self.vectors.float(), "labels": self.labels, "sample_index": self.sample_index},
                         p, self.metadata())
        return p

    @classmethod
    def load(cls, path: str | os.PathLike, *, backbone: str | None = None, dim: int | None = None) -> "FeatureBank":
        """Read and validate a bank; ``backbone`` / ``dim``: what the caller's feature extractor is, checked
        against the file. Every problem raises :class:`BankError` naming the file and what was expected."""
        p = Path(path)
        tensors, meta = read_safetensors(p, "feature bank", "build one with `weakseg bank build`", BankError)
        fmt = meta.get("format")
        if fmt != BANK_FORMAT:
            raise BankError(f"feature bank {p}: metadata 'format' is {fmt!r}; expected {BANK_FORMAT!r} (a file "
                            f"written by `weakseg bank build`)")
        version = meta.get("format_version")
        if version != str(BANK_FORMAT_VERSION):
            raise BankError(f"feature bank {p}: format version {version!r}; this weakseg reads version "
                            f"{BANK_FORMAT_VERSION} (rebuild the bank with `weakseg bank build`)")
        missing = [k for k in _BANK_KEYS if k not in tensors] + [f"metadata '{k}'" for k in _BANK_META if k not in meta]
        if missing:
            raise BankError(f"feature bank {p}: missing {', '.join(missing)}; expected tensors "
                            f"{', '.join(_BANK_KEYS)} and metadata {', '.join(_BANK_META)}")
        try:
            class_names = json.loads(meta["class_names"])
            samples = json.loads(meta["samples"])
            build = json.loads(meta.get("build", "{}"))
            report = json.loads(meta.get("report", "{}"))
            stored_dim = int(meta["dim"])
        except (ValueError, TypeError) as e:
            raise BankError(f"feature bank {p}: unreadable metadata ({e})") from None
        if not isinstance(class_names, list) or not isinstance(samples, list):
            raise BankError(f"feature bank {p}: metadata 'class_names' and 'samples' must be JSON lists")
        vec = tensors["vectors"]
        if vec.dim() != 2 or vec.dtype != torch.float32:
            raise BankError(f"feature bank {p}: 'vectors' is {tuple(vec.shape)} {vec.dtype}; expected (N, D) float32")
        if vec.shape[1] != stored_dim:
            raise BankError(f"feature bank {p}: 'vectors' has dimension {vec.shape[1]} but the metadata says {stored_dim}")
        if not bool(torch.isfinite(vec).all()):
            raise BankError(f"feature bank {p}: 'vectors' holds NaN or Inf values")
        if backbone is not None and meta["backbone"] != backbone:
            raise BankError(f"feature bank {p} was built with backbone {meta['backbone']!r}; this segmenter's backbone "
                            f"is {backbone!r} (rebuild the bank with it, or set check_backbone=false)")
        if dim is not None and vec.shape[1] != dim:
            raise BankError(f"feature bank {p} holds {vec.shape[1]}-d vectors; the backbone gives {dim}-d features "
                            f"(expected dimension {dim})")
        try:
            return cls(vec, tensors["labels"], tensors["sample_index"], [str(s) for s in samples],
                       [str(c) for c in class_names], meta["backbone"], build, report)
        except BankError as e:
            raise BankError(f"feature bank {p}: {e}") from None


# ================================================================================================ search
def vote_from_neighbors(sims: torch.Tensor, idx: torch.Tensor, bank_labels: torch.Tensor, num_classes: int):
    """The ``knn_vote`` rule on given neighbours: sims / idx (Q, k) (idx -1 = no neighbour) -> (labels,
    confidence, votes) exactly as the op decides (most votes, then the larger similarity sum, then the
    smaller class id; confidence = mean similarity of the winner's voters; label -1 without voters)."""
    Q = sims.shape[0]
    valid = idx >= 0
    lab = torch.where(valid, bank_labels[idx.clamp_min(0)], torch.full_like(idx, num_classes))
    votes = torch.zeros(Q, num_classes + 1, dtype=torch.int64).scatter_add_(1, lab, valid.long())[:, :num_classes]
    sums = torch.zeros(Q, num_classes + 1, dtype=torch.float32).scatter_add_(
        1, lab, torch.where(valid, sims.float(), torch.zeros_like(sims, dtype=torch.float32)))[:, :num_classes]
    best = votes.max(dim=1, keepdim=True).values
    masked = torch.where(votes == best, sums, torch.full_like(sums, float("-inf")))
    labels = masked.argmax(dim=1)
    win = votes.gather(1, labels[:, None]).squeeze(1)
    conf = sums.gather(1, labels[:, None]).squeeze(1) / win.clamp_min(1)
    none = ~valid.any(1)
    labels = torch.where(none, torch.full_like(labels, -1), labels)
    conf = torch.where(none, torch.zeros_like(conf), conf)
    return labels, conf, votes


def exact_topk(queries: torch.Tensor, bank: torch.Tensor, k: int, bank_normalized: bool = False
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """The k most cosine-similar bank rows of each query (both sides L2-normalised here, the bank only
    unless ``bank_normalized`` says its rows are unit already): one GEMM for
    (Q, N) similarities, ``torch.topk``; ties at the k-th similarity go to the smaller row index (the
    rows with such a tie are re-ordered by a stable sort). k is clipped to N. -> (sims, idx) (Q, k)."""
    q = F.normalize(queries.float(), dim=1)
    b = bank.float() if bank_normalized else F.normalize(bank.float(), dim=1)
    k = min(int(k), b.shape[0])
    if k == 0 or q.shape[0] == 0:
        return q.new_zeros(q.shape[0], k), torch.zeros(q.shape[0], k, dtype=torch.int64, device=q.device)
    sims = q @ b.T
    vals, idx = sims.topk(k, dim=1)
    tie = (sims >= vals[:, -1:]).sum(1) > k
    if bool(tie.any()):
        v, i = torch.sort(sims[tie], dim=1, descending=True, stable=True)
        vals[tie], idx[tie] = v[:, :k], i[:, :k]
    return vals, idx


def _import_faiss():
    try:
        import faiss
    except ImportError:
        raise ImportError("ModuSegConfig.search='faiss' needs the faiss package (pip install faiss-cpu, or "
                          "faiss-gpu); search='auto', 'gemm' or 'op' needs nothing extra") from None
    return faiss


class FaissSearch:
    """Inner-product search over the (unit-row) bank with FAISS: ``IndexFlatIP`` (exact) up to
    ``ivf_threshold`` rows, else ``IndexIVFFlat`` with nlist = min(sqrt N, nlist_max) lists and
    nprobe = min(nprobe, nlist) (approximate). Always on the CPU (the op is the GPU path)."""

    def __init__(self, vectors: torch.Tensor, *, ivf_threshold: int = 100_000, nlist_max: int = 1024,
                 nprobe: int = 32, seed: int = 0):
        faiss = _import_faiss()
        x = np.ascontiguousarray(F.normalize(vectors.detach().float().cpu(), dim=1).numpy())
        self.n, self.d = x.shape
        self.kind = "flat"
        if self.n > ivf_threshold:
            self.kind = "ivf"
            self.nlist = max(1, min(int(math.sqrt(self.n)), nlist_max))
            self.nprobe = max(1, min(nprobe, self.nlist))
            quantizer = faiss.IndexFlatIP(self.d)
            index = faiss.IndexIVFFlat(quantizer, self.d, self.nlist, faiss.METRIC_INNER_PRODUCT)
            index.cp.seed = int(seed)
            index.train(x)
            index.add(x)
            index.nprobe = self.nprobe
            self._quantizer = quantizer  # keep alive
        else:
            index = faiss.IndexFlatIP(self.d)
            index.add(x)
        self.index = index

    def search(self, queries: torch.Tensor, k: int, rows: torch.Tensor | None = None):
        """(sims (Q, k'), idx (Q, k')) with k' = min(k, candidates); ``rows``: restrict to these bank rows."""
        faiss = _import_faiss()
        q = np.ascontiguousarray(F.normalize(queries.detach().float().cpu(), dim=1).numpy())
        n = self.n if rows is None else int(rows.numel())
        k = min(int(k), n)
        if q.shape[0] == 0 or k == 0:
            return torch.zeros(q.shape[0], k), torch.full((q.shape[0], k), -1, dtype=torch.int64)
        params = None
        if rows is not None:
            sel = faiss.IDSelectorBatch(np.ascontiguousarray(rows.cpu().numpy().astype(np.int64)))
            params = (faiss.SearchParametersIVF(sel=sel, nprobe=self.nprobe) if self.kind == "ivf"
                      else faiss.SearchParameters(sel=sel))
        D, I = self.index.search(q, k, params=params) if params is not None else self.index.search(q, k)
        return torch.from_numpy(D.copy()), torch.from_numpy(I.astype(np.int64))


# ================================================================================================ painting
def nms_per_class(masks: torch.Tensor, labels: torch.Tensor, conf: torch.Tensor, iou: float = 0.4,
                  min_area: int = 0, disjoint: bool | None = False) -> torch.Tensor:
    """Per-class NMS (the reference's): by descending confidence, a mask is dropped if its area is under
    ``min_area`` or its IoU with an already kept mask of the same class exceeds ``iou``. ``disjoint``:
    the masks are known to be pairwise disjoint (IoU 0), so only the area rule applies; None: find out
    (their union has as many pixels as their areas sum up to). Returns keep (M,)."""
    M = masks.shape[0]
    keep = torch.zeros(M, dtype=torch.bool)
    if M == 0:
        return keep
    flat = masks.flatten(1).to(torch.bool).cpu().numpy()  # numpy's bool counts are ~10x torch's on the CPU
    area = np.array([np.count_nonzero(r) for r in flat], dtype=np.int64)  # row by row: ~10x the axis=1 form
    if disjoint is None:
        disjoint = M < 2 or int(np.count_nonzero(flat.any(0))) == int(area.sum())
    order = torch.sort(conf.cpu(), descending=True, stable=True).indices.tolist()
    kept: dict[int, list[int]] = {}
    for j in order:
        if int(area[j]) < min_area:
            continue
        c = int(labels[j])
        ok = True
        if not disjoint:
            for i in kept.get(c, []):
                inter = int(np.count_nonzero(flat[i] & flat[j]))
                union = int(area[i]) + int(area[j]) - inter
                if union and inter / union > iou:
                    ok = False
                    break
        if ok:
            keep[j] = True
            kept.setdefault(c, []).append(j)
    return keep


# ================================================================================================ method
@METHODS.register("moduseg", config=ModuSegConfig)
class ModuSeg:
    """ModuSeg segmenter (module docstring). ``ModuSeg(config, backbone=None, proposer=None, bank=None)``:
    ``backbone`` (a dense extractor giving ``PatchFeatures``), ``proposer`` (``proposer(image) ->
    Proposals``) and ``bank`` (a :class:`FeatureBank`) replace what ``config`` names. Without a bank the
    segmenter can build one (:meth:`build_bank`) but not segment."""

    def __init__(self, config: ModuSegConfig | None = None, backbone=None, proposer=None,
                 bank: FeatureBank | None = None):
        self.config = config if config is not None else ModuSegConfig()
        if not isinstance(self.config, ModuSegConfig):
            raise TypeError(f"ModuSeg: expected a ModuSegConfig, got {type(self.config).__name__}")
        # seconds per stage: propose, backbone, encode, knn, paint; building: data, pseudo, sbp, backbone,
        # encode, write, merge
        self.timer = StageTimer()
        if backbone is None:
            self.backbone, ident = load_backbone(self.config)
        else:
            self.backbone = backbone
            ident = getattr(backbone, "backbone_id", None) or f"{type(backbone).__name__}:injected"
        self.backbone_id = self.config.backbone_id or ident
        self._proposer = proposer
        self.bank: FeatureBank | None = None
        self._faiss: FaissSearch | None = None
        if bank is not None:
            self.set_bank(bank)
        elif self.config.bank:
            self.load_bank(self.config.bank)

    # ------------------------------------------------------------------ parts
    @property
    def device(self) -> torch.device:
        return torch.device(self.config.device)

    @property
    def proposer(self):
        if self._proposer is None:
            self._proposer = load_proposer(self.config)
        return self._proposer

    @property
    def feature_dim(self) -> int | None:
        d = getattr(self.backbone, "dim", None)
        return int(d) if d is not None else None

    def load_bank(self, path: str | os.PathLike) -> FeatureBank:
        bank = FeatureBank.load(path, backbone=self.backbone_id if self.config.check_backbone else None,
                                dim=self.feature_dim)
        pooling = bank.build.get("pooling")
        if pooling is not None and pooling != self.config.pooling:
            warnings.warn(f"feature bank {path} was built with pooling={pooling!r}; inference uses "
                          f"pooling={self.config.pooling!r}", stacklevel=2)
        self.set_bank(bank)
        return bank

    def set_bank(self, bank: FeatureBank) -> None:
        if not isinstance(bank, FeatureBank):
            raise TypeError(f"bank: expected a FeatureBank, got {type(bank).__name__}")
        if self.config.check_backbone and bank.backbone != self.backbone_id:
            raise BankError(f"bank: built with backbone {bank.backbone!r}; this segmenter's backbone is "
                            f"{self.backbone_id!r}")
        if self.feature_dim is not None and bank.dim != self.feature_dim:
            raise BankError(f"bank: holds {bank.dim}-d vectors; the backbone gives {self.feature_dim}-d features")
        if len(bank) == 0:
            raise BankError("bank: the feature bank is empty (no region survived the build)")
        self.bank = bank
        self._bank_vectors = F.normalize(bank.vectors.float(), dim=1).to(self.device)
        self._bank_labels = bank.labels.to(self.device)
        self._faiss = None

    def features(self, image: torch.Tensor):
        """One backbone forward of one (3, H, W) uint8 image -> PatchFeatures (B = 1)."""
        return self.backbone([image.to(self.device)])

    # ------------------------------------------------------------------ retrieval
    def search(self, queries: torch.Tensor, rows: torch.Tensor | None = None):
        """KNN vote of unit ``queries`` (Q, D) against the bank (or its ``rows``) with the configured
        backend -> (labels, confidence, votes) in bank class ids."""
        if self.bank is None:
            raise RuntimeError("ModuSeg: no feature bank loaded (set bank=PATH or build one with `weakseg bank build`)")
        cfg = self.config
        nc = len(self.bank.class_names)
        mode = cfg.search
        if mode == "auto":
            mode = "op" if self._bank_vectors.device.type == "cuda" else "gemm"
        if mode == "gemm":
            bank, labels = self._bank_vectors, self._bank_labels
            if rows is not None:
                bank, labels = bank[rows.to(bank.device)], labels[rows.to(bank.device)]
            sims, idx = exact_topk(queries.to(bank.device, torch.float32), bank, cfg.k, bank_normalized=True)
            lab, conf, votes = vote_from_neighbors(sims, idx, labels, nc)
            return lab.cpu(), conf.cpu(), votes.cpu()
        if mode == "op":
            from weakseg.ops import knn_vote

            bank, labels = self._bank_vectors, self._bank_labels
            if rows is not None:
                bank, labels = bank[rows.to(bank.device)], labels[rows.to(bank.device)]
            lab, conf, votes = knn_vote(queries.to(bank.device, torch.float32), bank, labels, cfg.k, nc)
            return lab.cpu(), conf.cpu(), votes.cpu()
        if self._faiss is None:
            self._faiss = FaissSearch(self.bank.vectors, ivf_threshold=cfg.faiss_ivf_threshold,
                                      nlist_max=cfg.faiss_nlist_max, nprobe=cfg.faiss_nprobe, seed=cfg.seed)
        sims, idx = self._faiss.search(queries, cfg.k, rows)
        return vote_from_neighbors(sims, idx, self.bank.labels.cpu(), nc)

    # ------------------------------------------------------------------ inference
    def propose(self, image: torch.Tensor, key: str | None = None):
        """Proposals of one image from the configured proposer (``key``: the disk proposer's file key)."""
        if _accepts_key(self.proposer):  # the disk proposer reads masks by file key
            if key is None:
                raise ValueError("ModuSeg.segment: the proposer reads precomputed masks by key; pass keys=[...] "
                                 "(one per image) or proposals=[...]")
            return self.proposer(image, key=key)
        return self.proposer(image)

    def segment(self, images, class_names: Sequence[str], image_labels: torch.Tensor | None = None, *,
                proposals: Sequence | None = None, keys: Sequence[str] | None = None) -> SegmentationOutput:
        """images: RGB uint8 (B, 3, H, W) or a list of same-sized (3, H, W); class_names: the C classes
        (background first if any; bank classes are matched by name, bank classes not listed are treated as
        background); image_labels: optional (B, C) bool (used only with ``use_image_labels``); proposals:
        optional ready-made :class:`~weakseg.backbones.Proposals` per image; keys: per-image keys for the
        disk proposer. Returns scores (B, C, H, W), the vote share (votes / k) of each class for the
        proposal that claims the pixel (pixels no proposal claims: 1 on the background), and labels."""
        from weakseg.backbones.proposers import Proposals

        if self.bank is None:
            raise RuntimeError("ModuSeg: no feature bank loaded (set bank=PATH or build one with `weakseg bank build`)")
        inp = check_segment_inputs(images, class_names, image_labels)
        items, class_names = inp.images, inp.class_names
        for name, seq in (("proposals", proposals), ("keys", keys)):
            if seq is not None and len(seq) != len(items):
                raise ValueError(f"{name}: expected one entry per image ({len(items)}), got {len(seq)}")
        B, C = len(items), len(class_names)
        H, W = inp.size
        allowed, bg_out = inp.allowed, inp.background
        fill = self._unassigned_label()
        index = {n: i for i, n in enumerate(class_names)}
        bank_names = self.bank.class_names
        bank_bg = 0 if has_background(bank_names) else None
        # bank class -> output channel (-1: not requested, handled as background)
        to_out = torch.tensor([index.get(n, -1) for n in bank_names], dtype=torch.int64)
        if bank_bg is not None and bg_out:
            to_out[bank_bg] = 0
        scores = torch.zeros(B, C, H, W)
        labels = torch.full((B, H, W), fill, dtype=torch.int64)
        for b, image in enumerate(items):
            with self.timer("propose", self.device):
                props = proposals[b] if proposals is not None else self.propose(image, keys[b] if keys else None)
                if not isinstance(props, Proposals):
                    raise TypeError(f"proposals[{b}]: expected Proposals, got {type(props).__name__}")
                if props.image_size != (H, W):
                    raise ValueError(f"proposals[{b}]: masks are {props.image_size}, the image is {(H, W)}")
                masks, pscores = props.masks, props.scores
                keep = masks.flatten(1).sum(1) >= self.config.min_area
                thr = self.config.inference_score_thresh()
                if thr is not None:
                    keep &= pscores >= thr
                masks = masks[keep]
            if masks.shape[0] == 0:
                if bg_out:
                    scores[b, 0] = 1.0
                continue
            with self.timer("backbone", self.device):
                feats = self.features(image)
            with self.timer("encode", self.device):
                q, weight = encode_regions(feats, masks, self.config.pooling)
                ok = (weight >= 1e-6).cpu()
                masks, q = masks[ok.to(masks.device)], q[ok.to(q.device)]
            with self.timer("knn", self.device):
                rows = self._allowed_rows(allowed[b], to_out, bank_bg) if (
                    self.config.use_image_labels and image_labels is not None) else None
                lab, conf, votes = self.search(q, rows) if q.shape[0] else (
                    torch.zeros(0, dtype=torch.int64), torch.zeros(0), torch.zeros(0, len(bank_names), dtype=torch.int64))
            with self.timer("paint", self.device):
                self._paint(masks.cpu(), lab, conf, votes, to_out, bg_out, labels[b], scores[b])
        return SegmentationOutput(scores=scores, labels=labels, class_names=class_names)

    def _unassigned_label(self) -> int:
        return 0 if self.config.unassigned == "background" else IGNORE_INDEX

    def _allowed_rows(self, allowed: torch.Tensor, to_out: torch.Tensor, bank_bg: int | None) -> torch.Tensor:
        ok = torch.zeros(len(to_out), dtype=torch.bool)
        mapped = to_out >= 0
        ok[mapped] = allowed[to_out[mapped]]
        if bank_bg is not None:
            ok[bank_bg] = True
        return torch.nonzero(ok[self.bank.labels]).flatten()

    def _paint(self, masks, lab, conf, votes, to_out, bg_out: bool, label_map: torch.Tensor,
               score_map: torch.Tensor) -> None:
        """Paint one image's voted proposals: background-voted (and unrequested) ones first, then the
        others by ascending confidence, each over the earlier ones. Every pixel records the proposal that
        claims it last; the labels and the score channels are then gathered from that one index map (one
        gather, not a C x H x W write per proposal)."""
        C = score_map.shape[0]
        M = masks.shape[0]
        out = torch.where(lab >= 0, to_out[lab.clamp_min(0)], torch.full_like(lab, -1))
        is_fg = out >= 0
        if bg_out:
            is_fg &= out != 0
        if self.config.nms and M:
            keep = nms_per_class(masks, out, conf, self.config.nms_iou, self.config.min_area, disjoint=None)
        else:
            keep = torch.ones(M, dtype=torch.bool)
        # row 0: unclaimed pixels; row j + 1: proposal j
        share = torch.zeros(M + 1, C)
        if bg_out:
            share[0, 0] = 1.0
        mapped = to_out >= 0
        if bool(mapped.any()) and M:
            share[1:, to_out[mapped]] = votes[:, mapped].float() / votes.sum(1, keepdim=True).clamp_min(1)
        lab_of = torch.zeros(M + 1, dtype=torch.int64)  # the label each proposal paints (row 0 unused)
        lab_of[1:] = torch.where(is_fg, out, torch.where((out == 0) & bg_out, 0, self._unassigned_label()))
        keep_l, fg_l = keep.tolist(), is_fg.tolist()
        fg_order = [j for j in torch.sort(conf, stable=True).indices.tolist() if keep_l[j] and fg_l[j]]
        bg_first = [j for j in range(M) if keep_l[j] and not fg_l[j]]
        # numpy for the pixel work: its boolean-mask assignment and take are several times torch's on the CPU
        owner = np.zeros(tuple(label_map.shape), dtype=np.intp)
        m_np = masks.to(torch.bool).cpu().numpy()
        for j in bg_first + fg_order:
            owner[m_np[j]] = j + 1
        painted = torch.from_numpy(lab_of.numpy().take(owner))
        label_map.copy_(torch.where(torch.from_numpy(owner > 0), painted, label_map.cpu()))
        st = share.T.contiguous().numpy()  # (C, M + 1) -> (C, H·W) in one gather, straight into score_map
        if score_map.device.type == "cpu" and score_map.is_contiguous() and score_map.dtype == torch.float32:
            np.take(st, owner.reshape(-1), axis=1, out=score_map.numpy().reshape(C, -1))
        else:
            score_map.copy_(torch.from_numpy(st.take(owner.reshape(-1), axis=1)).view(score_map.shape))

    # ------------------------------------------------------------------ building
    def pseudo_labels(self, sample, class_names: Sequence[str], source) -> torch.Tensor:
        """The pseudo label map (H, W) int64 of one dataset ``sample``: from a :class:`PseudoMaskDir`, or
        from a segmenter run with the sample's image-level labels (logit filtering), then the
        per-proposal majority when ``pseudo_majority`` is on."""
        image = sample.image
        H, W = image.shape[-2:]
        C = len(class_names)
        if isinstance(source, PseudoMaskDir):
            lab = source(sample.name, (H, W))
        else:
            given = [c for c in (sample.image_labels or []) if 0 <= int(c) < C]
            labels = None
            if given:
                labels = torch.zeros(1, C, dtype=torch.bool)
                labels[0, given] = True
                if has_background(class_names):
                    labels[0, 0] = True
            out = source.segment([image], list(class_names), labels)
            if tuple(out.scores.shape[-2:]) != (H, W) or out.scores.shape[1] != C:
                raise ValueError(f"pseudo method: returned scores {tuple(out.scores.shape)} for a {H}x{W} image with "
                                 f"{C} classes")
            allowed = labels[0] if labels is not None else torch.ones(C, dtype=torch.bool)
            lab = pseudo_labels_from_scores(out.scores[0].cpu(), allowed)
        if self.config.pseudo_majority:
            props = self.proposer(image) if self.config.proposer != "disk" else self.proposer(image, key=sample.name)
            m = props.masks
            thr = self.config.pseudo_thresh()
            if thr is not None:
                m = m[props.scores >= thr]
            lab = majority_in_regions(lab.to(torch.int64), m.cpu(), C)
        return lab.to(torch.int64)

    def image_entries(self, image: torch.Tensor, label_map: torch.Tensor, class_names: Sequence[str]):
        """Bank rows of one image: (vectors (R, D), classes (R,)) after SBP, the area floor and SMFA."""
        cfg = self.config
        skip = (0,) if (not cfg.background_in_bank and has_background(class_names)) else ()
        with self.timer("sbp"):
            classes, masks = purify_regions(label_map.to(torch.int64), len(class_names), sbp=cfg.sbp,
                                            kernel=cfg.erosion_kernel, iterations=cfg.erosion_iterations,
                                            min_area=cfg.min_area, skip=skip)
        D = self.feature_dim or 0
        if not classes:
            return torch.zeros(0, D), torch.zeros(0, dtype=torch.int64)
        with self.timer("backbone", self.device):
            feats = self.features(image)
        with self.timer("encode", self.device):
            vecs, weight = encode_regions(feats, masks, cfg.pooling)
        vecs = vecs.cpu()
        ok = (weight.cpu() >= 1e-6) & torch.isfinite(vecs).all(1) & (vecs.norm(dim=1) >= 1e-6)
        return vecs[ok].contiguous(), torch.tensor(classes, dtype=torch.int64)[ok]

    def build_bank(self, dataset, out: str | os.PathLike, *, pseudo, class_names: Sequence[str] | None = None,
                   limit: int | None = None, progress: bool = True, resume: bool = True, rank: int | None = None,
                   world_size: int | None = None, dataset_name: str | None = None) -> FeatureBank | None:
        """Build the feature bank of ``dataset`` (items with ``image``, ``name``, ``image_labels``) into
        ``out`` (module docstring). ``pseudo``: a pseudo-mask directory (str / Path / PseudoMaskDir) or a
        segmenter (any object with ``segment``). ``resume``: reuse finished work in ``<out>.parts`` (and a
        finished bank with the same settings); False starts over. Sharded by ``rank`` / ``world_size``
        (default: the torchrun environment); the rank that merges returns the bank, the others None.
        The built bank becomes this segmenter's bank."""
        from tqdm.auto import tqdm

        from weakseg.distributed import dist_info

        cfg = self.config
        out = Path(out)
        names = [str(c) for c in (class_names if class_names is not None else dataset.class_names)]
        if not names:
            raise ValueError("build_bank: the dataset has no class names; pass class_names=")
        if limit is not None and limit < 0:
            raise ValueError(f"build_bank: limit must be >= 0, got {limit}")
        n = len(dataset) if limit is None else min(limit, len(dataset))
        if n == 0:
            raise ValueError("build_bank: the dataset is empty (no image to build a bank from)")
        if isinstance(pseudo, (str, os.PathLike)):
            pseudo = PseudoMaskDir(pseudo)
        if not isinstance(pseudo, PseudoMaskDir) and not hasattr(pseudo, "segment"):
            raise TypeError(f"pseudo: expected a pseudo-mask directory or a segmenter, got {type(pseudo).__name__}")
        r, w, use_dist = dist_info(rank, world_size, "bank build")
        manifest = {"format": _PART_FORMAT, "format_version": BANK_FORMAT_VERSION, "backbone": self.backbone_id,
                    "dim": self.feature_dim, "class_names": names, "source": _source_id(pseudo),
                    "settings": cfg.build_settings(),
                    "dataset": {"name": dataset_name or type(dataset).__name__,
                                "split": getattr(dataset, "split", None), "num_images": n}}
        expected_build = {**manifest, "filter": cfg.filter_settings()}
        expected_build.pop("format"), expected_build.pop("format_version")
        if resume and out.is_file():
            try:
                done_bank = FeatureBank.load(out)
            except (BankError, FileNotFoundError):
                done_bank = None
            if done_bank is not None and done_bank.build == json.loads(json.dumps(expected_build)):
                if r == 0:
                    self.set_bank(done_bank)
                return done_bank if r == 0 else None
        parts = Path(str(out) + ".parts")
        if not resume and r == 0 and parts.exists():
            shutil.rmtree(parts)
        if use_dist and w > 1:
            import torch.distributed as dist

            dist.barrier()
        parts.mkdir(parents=True, exist_ok=True)
        _check_manifest(parts, manifest)
        done = _done_images(parts)
        todo = [i for i in range(r, n, w) if i not in done]
        buf_vecs, buf_labs, buf_idx, buf_done, buf_names = [], [], [], [], {}

        def flush():
            if not buf_done:
                return
            full = [j for j, v in enumerate(buf_vecs) if v.shape[0]]
            D = buf_vecs[full[0]].shape[1] if full else (self.feature_dim or 0)
            vecs = torch.cat([buf_vecs[j] for j in full]) if full else torch.zeros(0, D)
            labs = torch.cat([buf_labs[j] for j in full]) if full else torch.zeros(0, dtype=torch.int64)
            idx = torch.cat([buf_idx[j] for j in full]) if full else torch.zeros(0, dtype=torch.int64)
            save_safetensors({"vectors": vecs.float(), "labels": labs, "image_index": idx},
                             parts / f"part_{min(buf_done):09d}_{max(buf_done):09d}.safetensors",
                             {"format": _PART_FORMAT, "done": json.dumps(buf_done), "names": json.dumps(buf_names)})
            buf_vecs.clear(), buf_labs.clear(), buf_idx.clear(), buf_done.clear(), buf_names.clear()

        try:
            for i in tqdm(todo, desc=f"bank {out.name}" + (f" [rank {r}/{w}]" if w > 1 else ""),
                          disable=not progress):
                with self.timer("data"):
                    sample = dataset[i]
                with self.timer("pseudo"):
                    lab = self.pseudo_labels(sample, names, pseudo)
                vecs, labs = self.image_entries(sample.image, lab, names)
                buf_vecs.append(vecs)
                buf_labs.append(labs)
                buf_idx.append(torch.full((labs.numel(),), i, dtype=torch.int64))
                buf_done.append(i)
                buf_names[str(i)] = str(sample.name)
                if len(buf_done) >= cfg.flush_every:
                    with self.timer("write"):
                        flush()
        finally:
            with self.timer("write"):
                flush()  # finished images survive an interruption
        if use_dist and w > 1:
            import torch.distributed as dist

            dist.barrier()
            if r != 0:
                return None
        if not use_dist and w > 1 and len(_done_images(parts)) < n:
            return None  # other shards still running: the last one to finish merges
        with self.timer("merge"):
            bank = _merge_parts(parts, n, names, self.backbone_id, expected_build, cfg,
                                class_has_bg=has_background(names))
            bank.save(out)
        if w == 1 or use_dist:
            shutil.rmtree(parts, ignore_errors=True)
        self.set_bank(bank)
        return bank

# ================================================================================================ helpers
def _accepts_key(proposer) -> bool:
    import inspect

    try:
        return "key" in inspect.signature(proposer.__call__).parameters
    except (TypeError, ValueError):
        return False


def _source_id(pseudo) -> str:
    if isinstance(pseudo, PseudoMaskDir):
        return f"dir:{pseudo.root.resolve()}"
    cfg = getattr(pseudo, "config", None)
    desc = json.dumps(dataclasses.asdict(cfg), sort_keys=True, default=str) if dataclasses.is_dataclass(cfg) else ""
    return f"method:{type(pseudo).__name__}:{desc}"


def _check_manifest(parts: Path, manifest: dict) -> None:
    path = parts / "manifest.json"
    want = json.loads(json.dumps(manifest))
    if path.is_file():
        try:
            have = json.loads(path.read_text())
        except ValueError:
            have = None
        if have != want:
            diff = sorted(k for k in set(want) | set(have or {}) if (have or {}).get(k) != want.get(k))
            raise ValueError(f"bank build: {parts} holds partial results of a different build (differs in "
                             f"{', '.join(diff) or 'an unreadable manifest'}); rerun with --restart (resume=False) "
                             f"to discard them, or restore the original settings")
        return
    write_json(path, want, sort_keys=True)


def _part_files(parts: Path) -> list[Path]:
    return sorted(parts.glob("part_*.safetensors"))


def _done_images(parts: Path) -> set[int]:
    done: set[int] = set()
    for p in _part_files(parts):
        from safetensors import safe_open

        try:
            with safe_open(str(p), framework="pt") as f:
                done.update(int(i) for i in json.loads((f.metadata() or {})["done"]))
        except Exception as e:  # a damaged part: its images are recomputed
            warnings.warn(f"bank build: ignoring unreadable partial result {p} ({e}); its images are recomputed")
    return done


def _merge_parts(parts: Path, n: int, names: list[str], backbone: str, build: dict, cfg: ModuSegConfig,
                 class_has_bg: bool) -> FeatureBank:
    vecs, labs, idxs, sample_names, seen = [], [], [], {}, set()
    for p in _part_files(parts):
        tensors, meta = read_safetensors(p, "partial bank result", error=BankError)
        done = [int(i) for i in json.loads(meta["done"])]
        if seen.intersection(done):  # the same image in two parts (two runs raced): keep the first
            keep = ~torch.isin(tensors["image_index"], torch.tensor(sorted(seen.intersection(done))))
            tensors = {k: v[keep] for k, v in tensors.items()}
        seen.update(done)
        if tensors["vectors"].shape[0]:
            vecs.append(tensors["vectors"])
            labs.append(tensors["labels"])
            idxs.append(tensors["image_index"])
        sample_names.update({int(k): v for k, v in json.loads(meta["names"]).items()})
    missing = sorted(set(range(n)) - seen)
    if missing:
        raise RuntimeError(f"bank build: {len(missing)} of {n} images have no result in {parts} (first {missing[:5]}); "
                           f"run the build again to finish them")
    vec = torch.cat(vecs).float() if vecs else torch.zeros(0, 0)
    lab = torch.cat(labs).long() if labs else torch.zeros(0, dtype=torch.int64)
    img = torch.cat(idxs).long() if idxs else torch.zeros(0, dtype=torch.int64)
    # a fixed row order, whatever the sharding or interruptions: by image, then class
    order = torch.from_numpy(np.lexsort((lab.numpy(), img.numpy())))
    vec, lab, img = vec[order], lab[order], img[order]
    if vec.shape[0] == 0:
        raise ValueError(f"bank build: no region survived ({n} images; min_area={cfg.min_area}, sbp={cfg.sbp} with "
                         f"{cfg.erosion_kernel}x{cfg.erosion_kernel} x {cfg.erosion_iterations}); lower min_area or "
                         f"erosion_iterations")
    report: dict = {"before": {names[c]: int(v) for c, v in enumerate(torch.bincount(lab, minlength=len(names)))}}
    if cfg.outlier_filter:
        keep, per_class = outlier_filter(vec, lab, cfg.fg_drop_ratio, cfg.bg_drop_ratio,
                                         background=0 if class_has_bg else None)
        vec, lab, img = vec[keep], lab[keep], img[keep]
        report["dropped"] = {names[c]: kd[1] for c, kd in per_class.items()}
    used = sorted(set(img.tolist()))
    remap = {old: new for new, old in enumerate(used)}
    sample_index = torch.tensor([remap[i] for i in img.tolist()], dtype=torch.int64)
    samples = [sample_names.get(i, str(i)) for i in used]
    return FeatureBank(F.normalize(vec, dim=1).contiguous(), lab.contiguous(), sample_index, samples, list(names),
                       backbone, json.loads(json.dumps(build)), report)


def build_bank(dataset, out: str | os.PathLike, *, pseudo, config: ModuSegConfig | None = None, backbone=None,
               proposer=None, **kwargs) -> FeatureBank | None:
    """Build a bank with a fresh :class:`ModuSeg` (``config`` or defaults); see :meth:`ModuSeg.build_bank`."""
    cfg = (config or ModuSegConfig()).replace(bank=None)
    return ModuSeg(cfg, backbone=backbone, proposer=proposer).build_bank(dataset, out, pseudo=pseudo, **kwargs)
