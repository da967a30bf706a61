"""Pieces every method shares: per-class normalisation and resizing of score
maps, the background rules of the references, the class convention of
``Segmenter.segment`` and CLIP zero-shot tagging for the open-vocabulary
setting. One place for them, so methods never reach into each other.

Class convention: ``segment(images, class_names, image_labels)`` receives the
C candidate names; when ``class_names[0]`` is a background name (see
:func:`has_background`), channel 0 is the background, computed from the
foreground maps by a background rule; otherwise every channel is a class and
the label is the plain argmax (datasets without a background class).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from weakseg.core import BACKGROUND_NAMES, has_background, image_label_mask, is_int

__all__ = ["BACKGROUND_NAMES", "has_background", "minmax_per_class", "resize_maps", "background_channel",
           "scores_to_labels", "image_label_mask", "clip_tag_classes", "load_tagger_clip", "BackgroundRule",
           "StageTimer", "grid_seeds", "dilated_neighbours", "PAMR", "PAMR_DILATIONS", "check_pamr_options",
           "pamr_maps"]


def minmax_per_class(maps: torch.Tensor, eps: float = 0.0) -> torch.Tensor:
    """(B, C, ...) -> each (b, c) map min-max normalised to [0, 1]: (x - min) / (max - min + eps).

    iSeg's and DiffSegmenter's per-class normalisation, which divide by the range with no eps: the
    default ``eps=0`` is theirs exactly wherever the range is real, whatever its scale (an absolute eps of
    1e-5 shrank a map of range 1e-4 to [0, 0.91] and changed labels). A range at the rounding level of
    the map's values, max - min <= 16 ulps of max(|min|, |max|) (16 x the dtype's machine epsilon,
    relative: 1.9e-6 in float32) — a constant map, or one made "constant" by a bilinear upsampling of a
    1x1 map — carries no location and gives 0 everywhere (the references' 0 / 0 would give NaN, and
    normalising the rounding noise would give an arbitrary [0, 1] map)."""
    if not eps >= 0:
        raise ValueError(f"minmax_per_class: eps must be >= 0, got {eps}")
    flat = maps.flatten(2)
    if not flat.is_floating_point():
        flat = flat.float()
    lo = flat.amin(dim=2, keepdim=True)
    hi = flat.amax(dim=2, keepdim=True)
    rng = hi - lo
    pos = rng > 16 * torch.finfo(flat.dtype).eps * torch.maximum(lo.abs(), hi.abs())
    return torch.where(pos, (flat - lo) / torch.where(pos, rng + eps, torch.ones_like(rng)),
                       torch.zeros_like(flat)).view(maps.shape)


def resize_maps(maps: torch.Tensor, size: tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
    """(B, C, h, w) -> (B, C, H, W) with align_corners=False (the references' resampling)."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    if mode == "nearest":
        return F.interpolate(maps, size=size, mode="nearest")
    return F.interpolate(maps, size=size, mode=mode, align_corners=False)


@dataclass(frozen=True)
class BackgroundRule:
    """How the background channel is made from the foreground maps (values in [0, 1]).

    kind="power":     bg = (1 - max_c fg) ** power            (iSeg with bkg_thre = 0, power 2;
                                                                DiCLIP's walk with power 1)
    kind="threshold": fg values < value are set to 0; pixels whose every fg value is 0 go to
                      the background (iSeg with bkg_thre > 0, e.g. COCO 0.45)
    kind="constant":  bg = value everywhere                    (DiffSegmenter's tau)
    """

    kind: str = "power"
    value: float = 2.0

    def __post_init__(self) -> None:
        if self.kind not in ("power", "threshold", "constant"):
            raise ValueError(f"BackgroundRule.kind: expected 'power', 'threshold' or 'constant', got {self.kind!r}")
        if self.kind == "power" and not self.value > 0:
            raise ValueError(f"BackgroundRule.value: a power must be > 0, got {self.value}")
        if self.kind in ("threshold", "constant") and not 0 <= self.value <= 1:
            raise ValueError(f"BackgroundRule.value: a {self.kind} must lie in [0, 1], got {self.value}")


def background_channel(fg: torch.Tensor, rule: BackgroundRule) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, K, H, W) foreground maps in [0, 1] -> (maps used for the argmax, bg (B, 1, H, W))."""
    if rule.kind == "power":
        top = fg.amax(dim=1, keepdim=True) if fg.shape[1] else torch.zeros_like(fg[:, :1])
        return fg, (1 - top).clamp_min(0) ** rule.value
    if rule.kind == "constant":
        return fg, torch.full_like(fg[:, :1], rule.value)
    cut = torch.where(fg < rule.value, torch.zeros_like(fg), fg)
    none = (cut.amax(dim=1, keepdim=True) <= 0) if fg.shape[1] else torch.ones_like(fg[:, :1], dtype=torch.bool)
    # background wins exactly where nothing survived the threshold
    return cut, none.to(fg.dtype)


def scores_to_labels(fg: torch.Tensor, class_names: Sequence[str], image_labels: torch.Tensor | None = None,
                     rule: BackgroundRule = BackgroundRule()) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class maps -> (scores (B, C, H, W), labels (B, H, W)).

    ``fg``: (B, C_fg, H, W) maps in [0, 1] for the non-background classes, in the order of
    ``class_names`` without its background entry. Classes absent from ``image_labels`` get 0
    (they can never win). With a background class, channel 0 of ``scores`` comes from ``rule``.
    """
    B = fg.shape[0]
    C = len(class_names)
    bg_first = has_background(class_names)
    if fg.shape[1] != C - int(bg_first):
        raise ValueError(f"scores_to_labels: {fg.shape[1]} foreground maps for {C} class names "
                         f"({'with' if bg_first else 'without'} a background class)")
    allowed = image_label_mask(image_labels, B, C, fg.device)
    fg_allowed = allowed[:, int(bg_first):, None, None]
    fg = torch.where(fg_allowed, fg, torch.zeros_like(fg))
    if not bg_first:
        masked = torch.where(fg_allowed, fg, torch.full_like(fg, -1.0))
        return fg, masked.argmax(dim=1)
    fg_used, bg = background_channel(fg, rule)
    scores = torch.cat([bg, fg_used], dim=1)
    # the background is always a candidate; argmax takes the first maximum, so it wins ties
    allowed = allowed.clone()
    allowed[:, 0] = True
    masked = torch.where(allowed[:, :, None, None], scores, torch.full_like(scores, -1.0))
    return scores, masked.argmax(dim=1)


