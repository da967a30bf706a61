"""Class-agnostic mask proposers with one interface: ``proposer(image) -> Proposals``.

``image`` is one RGB uint8 tensor (3, H, W). The result holds pairwise-disjoint boolean masks at
the image's resolution with float32 scores in descending order, which is what ModuSeg's
inference stage consumes (docs/specs/moduseg.md §2.1: EntitySeg masks made non-overlapping by
painting in ascending score order, thresholded by score and area).

Proposers:

- ``"sam"`` / ``"sam2"``: SAM / SAM2 automatic mask generation (point grid, predicted-IoU and
  stability filtering, box NMS) with transformers' own image-processor utilities;
- ``"disk"``: masks precomputed by any external model (e.g. EntitySeg), read from PNG id maps or
  npz files;
- ``"superpixel"``: scikit-image Felzenszwalb / SLIC superpixels merged by colour over a region
  adjacency graph; no weights.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Sequence, runtime_checkable

import numpy as np
import torch

from weakseg.backbones.features import resolve_pretrained
from weakseg.backbones.hub import hub_errors
from weakseg.core import PROPOSERS, FromSpec, ModelSpec

__all__ = [
    "Proposals",
    "MaskProposer",
    "paint_disjoint",
    "check_image",
    "SAMProposer",
    "SAM2Proposer",
    "DiskProposer",
    "SuperpixelProposer",
]


# ----------------------------------------------------------------------------------------------
# The common result
# ----------------------------------------------------------------------------------------------
@dataclass
class Proposals:
    """M class-agnostic regions of one image.

    masks:  (M, H, W) bool, pairwise disjoint (a pixel belongs to at most one mask; pixels may
            belong to none), no mask empty.
    scores: (M,) float32, in descending order (masks[0] is the most confident).

    The constructor checks these invariants; build Proposals from arbitrary (overlapping,
    unsorted) masks with :func:`paint_disjoint`, or from an id map with :meth:`from_id_map`.
    """

    masks: torch.Tensor
    scores: torch.Tensor

    def __post_init__(self) -> None:
        m, s = self.masks, self.scores
        if not isinstance(m, torch.Tensor) or m.dim() != 3 or m.dtype != torch.bool:
            desc = f"{tuple(m.shape)} {m.dtype}" if isinstance(m, torch.Tensor) else type(m).__name__
            raise ValueError(f"Proposals.masks: expected a (M, H, W) bool tensor, got {desc}")
        if not isinstance(s, torch.Tensor) or s.dim() != 1 or s.dtype != torch.float32 or s.shape[0] != m.shape[0]:
            desc = f"{tuple(s.shape)} {s.dtype}" if isinstance(s, torch.Tensor) else type(s).__name__
            raise ValueError(f"Proposals.scores: expected ({m.shape[0]},) float32 (one per mask), got {desc}")
        if s.numel() > 1 and bool((s[1:] > s[:-1]).any()):
            raise ValueError("Proposals.scores: expected descending order; use paint_disjoint() to sort")
        if m.shape[0]:
            if bool((m.sum(0, dtype=torch.int32) > 1).any()):
                raise ValueError("Proposals.masks: expected pairwise-disjoint masks; use paint_disjoint()")
            if bool((~m.flatten(1).any(1)).any()):
                raise ValueError("Proposals.masks: expected no empty mask")

    def __len__(self) -> int:
        return self.masks.shape[0]

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(self.masks.shape[-2:])

    @property
    def areas(self) -> torch.Tensor:
        """(M,) int64 pixel counts."""
        return self.masks.flatten(1).sum(1)

    @classmethod
    def empty(cls, height: int, width: int, device=None) -> "Proposals":
        return cls(torch.zeros(0, height, width, dtype=torch.bool, device=device),
                   torch.zeros(0, dtype=torch.float32, device=device))

    def to(self, device) -> "Proposals":
        return Proposals(self.masks.to(device), self.scores.to(device))

    def to_id_map(self) -> torch.Tensor:
        """(H, W) int32: 0 where no mask is, i + 1 on ``masks[i]``."""
        H, W = self.image_size
        ids = torch.zeros(H, W, dtype=torch.int32, device=self.masks.device)
        for i in range(len(self)):
            ids[self.masks[i]] = i + 1
        return ids

    @classmethod
    def from_id_map(cls, id_map: torch.Tensor | np.ndarray, scores=None, *, score_thresh: float | None = None,
                    min_area: int = 0) -> "Proposals":
        """Regions of an id map (H, W) of non-negative ints: 0 = no region, k >= 1 = region k.

        scores: None (every region scores 1), a sequence/tensor indexed by k - 1, or a dict
        {k: score}. Regions scoring below ``score_thresh``, covering fewer than ``min_area`` pixels,
        or absent from the map are dropped. Ties in score keep the smaller id first.
        """
        ids = torch.as_tensor(np.asarray(id_map) if isinstance(id_map, np.ndarray) else id_map)
        if ids.dim() != 2 or ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.is_complex():
            raise ValueError(f"id_map: expected an (H, W) integer map, got {tuple(ids.shape)} {ids.dtype}")
        ids = ids.to(torch.int64)
        if ids.numel() and int(ids.min()) < 0:
            raise ValueError(f"id_map: expected ids >= 0 (0 = no region), got minimum {int(ids.min())}")
        present = torch.unique(ids)
        present = present[present > 0]
        n = int(present.max()) if present.numel() else 0
        if scores is None:
            table = torch.ones(n + 1, dtype=torch.float32)
        elif isinstance(scores, dict):
            table = torch.full((n + 1,), float("nan"), dtype=torch.float32)
            for k, v in scores.items():
                if 1 <= int(k) <= n:
                    table[int(k)] = float(v)
            missing = [int(k) for k in present if torch.isnan(table[int(k)])]
            if missing:
                raise ValueError(f"scores: no score for region id(s) {missing[:10]} of the id map")
        else:
            given = torch.as_tensor(scores, dtype=torch.float32).flatten()
            if given.numel() < n:
                raise ValueError(f"scores: the id map has region ids up to {n}, got only {given.numel()} scores")
            table = torch.cat([torch.zeros(1), given])
        keep = present.cpu()
        sc = table[keep]
        if score_thresh is not None:
            ok = sc >= score_thresh
            keep, sc = keep[ok], sc[ok]
        masks = ids.unsqueeze(0) == keep.to(ids.device).view(-1, 1, 1)
        if min_area > 0 and keep.numel():
            ok = (masks.flatten(1).sum(1) >= min_area).cpu()
            keep, sc, masks = keep[ok], sc[ok], masks[ok.to(masks.device)]
        order = torch.sort(sc, descending=True, stable=True).indices
        return cls(masks[order.to(masks.device)], sc[order].to(masks.device))


def paint_disjoint(masks: torch.Tensor, scores: torch.Tensor | Sequence[float], *, score_thresh: float | None = None,
                   min_area: int = 0) -> Proposals:
    """Make possibly overlapping masks disjoint: paint them into one id map in ascending score
    order, so where masks overlap the higher score wins (a tie goes to the mask listed first);
    then rebuild each mask from the map (ModuSeg / EntitySeg's non-overlap rule).

    masks (M, H, W) bool/uint8/0-1 ints; scores (M,). Masks scoring below ``score_thresh`` are
    dropped before painting; masks left with no pixels or fewer than ``min_area`` pixels after
    painting are dropped (their pixels stay unassigned). Returns :class:`Proposals` sorted by
    descending score.
    """
    if not isinstance(masks, torch.Tensor):
        masks = torch.as_tensor(np.asarray(masks))
    if masks.dim() != 3:
        raise ValueError(f"masks: expected (M, H, W), got shape {tuple(masks.shape)}")
    if masks.dtype != torch.bool:
        if masks.dtype.is_floating_point or masks.is_complex():
            raise TypeError(f"masks: expected bool or integer 0/1 masks, got {masks.dtype}")
        if masks.numel() and (int(masks.min()) < 0 or int(masks.max()) > 1):
            raise ValueError("masks: expected 0/1 values")
        masks = masks.bool()
    scores = torch.as_tensor(scores, dtype=torch.float32, device=masks.device).flatten()
    M, H, W = masks.shape
    if scores.shape[0] != M:
        raise ValueError(f"scores: expected one score per mask ({M}), got {scores.shape[0]}")
    if bool(torch.isnan(scores).any()):
        raise ValueError("scores: expected no NaN")
    if min_area < 0:
        raise ValueError(f"min_area: expected >= 0, got {min_area}")
    idx = torch.arange(M, device=masks.device)
    if score_thresh is not None:
        idx = idx[scores >= score_thresh]
    # descending with ties in input order; painting that list backwards = ascending, first wins ties
    order = idx[torch.sort(scores[idx], descending=True, stable=True).indices]
    id_map = torch.zeros(H, W, dtype=torch.int64, device=masks.device)
    for i in reversed(order.tolist()):
        id_map[masks[i]] = i + 1
    area = torch.bincount(id_map.flatten(), minlength=M + 1)[1:]
    keep = order[(area[order] > 0) & (area[order] >= min_area)]
    return Proposals(id_map.unsqueeze(0) == (keep + 1).view(-1, 1, 1), scores[keep].clone())


@runtime_checkable
class MaskProposer(Protocol):
    def __call__(self, image: torch.Tensor) -> Proposals:
        """image: one RGB uint8 (3, H, W) tensor -> Proposals at (H, W)."""
        ...


def check_image(image) -> torch.Tensor:
    """Validate one RGB uint8 image (3, H, W) and return it."""
    if not isinstance(image, torch.Tensor):
        raise TypeError(f"image: expected a torch.Tensor (3, H, W) uint8, got {type(image).__name__}")
    if image.dim() == 4:
        raise ValueError(f"image: expected one RGB image (3, H, W), got a batch {tuple(image.shape)}; "
                         f"call the proposer once per image")
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"image: expected an RGB image of shape (3, H, W), got {tuple(image.shape)}")
    if image.dtype != torch.uint8:
        raise TypeError(f"image: expected dtype uint8 (RGB 0..255), got {image.dtype}")
    if image.shape[1] == 0 or image.shape[2] == 0:
        raise ValueError(f"image: expected a non-empty image, got size {image.shape[1]}x{image.shape[2]}")
    return image


# ----------------------------------------------------------------------------------------------
# SAM / SAM2 automatic mask generation
# ----------------------------------------------------------------------------------------------
@PROPOSERS.register("sam")
class SAMProposer(torch.nn.Module, FromSpec):
    """SAM automatic mask generation through transformers, made disjoint.

    Per crop (the full image, plus ``crop_n_layers`` layers of overlapping crops): the image
    processor's ``generate_crop_boxes`` lays a ``points_per_side``² point grid, the model predicts
    3 masks per point (``points_per_batch`` points at a time, image embedding computed once),
    ``post_process_masks`` brings the logits to the crop's resolution, and ``filter_masks`` keeps
    masks with predicted IoU > ``pred_iou_thresh`` and stability score > ``stability_score_thresh``
    (logit threshold ``mask_threshold``, offset ``stability_score_offset``), dropping masks cut by
    a crop edge. ``post_process_for_mask_generation`` then runs box NMS at ``nms_iou`` over all
    crops. Finally the survivors are painted disjoint by predicted IoU (:func:`paint_disjoint`,
    higher wins) and masks under ``min_area`` pixels are dropped. Scores are the predicted IoUs.
    """

    model_type = "sam"
    default_model = "facebook/sam-vit-base"
    FAMILY = "sam"
    DEFAULT_SPEC = default_model

    def __init__(self, model, image_processor, *, points_per_side: int = 32, points_per_batch: int = 64,
                 pred_iou_thresh: float = 0.88, stability_score_thresh: float = 0.95,
                 stability_score_offset: float = 1.0, mask_threshold: float = 0.0, nms_iou: float = 0.7,
                 crop_n_layers: int = 0, crop_overlap_ratio: float = 512 / 1500,
                 crop_n_points_downscale_factor: int = 1, min_area: int = 0):
        super().__init__()
        model_cls, ip_cls = self._classes()
        if not isinstance(model, model_cls):
            raise TypeError(f"model: expected a transformers {model_cls.__name__}, got {type(model).__name__}")
        if not isinstance(image_processor, ip_cls):
            raise TypeError(f"image_processor: expected a transformers {ip_cls.__name__}, "
                            f"got {type(image_processor).__name__}")
        for name, v in (("points_per_side", points_per_side), ("points_per_batch", points_per_batch)):
            if int(v) < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {v}")
        if crop_n_layers < 0:
            raise ValueError(f"crop_n_layers: expected >= 0, got {crop_n_layers}")
        if not 0.0 <= nms_iou <= 1.0:
            raise ValueError(f"nms_iou: expected a value in [0, 1], got {nms_iou}")
        self.model = model.eval()
        self.image_processor = image_processor
        self.points_per_side = int(points_per_side)
        self.points_per_batch = int(points_per_batch)
        self.pred_iou_thresh = float(pred_iou_thresh)
        self.stability_score_thresh = float(stability_score_thresh)
        self.stability_score_offset = float(stability_score_offset)
        self.mask_threshold = float(mask_threshold)
        self.nms_iou = float(nms_iou)
        self.crop_n_layers = int(crop_n_layers)
        self.crop_overlap_ratio = float(crop_overlap_ratio)
        self.crop_n_points_downscale_factor = int(crop_n_points_downscale_factor)
        self.min_area = int(min_area)

    @staticmethod
    def _classes():
        from transformers import SamImageProcessor, SamModel
        return SamModel, SamImageProcessor

    # --- construction -------------------------------------------------------------------------
    @classmethod
    def _tiny_parts(cls, image_size: int):
        from transformers import SamConfig, SamImageProcessor, SamModel
        patch = 8
        grid = image_size // patch
        config = SamConfig(
            vision_config=dict(hidden_size=32, output_channels=32, num_hidden_layers=2, num_attention_heads=2,
                               image_size=image_size, patch_size=patch, window_size=4, global_attn_indexes=[1],
                               mlp_dim=64, num_pos_feats=16),
            prompt_encoder_config=dict(hidden_size=32, image_size=image_size, patch_size=patch, mask_input_channels=4),
            mask_decoder_config=dict(hidden_size=32, mlp_dim=64, num_hidden_layers=1, num_attention_heads=2,
                                     iou_head_hidden_dim=32),
        )
        ip = SamImageProcessor(size={"longest_edge": image_size}, pad_size={"height": image_size, "width": image_size},
                               mask_size={"longest_edge": 4 * grid},
                               mask_pad_size={"height": 4 * grid, "width": 4 * grid})
        return SamModel(config), ip

    @classmethod
    def _tiny(cls, variant: str | None, *, device="cpu", dtype=None, cache_dir: str | None = None,
              **options) -> "SAMProposer":
        if variant is not None:
            raise ValueError(f"{cls.FAMILY}: no tiny variant {variant!r}; use tiny")
        return cls.tiny(seed=0, **options).to(device=device, dtype=dtype)

    @classmethod
    def tiny(cls, seed: int = 0, *, image_size: int = 64, **options) -> "SAMProposer":
        """A random-weight model (width 32, 2 encoder layers, input ``image_size``) for tests;
        its masks are meaningless but run through the full pipeline. ``options`` are the
        constructor's AMG settings (points_per_side, pred_iou_thresh, ...)."""
        if image_size % 32:
            raise ValueError(f"image_size: expected a multiple of 32, got {image_size}")
        torch.manual_seed(seed)
        model, ip = cls._tiny_parts(image_size)
        return cls(model, ip, **options)

    @classmethod
    def from_pretrained(cls, name_or_path: str | None = None, *, cache_dir: str | None = None, device="cpu",
                        dtype=None, **options) -> "SAMProposer":
        """Load the model and its image processor from a hub name (default
        ``cls.default_model``) or a local directory written by :meth:`save_pretrained` (read with
        ``local_files_only=True``). ``options`` are the constructor's AMG settings."""
        model_cls, ip_cls = cls._classes()
        name_or_path = cls.default_model if name_or_path is None else name_or_path
        what = f"{cls.__name__}.from_pretrained"
        src, local = resolve_pretrained(name_or_path, what, ("config.json", "preprocessor_config.json"))
        kw = {"cache_dir": cache_dir}
        if local:
            kw["local_files_only"] = True
        from transformers import AutoConfig
        with contextlib.nullcontext() if local else hub_errors(src, f"{cls.model_type.upper()} model"):
            config = AutoConfig.from_pretrained(src, **kw)
        if config.model_type != cls.model_type:
            raise ValueError(f"{what}: {name_or_path} holds a {config.model_type!r} model; expected {cls.model_type!r}")
        with contextlib.nullcontext() if local else hub_errors(src, f"{cls.model_type.upper()} model"):
            model = model_cls.from_pretrained(src, config=config, dtype=dtype, **kw)
            ip = ip_cls.from_pretrained(src, **kw)
        return cls(model, ip, **options).to(device)

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write model (config.json + model.safetensors) and image processor
        (preprocessor_config.json) in transformers' format."""
        path = os.fspath(path)
        self.model.save_pretrained(path, safe_serialization=True)
        self.image_processor.save_pretrained(path)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    # --- inference ----------------------------------------------------------------------------
    def _target_size(self) -> int:
        size = self.image_processor.size
        get = size.get if hasattr(size, "get") else (lambda k, d=None: getattr(size, k, d))
        return int(get("longest_edge", None) or get("height"))

    def _post_process_kwargs(self, inputs, c: int) -> dict:
        if "reshaped_input_sizes" in inputs:  # SAM pads; SAM2 resizes to a square
            return {"reshaped_input_sizes": inputs["reshaped_input_sizes"][c:c + 1]}
        return {}

    def _filter_masks(self, logits: torch.Tensor, iou_scores: torch.Tensor, image_size: tuple[int, int],
                      crop_box: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The image processor's ``filter_masks`` without its RLE round trip (RLE only serves
        pycocotools; NMS needs the boxes alone): keep masks whose predicted IoU and stability score
        pass the thresholds, binarise, drop masks cut by the crop edge, paste into the full image.
        Uses transformers' own helpers; returns full-size bool masks, scores and XYXY boxes."""
        from transformers.models.sam.image_processing_sam import (_batched_mask_to_box, _compute_stability_score,
                                                                   _is_box_near_crop_edge, _pad_masks)
        H, W = image_size
        logits, iou_scores = logits.flatten(0, 1), iou_scores.flatten(0, 1).to(logits.device)
        keep = torch.ones(logits.shape[0], dtype=torch.bool, device=logits.device)
        if self.pred_iou_thresh > 0.0:
            keep &= iou_scores > self.pred_iou_thresh
        if self.stability_score_thresh > 0.0:
            stability = _compute_stability_score(logits, self.mask_threshold, self.stability_score_offset)
            keep &= stability > self.stability_score_thresh
        masks, scores = logits[keep] > self.mask_threshold, iou_scores[keep]
        boxes = _batched_mask_to_box(masks)
        keep = ~_is_box_near_crop_edge(boxes, crop_box, [0, 0, W, H])
        masks, scores, boxes = masks[keep], scores[keep], boxes[keep]
        left, top = int(crop_box[0]), int(crop_box[1])
        boxes = boxes + torch.tensor([left, top, left, top], device=boxes.device)
        return _pad_masks(masks, crop_box, H, W), scores, boxes

    @torch.inference_mode()
    def forward(self, image: torch.Tensor) -> Proposals:
        image = check_image(image)
        H, W = image.shape[-2:]
        ip = self.image_processor
        crop_boxes, points, crops, labels = ip.generate_crop_boxes(
            image.cpu(), self._target_size(), self.crop_n_layers, self.crop_overlap_ratio, self.points_per_side,
            self.crop_n_points_downscale_factor, device=self.device)
        inputs = ip(images=crops, return_tensors="pt")
        pixel_values = inputs["pixel_values"].to(self.device, self.dtype)
        masks, scores, boxes = [], [], []
        n_points = points.shape[1]
        for c in range(len(crops)):
            embeddings = self.model.get_image_embeddings(pixel_values[c:c + 1])
            for i in range(0, n_points, self.points_per_batch):
                out = self.model(image_embeddings=embeddings,
                                 input_points=points[:, i:i + self.points_per_batch, c:c + 1].to(self.dtype),
                                 input_labels=labels[:, i:i + self.points_per_batch, c:c + 1],
                                 multimask_output=True)
                logits = ip.post_process_masks(out.pred_masks.float(), inputs["original_sizes"][c:c + 1],
                                               mask_threshold=self.mask_threshold, binarize=False,
                                               **self._post_process_kwargs(inputs, c))[0]
                m, sc, bx = self._filter_masks(logits, out.iou_scores[0].float(), (H, W), crop_boxes[c])
                masks.append(m)
                scores.append(sc)
                boxes.append(bx)
        masks, scores, boxes = torch.cat(masks), torch.cat(scores), torch.cat(boxes)
        if masks.shape[0] == 0:
            return Proposals.empty(H, W, device=image.device)
        from torchvision.ops import batched_nms
        keep = batched_nms(boxes.float(), scores, torch.zeros_like(scores), self.nms_iou)
        return paint_disjoint(masks[keep].to(image.device), scores[keep].to(image.device), min_area=self.min_area)


def _has_sam2() -> bool:
    try:
        from transformers import Sam2ImageProcessor, Sam2Model  # noqa: F401
    except ImportError:
        return False
    return True


@PROPOSERS.register("sam2")
class SAM2Proposer(SAMProposer):
    """SAM2 automatic mask generation through transformers (``Sam2Model`` +
    ``Sam2ImageProcessor``, which resizes to a square instead of padding); otherwise exactly
    :class:`SAMProposer`'s pipeline and settings."""

    model_type = "sam2"
    default_model = "facebook/sam2.1-hiera-tiny"
    FAMILY = "sam2"
    DEFAULT_SPEC = default_model

    @staticmethod
    def _classes():
        if not _has_sam2():
            import transformers

            raise ImportError(f"proposer 'sam2' needs transformers with Sam2Model (>= 4.56); installed: "
                              f"transformers {transformers.__version__}")
        from transformers import Sam2ImageProcessor, Sam2Model
        return Sam2Model, Sam2ImageProcessor

    @classmethod
    def _tiny_parts(cls, image_size: int):
        cls._classes()  # a clear error when this transformers has no SAM2
        from transformers import (Sam2Config, Sam2HieraDetConfig, Sam2ImageProcessor, Sam2Model,
                                  Sam2VisionConfig)
        s4 = image_size // 4  # Hiera patch stride 4, then three 2x query-pooling stages
        backbone = Sam2HieraDetConfig(
            hidden_size=8, num_attention_heads=1, image_size=[image_size, image_size],
            blocks_per_stage=[1, 1, 2, 1], embed_dim_per_stage=[8, 16, 32, 64],
            num_attention_heads_per_stage=[1, 1, 2, 2], window_size_per_stage=[4, 4, 4, 2],
            global_attention_blocks=[3], window_positional_embedding_background_size=[4, 4])
        vision = Sam2VisionConfig(backbone_config=backbone, backbone_channel_list=[64, 32, 16, 8],
                                  backbone_feature_sizes=[[s4, s4], [s4 // 2, s4 // 2], [s4 // 4, s4 // 4]],
                                  fpn_hidden_size=32)
        config = Sam2Config(
            vision_config=vision,
            prompt_encoder_config=dict(hidden_size=32, image_size=image_size, patch_size=16, mask_input_channels=4),
            mask_decoder_config=dict(hidden_size=32, mlp_dim=64, num_hidden_layers=1, num_attention_heads=2,
                                     iou_head_hidden_dim=32),
        )
        ip = Sam2ImageProcessor(size={"height": image_size, "width": image_size},
                                mask_size={"height": s4, "width": s4})
        return Sam2Model(config), ip


# ----------------------------------------------------------------------------------------------
# Precomputed masks from disk
# ----------------------------------------------------------------------------------------------
_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm"}


@PROPOSERS.register("disk")
class DiskProposer:
    """Masks precomputed by an external model (e.g. EntitySeg), one file per image under ``root``.

    The file for a key is ``root / pattern.format(key=stem)`` + ``.npz`` or ``.png`` (tried in
    the order of ``formats``), where ``stem`` is the key with any directory and image suffix
    removed (``"/data/JPEGImages/2007_000032.jpg"`` -> ``"2007_000032"``). ``pattern`` may hold
    sub-directories (``"train2014/{key}"``).

    - ``.npz``: ``masks`` (M, H, W) bool/0-1 ints, possibly overlapping, and optional ``scores``
      (M,); made disjoint with :func:`paint_disjoint` (higher score wins).
    - ``.png``: a single-channel id map (8-bit, or 16-bit for more than 255 regions; PNG has no
      32-bit grey), 0 = no region, 1..M = regions;
      scores from an optional sidecar ``<same name>.json`` holding a list (score of id k at
      position k - 1) or a dict {"k": score}; without a sidecar every region scores
      ``default_score``.

    Regions scoring below ``score_thresh`` (EntitySeg: 0.5 in CorrCLIP, 0.6 at ModuSeg inference)
    or smaller than ``min_area`` pixels are dropped. Call as ``proposer(image, key=...)``; the
    image is optional and, when given, must match the stored mask size.
    """

    FAMILY = "disk"

    @classmethod
    def from_spec(cls, spec, *, device=None, dtype=None, cache_dir: str | None = None, **options) -> "DiskProposer":
        """The spec is the directory of precomputed masks (``options``: pattern, formats, ...)."""
        if spec is None:
            raise ValueError("proposer 'disk': the model spec must be the directory of precomputed masks")
        return cls(ModelSpec.parse(spec, what="proposer 'disk'").name, **options)

    def __init__(self, root: str | os.PathLike, *, pattern: str = "{key}", formats: Sequence[str] = ("npz", "png"),
                 score_thresh: float | None = None, min_area: int = 0, default_score: float = 1.0):
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise FileNotFoundError(f"DiskProposer: root directory {self.root} does not exist "
                                    f"(expected a directory of precomputed masks)")
        if "{key}" not in pattern:
            raise ValueError(f"pattern: expected a format string containing '{{key}}', got {pattern!r}")
        bad = [f for f in formats if f not in ("npz", "png")]
        if bad or not formats:
            raise ValueError(f"formats: expected a non-empty subset of ('npz', 'png'), got {tuple(formats)}")
        if min_area < 0:
            raise ValueError(f"min_area: expected >= 0, got {min_area}")
        self.pattern = pattern
        self.formats = tuple(formats)
        self.score_thresh = score_thresh
        self.min_area = int(min_area)
        self.default_score = float(default_score)

    @staticmethod
    def stem(key: str | os.PathLike) -> str:
        name = Path(os.fspath(key)).name
        p = Path(name)
        return p.stem if p.suffix.lower() in _IMAGE_SUFFIXES else name

    def candidates(self, key: str | os.PathLike) -> list[Path]:
        base = self.pattern.format(key=self.stem(key))
        return [self.root / f"{base}.{fmt}" for fmt in self.formats]

    def path_for(self, key: str | os.PathLike) -> Path:
        """The existing file for ``key``; FileNotFoundError naming every path tried otherwise."""
        tried = self.candidates(key)
        for p in tried:
            if p.is_file():
                return p
        raise FileNotFoundError(f"DiskProposer: no precomputed masks for key {os.fspath(key)!r}; "
                                f"tried {', '.join(str(p) for p in tried)}")

    def load(self, key: str | os.PathLike) -> Proposals:
        path = self.path_for(key)
        if path.suffix == ".npz":
            return self._load_npz(path)
        return self._load_png(path)

    def _load_npz(self, path: Path) -> Proposals:
        with np.load(path, allow_pickle=False) as data:
            if "masks" not in data.files:
                raise KeyError(f"DiskProposer: {path} has keys {sorted(data.files)}; expected 'masks' "
                               f"(M, H, W) and optionally 'scores' (M,)")
            masks = data["masks"]
            scores = data["scores"] if "scores" in data.files else None
        if masks.ndim != 3:
            raise ValueError(f"DiskProposer: {path}: 'masks' must be (M, H, W), got shape {masks.shape}")
        if scores is None:
            scores = np.full(masks.shape[0], self.default_score, dtype=np.float32)
        elif scores.shape != (masks.shape[0],):
            raise ValueError(f"DiskProposer: {path}: 'scores' must be ({masks.shape[0]},), got shape {scores.shape}")
        if masks.dtype != np.bool_ and not np.issubdtype(masks.dtype, np.integer):
            raise TypeError(f"DiskProposer: {path}: 'masks' must be bool or 0/1 integers, got {masks.dtype}")
        return paint_disjoint(torch.from_numpy(np.ascontiguousarray(masks)),
                              torch.from_numpy(scores.astype(np.float32)),
                              score_thresh=self.score_thresh, min_area=self.min_area)

    def _load_png(self, path: Path) -> Proposals:
        from PIL import Image
        with Image.open(path) as im:
            if im.mode not in ("L", "P", "I", "I;16", "I;16B", "I;16L"):
                raise ValueError(f"DiskProposer: {path} is a {im.mode} image; expected a single-channel id map "
                                 f"(8- or 16-bit)")
            ids = np.array(im)
        ids = ids.astype(np.int64)
        sidecar = path.with_suffix(".json")
        scores = None
        if sidecar.is_file():
            raw = json.loads(sidecar.read_text())
            if isinstance(raw, dict):
                scores = {int(k): float(v) for k, v in raw.items()}
            elif isinstance(raw, list):
                scores = [float(v) for v in raw]
            else:
                raise ValueError(f"DiskProposer: {sidecar} must hold a list or a dict of scores, got "
                                 f"{type(raw).__name__}")
        elif ids.max(initial=0) > 0:
            scores = [self.default_score] * int(ids.max())
        return Proposals.from_id_map(torch.from_numpy(ids), scores, score_thresh=self.score_thresh,
                                     min_area=self.min_area)

    def __call__(self, image: torch.Tensor | None = None, *, key: str | os.PathLike) -> Proposals:
        props = self.load(key)
        if image is not None:
            image = check_image(image)
            if tuple(image.shape[-2:]) != props.image_size:
                raise ValueError(f"DiskProposer: masks for key {os.fspath(key)!r} are {props.image_size[0]}x"
                                 f"{props.image_size[1]}, the image is {image.shape[1]}x{image.shape[2]}")
            props = props.to(image.device)
        return props


# ----------------------------------------------------------------------------------------------
# Classical superpixels merged by colour
# ----------------------------------------------------------------------------------------------
@PROPOSERS.register("superpixel")
class SuperpixelProposer:
    """Weight-free proposals: scikit-image superpixels merged by colour.

    1. Over-segment the image with ``felzenszwalb`` (scale, sigma, min_size; on RGB in [0, 1]) or
       ``slic`` (n_segments, compactness; in CIELAB).
    2. Build a region adjacency graph whose edge weights are the distances between mean CIELAB
       colours (``skimage.graph.rag_mean_color``), and merge every pair of adjacent regions closer
       than ``merge_thresh`` (``skimage.graph.cut_threshold``; 0 disables merging). Merged regions
       are connected by construction.
    3. Score each region: ``score="area"`` (default) gives its area as a fraction of the image
       (large regions first); ``score="homogeneity"`` gives 1 / (1 + s) with s the mean per-channel
       standard deviation of its CIELAB colour (flat regions first).

    Regions under ``min_area`` pixels are dropped. Deterministic; the regions tile the image.
    """

    FAMILY = "superpixel"

    @classmethod
    def from_spec(cls, spec=None, *, device=None, dtype=None, cache_dir: str | None = None,
                  **options) -> "SuperpixelProposer":
        """Weight-free: no spec (``options``: the constructor's settings)."""
        if spec is not None:
            raise ValueError(f"proposer 'superpixel' has no weights; got the model spec {str(spec)!r}")
        return cls(**options)

    def __init__(self, method: str = "felzenszwalb", *, scale: float = 100.0, sigma: float = 0.5,
                 min_size: int = 50, n_segments: int = 200, compactness: float = 10.0,
                 merge_thresh: float = 10.0, score: str = "area", min_area: int = 0):
        if method not in ("felzenszwalb", "slic"):
            raise ValueError(f"method: expected 'felzenszwalb' or 'slic', got {method!r}")
        if score not in ("area", "homogeneity"):
            raise ValueError(f"score: expected 'area' or 'homogeneity', got {score!r}")
        if merge_thresh < 0:
            raise ValueError(f"merge_thresh: expected >= 0, got {merge_thresh}")
        if min_area < 0:
            raise ValueError(f"min_area: expected >= 0, got {min_area}")
        self.method = method
        self.scale, self.sigma, self.min_size = float(scale), float(sigma), int(min_size)
        self.n_segments, self.compactness = int(n_segments), float(compactness)
        self.merge_thresh = float(merge_thresh)
        self.score = score
        self.min_area = int(min_area)

    def segment(self, image: torch.Tensor) -> np.ndarray:
        """The merged label map (H, W) int64 with labels 1..R."""
        from skimage import color, graph, segmentation

        rgb = check_image(image).permute(1, 2, 0).cpu().numpy().astype(np.float64) / 255.0
        lab = color.rgb2lab(rgb)
        if self.method == "felzenszwalb":
            labels = segmentation.felzenszwalb(rgb, scale=self.scale, sigma=self.sigma, min_size=self.min_size,
                                               channel_axis=-1)
        else:
            labels = segmentation.slic(rgb, n_segments=self.n_segments, compactness=self.compactness, start_label=0,
                                       convert2lab=True, channel_axis=-1)
        labels = labels.astype(np.int64)
        if self.merge_thresh > 0 and labels.max() > 0:
            rag = graph.rag_mean_color(lab, labels, mode="distance")
            labels = graph.cut_threshold(labels, rag, self.merge_thresh, in_place=True)
        _, labels = np.unique(labels, return_inverse=True)
        return labels.reshape(rgb.shape[:2]).astype(np.int64) + 1

    def __call__(self, image: torch.Tensor) -> Proposals:
        image = check_image(image)
        labels = self.segment(image)
        H, W = labels.shape
        n = int(labels.max())
        flat = labels.ravel()
        area = np.bincount(flat, minlength=n + 1)[1:].astype(np.float64)
        if self.score == "area":
            scores = area / (H * W)
        else:
            from skimage import color
            lab = color.rgb2lab(image.permute(1, 2, 0).cpu().numpy().astype(np.float64) / 255.0).reshape(-1, 3)
            s1 = np.stack([np.bincount(flat, weights=lab[:, c], minlength=n + 1)[1:] for c in range(3)], 1)
            s2 = np.stack([np.bincount(flat, weights=lab[:, c] ** 2, minlength=n + 1)[1:] for c in range(3)], 1)
            mean = s1 / area[:, None]
            var = np.clip(s2 / area[:, None] - mean ** 2, 0.0, None)
            scores = 1.0 / (1.0 + np.sqrt(var).mean(1))
        props = Proposals.from_id_map(torch.from_numpy(labels), torch.from_numpy(scores.astype(np.float32)),
                                      min_area=self.min_area)
        return props.to(image.device)
