"""ModuSeg (``weakseg.create("moduseg")``): class-agnostic mask proposals labelled by cosine KNN
retrieval in an offline feature bank built from eroded pseudo masks (docs/specs/moduseg.md; the
reference code's semantics and defaults). This module holds the segmenter and its models; each stage
lives in its own module:

- :mod:`.config`: the options (:class:`ModuSegConfig`);
- :mod:`.build`: the offline, resumable bank build (:meth:`ModuSeg.build_bank`, ``weakseg bank build``)
  from :mod:`.pseudo` label maps and the :mod:`.regions` (SBP, SMFA) of every training image;
- :mod:`.bank`: the bank file (:class:`FeatureBank`) and its per-class outlier filter;
- :mod:`.search`: retrieval and the vote; :mod:`.paint`: NMS and painting.

Online (:meth:`ModuSeg.segment`), per image: proposals from any registered proposer (SAM / SAM2,
precomputed masks from disk, classical superpixels), kept if score >= ``score_thresh`` and area >=
``min_area``; the same SMFA encoding over one backbone forward; the KNN vote of every proposal
(K = 25); optional per-class NMS (IoU 0.4); proposals painted in ascending confidence so the most
confident wins; proposals voted background and unassigned pixels become background.

Differences from the reference code, each deliberate (the retrieval ones: :mod:`.search`):
- the backbone is DINOv2 / CLIP dense features (C-RADIOv4 is not available here) and the proposer any
  weakseg proposer (EntitySeg's Mask2Former is not); EntitySeg's score threshold 0.6 applies to the
  calibrated proposers (sam, sam2, disk); the superpixel proposer's scores are area fractions, so by
  default it is not thresholded.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from weakseg.core import BACKBONES, METHODS, PROPOSERS, ModelSpec, SegmentationOutput, check_segment_inputs
from weakseg.io import hash_file
from weakseg.methods.common import StageTimer, has_background
from weakseg.methods.moduseg.bank import BankError, FeatureBank
from weakseg.methods.moduseg.build import build_with, image_entries
from weakseg.methods.moduseg.config import ModuSegConfig
from weakseg.methods.moduseg.paint import paint, unassigned_label
from weakseg.methods.moduseg.pseudo import pseudo_label_map
from weakseg.methods.moduseg.regions import encode_regions
from weakseg.methods.moduseg.search import FaissSearch, search_bank

__all__ = ["ModuSeg", "load_backbone", "load_proposer"]


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


def _accepts_key(proposer) -> bool:
    import inspect

    try:
        return "key" in inspect.signature(proposer.__call__).parameters
    except (TypeError, ValueError):
        return False


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
        backend -> (labels, confidence, votes) in bank class ids (:func:`.search.search_bank`)."""
        return search_bank(self, queries, rows)

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
        unknown = [n for n in class_names[int(bg_out):] if n not in bank_names]
        if unknown:  # retrieval can only give the bank's classes: a class it lacks would silently stay empty
            known = bank_names[1:] if bank_bg is not None else bank_names
            raise ValueError(f"class_names: {', '.join(repr(n) for n in unknown)} not in the feature bank "
                             f"{self.config.bank!r}, whose classes are {', '.join(known)}; ask for those, or build a "
                             f"bank with these classes (`weakseg bank build`)")
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
        return unassigned_label(self.config)

    def _allowed_rows(self, allowed: torch.Tensor, to_out: torch.Tensor, bank_bg: int | None) -> torch.Tensor:
        ok = torch.zeros(len(to_out), dtype=torch.bool)
        mapped = to_out >= 0
        ok[mapped] = allowed[to_out[mapped]]
        if bank_bg is not None:
            ok[bank_bg] = True
        return torch.nonzero(ok[self.bank.labels]).flatten()

    def _paint(self, masks, lab, conf, votes, to_out, bg_out: bool, label_map: torch.Tensor,
               score_map: torch.Tensor) -> None:
        """Paint one image's voted proposals (:func:`.paint.paint`)."""
        paint(self.config, masks, lab, conf, votes, to_out, bg_out, label_map, score_map)

    # ------------------------------------------------------------------ building
    def pseudo_labels(self, sample, class_names: Sequence[str], source) -> torch.Tensor:
        """The pseudo label map (H, W) int64 of one dataset ``sample`` (:func:`.pseudo.pseudo_label_map`)."""
        return pseudo_label_map(self, sample, class_names, source)

    def image_entries(self, image: torch.Tensor, label_map: torch.Tensor, class_names: Sequence[str]):
        """Bank rows of one image: (vectors (R, D), classes (R,)) after SBP, the area floor and SMFA
        (:func:`.build.image_entries`)."""
        return image_entries(self, image, label_map, class_names)

    def build_bank(self, dataset, out: str | os.PathLike, *, pseudo, class_names: Sequence[str] | None = None,
                   limit: int | None = None, progress: bool = True, resume: bool = True, rank: int | None = None,
                   world_size: int | None = None, dataset_name: str | None = None) -> FeatureBank | None:
        """Build the feature bank of ``dataset`` (items with ``image``, ``name``, ``image_labels``) into
        ``out`` (:mod:`.build`). ``pseudo``: a pseudo-mask directory (str / Path / PseudoMaskDir) or a
        segmenter (any object with ``segment``). ``resume``: reuse finished work in ``<out>.parts`` (and a
        finished bank with the same settings); False starts over. Sharded by ``rank`` / ``world_size``
        (default: the torchrun environment); the rank that merges returns the bank, the others None.
        The built bank becomes this segmenter's bank."""
        return build_with(self, dataset, out, pseudo=pseudo, class_names=class_names, limit=limit,
                          progress=progress, resume=resume, rank=rank, world_size=world_size,
                          dataset_name=dataset_name)
