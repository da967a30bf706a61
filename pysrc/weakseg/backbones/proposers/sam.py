"""SAM / SAM2 automatic mask generation (point grid, predicted-IoU and stability filtering, box NMS) through
transformers' models and image-processor utilities."""

from __future__ import annotations

import contextlib
import os

import torch

from weakseg.backbones.configs import RANDOM_SEED, SAM as SAM_CONFIGS, SAM_ALIASES, SAM_IMAGE_PROCESSOR
from weakseg.backbones.configs import resolve as resolve_config
from weakseg.backbones.features import resolve_pretrained
from weakseg.backbones.hub import hub_errors
from weakseg.backbones.proposers.base import Proposals, check_image, paint_disjoint
from weakseg.core import PROPOSERS, FromSpec

__all__ = ["SAMProposer", "SAM2Proposer"]


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

    @classmethod
    def from_config(cls, model: str | None = None, *, cache_dir: str | None = None, device="cpu", dtype=None,
                    seed: int = RANDOM_SEED, **options) -> "SAMProposer":
        """``random:<model>``: the real architecture of ``model`` (``facebook/sam-vit-base`` / ``-large`` /
        ``-huge``, or ``sam-vit-base``, ``vit_b`` ...; configs in :data:`weakseg.backbones.configs.SAM`) and
        its image processor, with random weights drawn from ``seed`` (the global RNG is left untouched), no
        download. ``device="meta"`` builds without allocating. ``options`` are the constructor's AMG
        settings; ``cache_dir`` has nothing to load and is ignored."""
        model_cls, ip_cls = cls._classes()
        table = SAM_CONFIGS if cls.model_type == "sam" else {}
        aliases = SAM_ALIASES if cls.model_type == "sam" else {}
        if not table:
            raise ValueError(f"{cls.FAMILY}: random:<model> (real architecture, random weights) has no configs for "
                             f"{cls.model_type!r} models; use tiny, a hub name or a local path")
        _, cfg = resolve_config(model if model is not None else cls.default_model, table, aliases, cls.FAMILY)
        from transformers import SamConfig
        meta = torch.device(device).type == "meta"
        with torch.random.fork_rng(devices=[]), (torch.device("meta") if meta else contextlib.nullcontext()):
            torch.manual_seed(int(seed))
            net = model_cls(SamConfig(**cfg))
        ip = ip_cls(**SAM_IMAGE_PROCESSOR)
        out = cls(net, ip, **options)
        return out.to(device=device, dtype=dtype) if dtype is not None else out.to(device=device)

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
