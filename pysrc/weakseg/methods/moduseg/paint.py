"""ModuSeg's painting of one image's voted proposals: optional per-class NMS (:func:`nms_per_class`,
IoU 0.4), then the proposals painted in ascending confidence so the most confident wins
(:func:`paint`); proposals voted background and pixels no proposal claims become background (or
``ignore`` with ``unassigned="ignore"``)."""

from __future__ import annotations

import numpy as np
import torch

from weakseg.core import IGNORE_INDEX
from weakseg.methods.moduseg.config import ModuSegConfig

__all__ = ["nms_per_class", "paint", "unassigned_label"]


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
    flat = masks.flatten(1).to(torch.bool).cpu().numpy()  # numpy's bool counts beat torch's on the CPU
    area = np.array([np.count_nonzero(r) for r in flat], dtype=np.int64)  # row by row: faster than the axis=1 form
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


def unassigned_label(config: ModuSegConfig) -> int:
    """The label of pixels no proposal claims: 0 (background) or the ignore index."""
    return 0 if config.unassigned == "background" else IGNORE_INDEX


def paint(config: ModuSegConfig, masks, lab, conf, votes, to_out, bg_out: bool, label_map: torch.Tensor,
          score_map: torch.Tensor) -> None:
    """Paint one image's voted proposals into ``label_map`` (H, W) and ``score_map`` (C, H, W), with
    ``config``'s NMS and unassigned label: background-voted (and unrequested) ones first, then the
    others by ascending confidence, each over the earlier ones. Every pixel records the proposal that
    claims it last; the labels and the score channels are then gathered from that one index map (one
    gather, not a C x H x W write per proposal)."""
    C = score_map.shape[0]
    M = masks.shape[0]
    out = torch.where(lab >= 0, to_out[lab.clamp_min(0)], torch.full_like(lab, -1))
    is_fg = out >= 0
    if bg_out:
        is_fg &= out != 0
    if config.nms and M:
        keep = nms_per_class(masks, out, conf, config.nms_iou, config.min_area, disjoint=None)
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
    lab_of[1:] = torch.where(is_fg, out, torch.where((out == 0) & bg_out, 0, unassigned_label(config)))
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
