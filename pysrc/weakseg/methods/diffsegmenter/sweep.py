"""The reference's background-threshold protocol (:func:`sweep_bg_threshold`): τ swept over a set of
images, the best mIoU kept. docs/specs/diffsegmenter_iseg.md (prefix DS).
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch

from weakseg.methods.common import has_background

__all__ = ["sweep_bg_threshold"]


def sweep_bg_threshold(pairs: Iterable[tuple[torch.Tensor, torch.Tensor]], class_names: Sequence[str],
                       thresholds: Sequence[float] | None = None, ignore_index: int = 255,
                       convention: str = "all") -> tuple[float, dict[float, float]]:
    """The reference's τ protocol (DS: evaluation_voc12.py): for every τ in ``thresholds`` (default
    0.30, 0.31, …, 0.74) label each image by argmax([τ, fg scores]) and compute the dataset mIoU
    (``convention`` of ``ConfusionMatrix.miou``; "all" is DS's mean over every class). ``pairs`` yields
    (scores, gt): the method's scores (1, C, H, W) or (C, H, W) (channel 0, the background, is replaced
    by τ) and the ground truth (H, W) int. Returns (best τ, {τ: mIoU}).

    NOTE: the reference tunes τ on the **evaluation set** itself and reports the best mIoU, an optimistic
    protocol; to avoid it, sweep on a held-out split and fix ``bg_threshold`` for the evaluation."""
    from weakseg.eval.metrics import ConfusionMatrix

    if not has_background(class_names):
        raise ValueError("sweep_bg_threshold: class_names has no background class (channel 0) to threshold")
    taus = [round(0.30 + 0.01 * i, 2) for i in range(45)] if thresholds is None else [float(t) for t in thresholds]
    if not taus:
        raise ValueError("sweep_bg_threshold: thresholds is empty")
    C = len(class_names)
    cms = {t: ConfusionMatrix(C, ignore_index=ignore_index) for t in taus}
    n = 0
    for scores, gt in pairs:
        s = scores[0] if scores.dim() == 4 else scores
        if s.shape[0] != C or s.shape[-2:] != gt.shape[-2:]:
            raise ValueError(f"sweep_bg_threshold: scores {tuple(scores.shape)} do not match {C} classes and the "
                             f"ground truth {tuple(gt.shape)}")
        fg = s[1:].float()
        for t in taus:
            full = torch.cat([torch.full_like(fg[:1], t), fg])
            cms[t].update(full.argmax(0), gt.long())
        n += 1
    if n == 0:
        raise ValueError("sweep_bg_threshold: pairs is empty")
    curve = {t: float(cm.miou(convention)) for t, cm in cms.items()}
    best = max(taus, key=lambda t: (curve[t], -t))
    return best, curve