def load_tagger_clip(model: str, pretrained: str | None, cache_dir: str | None, device):
    """The CLIP backbone a method tags classes with, by model spec (tiny, toy, a hub name or a local folder)."""
    from weakseg.core import BACKBONES

    return BACKBONES.build("clip", model, pretrained=pretrained, cache_dir=cache_dir, device=device)


def clip_tag_classes(clip, images, class_names: Sequence[str], topk: int = 3, threshold: float = 0.1,
                     templates="ensemble", logit_scale: float = 100.0) -> torch.Tensor:
    """Open-vocabulary candidate classes by CLIP zero-shot tagging: per image, the softmax over
    the non-background classes of ``logit_scale * cos(image, text)``; the top ``topk`` classes
    with probability >= ``threshold`` are kept (at least the top one). Returns (B, C) bool with
    the background (if any) always on."""
    bg_first = has_background(class_names)
    fg_names = list(class_names[int(bg_first):])
    if not fg_names:
        raise ValueError("clip_tag_classes: class_names has no foreground class")
    text = clip.class_embeddings(fg_names, templates=templates).embeddings
    out = clip(images)
    img = F.normalize(out.cls.float(), dim=-1)
    probs = (logit_scale * img @ F.normalize(text.float(), dim=-1).T).softmax(dim=-1)  # (B, K)
    k = min(topk, probs.shape[1])
    top = probs.topk(k, dim=1)
    keep = torch.zeros_like(probs, dtype=torch.bool)
    keep.scatter_(1, top.indices, top.values >= threshold)
    keep[torch.arange(probs.shape[0]), top.indices[:, 0]] = True
    if bg_first:
        keep = torch.cat([torch.ones_like(keep[:, :1]), keep], dim=1)
    return keep


class StageTimer:
    """Wall time per named stage of a method's pipeline (e.g. "unet", "refine"), summed over
    calls; on CUDA the device is synchronised at stage boundaries so the times are real.

        with self.timer("unet"):
            ...
        self.timer.totals  # {"unet": seconds, ...}; self.timer.reset()
    """

    def __init__(self):
        self.totals: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def reset(self) -> None:
        self.totals.clear()
        self.counts.clear()

    def __call__(self, stage: str, device: torch.device | str | None = None):
        import contextlib
        import time

        dev = torch.device(device) if device is not None else None

        @contextlib.contextmanager
        def ctx():
            if dev is not None and dev.type == "cuda":
                torch.cuda.synchronize(dev)
            t0 = time.perf_counter()
            try:
                yield
            finally:
                if dev is not None and dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                self.totals[stage] = self.totals.get(stage, 0.0) + time.perf_counter() - t0
                self.counts[stage] = self.counts.get(stage, 0) + 1

        return ctx()


