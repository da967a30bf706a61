"""ModuSeg's options: :class:`ModuSegConfig` (every default the reference code's, docs/specs/moduseg.md),
its validation and the settings it records in a bank (:meth:`ModuSegConfig.build_settings`,
:meth:`ModuSegConfig.filter_settings`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from weakseg.core import BACKBONES, PROPOSERS, MethodConfig, is_int

__all__ = ["ModuSegConfig", "SEARCHES", "POOLINGS", "UNASSIGNED"]

SEARCHES = ("auto", "op", "gemm", "faiss")
POOLINGS = ("soft", "hard")
UNASSIGNED = ("background", "ignore")
# EntitySeg's thresholds (inference 0.6, inside CorrCLIP 0.5) for proposers whose scores are confidences
_CALIBRATED = ("sam", "sam2", "disk")
# the families whose features are not dense patch tokens (the other registered backbones are dense extractors)
_NOT_DENSE = ("clip", "stable-diffusion")


@dataclass
class ModuSegConfig(MethodConfig):
    """Every default is the reference code's (docs/specs/moduseg.md §4) unless noted.

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
    similarities; the fastest on the CPU too: benchmarks/results/moduseg_search_cpu_2026-12-06.md), ``"gemm"``
    (exact: one library GEMM for every similarity, ``torch.topk``, the same vote), ``"auto"`` (the default:
    "op"; op and gemm give the same votes) or ``"faiss"``. faiss_ivf_threshold:
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
            if not is_int(v, 1):
                bad(name, "an int >= 1")
        if self.erosion_kernel % 2 == 0:
            bad("erosion_kernel", "an odd int")
        for name in ("min_area", "erosion_iterations", "faiss_ivf_threshold", "clip_surgery_layers"):
            v = getattr(self, name)
            if not is_int(v, 0):
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
