"""What every proposer returns (:class:`Proposals`: disjoint boolean masks with descending scores), the
painting that makes overlapping masks disjoint, and the proposer interface."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence, runtime_checkable

import numpy as np
import torch

__all__ = ["Proposals", "MaskProposer", "paint_disjoint", "check_image"]


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