def grid_seeds(h: int, w: int, number: int, device=None) -> torch.Tensor:
    """Row-major indices of a grid of k-means seeds on an h x w grid: rows and columns
    ``0, s, 2s, ... < side`` with ``s = side // sqrt(number)`` (at least 1). The references' seeding:
    iSeg's KL clustering (64x64, 32 -> s = 11, 36 seeds) and DiCLIP's ACR (20x20, 9 -> s = 6,
    {0, 6, 12, 18}^2 = 16 seeds, not 9)."""
    import math

    if not is_int(number, 1):
        raise ValueError(f"grid_seeds: number must be an int >= 1, got {number!r}")
    root = math.sqrt(number)
    rows = torch.arange(0, h, max(1, int(h // root)))
    cols = torch.arange(0, w, max(1, int(w // root)))
    return (rows[:, None] * w + cols[None, :]).flatten().to(device)


_SHIFTS = [(0, 0), (0, 1), (0, 2), (1, 0), (1, 2), (2, 0), (2, 1), (2, 2)]  # a 3x3 kernel's 8 neighbours


def dilated_neighbours(x: torch.Tensor, dilations: Sequence[int], centre: bool = False) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, N, H, W): each pixel's 8 neighbours of a 3x3 kernel at every dilation in turn
    (replicate padding; N = 8 per dilation, 9 with ``centre``, the pixel itself first). The local
    neighbourhoods of PAMR and DiCLIP's PAR."""
    b, c, h, w = x.shape
    shifts = ([(1, 1)] if centre else []) + _SHIFTS
    kernel = torch.zeros(len(shifts), 1, 3, 3, dtype=x.dtype, device=x.device)
    for i, (y, xx) in enumerate(shifts):
        kernel[i, 0, y, xx] = 1
    out = []
    for d in dilations:
        xp = F.pad(x, [int(d)] * 4, mode="replicate").reshape(b * c, 1, h + 2 * d, w + 2 * d)
        out.append(F.conv2d(xp, kernel, dilation=int(d)).view(b, c, -1, h, w))
    return torch.cat(out, dim=2)


PAMR_DILATIONS = (1, 2, 4, 8, 12, 24)  # the TCL protocol's


def check_pamr_options(owner: str, iterations, dilations,
                       names: tuple[str, str] = ("pamr_iterations", "pamr_dilations")) -> None:
    """PAMR's two settings, as the ``pamr_iterations`` / ``pamr_dilations`` fields of a method config
    (``owner``: its class name) or :class:`PAMR`'s own arguments (``names``): raises ValueError naming
    ``owner.<name>`` unless iterations is an int >= 0 and dilations a non-empty list of ints >= 1."""
    if not is_int(iterations, 0):
        raise ValueError(f"{owner}.{names[0]}: expected an int >= 0 (0 = no PAMR), got {iterations!r}")
    if not isinstance(dilations, (tuple, list)) or not dilations or any(
            not is_int(d, 1) for d in dilations):
        raise ValueError(f"{owner}.{names[1]}: expected a non-empty list of ints >= 1, got {dilations!r}")


class PAMR(torch.nn.Module):
    """Pixel-adaptive mask refinement (Araslanov & Roth, CVPR 2020; the TCL evaluation protocol that SynSeg
    follows runs it with 10 iterations at dilations 1, 2, 4, 8, 12, 24). Affinity of a pixel to each of its
    neighbours: softmax over the neighbours of the channel mean of ``-|I_n - I| / (0.1 * sigma)``, sigma the
    per-channel standard deviation over the pixel's neighbourhoods (centre included); each iteration
    replaces every mask value by the affinity-weighted sum of its neighbours' values."""

    def __init__(self, iterations: int = 10, dilations: Sequence[int] = PAMR_DILATIONS):
        super().__init__()
        dilations = tuple(dilations)
        check_pamr_options("PAMR", iterations, dilations, names=("iterations", "dilations"))
        self.iterations, self.dilations = iterations, dilations

    def forward(self, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """images: (B, 3, H, W) float; masks: (B, K, h, w), resized bilinearly (align_corners=True) to the
        images. Returns (B, K, H, W) float."""
        if images.dim() != 4 or masks.dim() != 4 or images.shape[0] != masks.shape[0]:
            raise ValueError(f"PAMR: expected images (B, 3, H, W) and masks (B, K, h, w) with the same B, got "
                             f"{tuple(images.shape)} and {tuple(masks.shape)}")
        images = images.float()
        masks = F.interpolate(masks.float(), size=images.shape[-2:], mode="bilinear", align_corners=True)
        if self.iterations == 0 or masks.shape[1] == 0:
            return masks
        sigma = dilated_neighbours(images, self.dilations, centre=True).std(dim=2, keepdim=True)
        diff = (dilated_neighbours(images, self.dilations) - images.unsqueeze(2)).abs()
        aff = F.softmax((-diff / (1e-8 + 0.1 * sigma)).mean(dim=1, keepdim=True), dim=2)
        for _ in range(self.iterations):
            masks = (dilated_neighbours(masks, self.dilations) * aff).sum(2)
        return masks


def pamr_maps(images, maps: torch.Tensor, iterations: int, dilations: Sequence[int] = PAMR_DILATIONS
              ) -> torch.Tensor:
    """A method's optional PAMR step: ``maps`` (B, K, H, W) refined on ``images`` (uint8 RGB, (B, 3, H, W)
    or a list of same-sized (3, H, W)) by :class:`PAMR` with ``iterations`` (0: ``maps`` unchanged), on the
    maps' device. The methods run it on their [0, 1] class maps before the background rule, so a constant
    background score is unaffected (PAMR keeps constants)."""
    if not iterations:
        return maps
    imgs = images if isinstance(images, torch.Tensor) else torch.stack(list(images))
    return PAMR(iterations, dilations)(imgs.to(maps.device).float().div(255), maps)
