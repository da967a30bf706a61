"""A faithful transcription of the parts of the ModuSeg authors' code (Autumnair007/ModuSeg) that weakseg's
benchmarks and tests compare against — an oracle and a baseline, not part of the package.

Sources: src/region_extractors.py (``_extract_class_regions``: per-class cv2 erosion and the area floor)
and src/inference.py (``predict_instances`` steps 3-6: normalise the queries, top-K search by FAISS or
the matrix-product fallback, the vote, per-class NMS, the sort; ``rasterize_instances``), at commit
49a77ff / f9aac1b. Changes, none semantic: the config constants are arguments; the class names of the
bank are given as a list (``all_labels``); the proposals and their query vectors are inputs (the
proposer and the feature extractor are the steps before).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Dict, List

import cv2
import numpy as np


# ------------------------------------------------------------------ src/region_extractors.py
def _erode_if_enabled(mask, kernel, iterations):
    return cv2.erode(mask, kernel, iterations=iterations)


def extract_class_regions(seg_map: np.ndarray, min_area: int, num_fg_classes: int, kernel_size: int = 3,
                          iterations: int = 20, background: bool = True):
    """``_extract_class_regions`` (``background=False``: the ade20k / cityscapes branch)."""
    kernel = np.ones((kernel_size, kernel_size), np.uint8)
    regions = []
    for cid in range(1, num_fg_classes + 1):
        mask_c = _erode_if_enabled((seg_map == cid).astype(np.uint8), kernel, iterations)
        if mask_c.sum() >= min_area:
            regions.append({"cls_id": cid, "mask": mask_c})

    if not background:
        return regions

    bg = _erode_if_enabled((seg_map == 0).astype(np.uint8), kernel, iterations)
    if bg.sum() >= min_area:
        regions.append({"cls_id": 0, "mask": bg})
    return regions


# ------------------------------------------------------------------ src/inference.py
def mask_iou(m1: np.ndarray, m2: np.ndarray) -> float:
    inter = np.logical_and(m1, m2).sum()
    union = np.logical_or(m1, m2).sum()
    return float(inter) / (float(union) + 1e-8)


def nms_masks(candidates: List[Dict[str, Any]], iou_thr: float, min_area: int) -> List[Dict[str, Any]]:
    keep = []
    candidates = sorted(candidates, key=lambda x: x['score'], reverse=True)
    for c in candidates:
        if c['mask'].sum() < min_area:
            continue
        ok = True
        for k in keep:
            if mask_iou(c['mask'], k['mask']) > iou_thr:
                ok = False
                break
        if ok:
            keep.append(c)
    return keep


def nms_masks_per_class(candidates: List[Dict[str, Any]], iou_thr: float, min_area: int) -> List[Dict[str, Any]]:
    cls_groups = defaultdict(list)
    for c in candidates:
        cls_groups[c['cls_name']].append(c)
    keep_all = []
    for cls_name, cls_candidates in cls_groups.items():
        keep = nms_masks(cls_candidates, iou_thr, min_area)
        keep_all.extend(keep)
    return keep_all


def retrieve(masks_original: List[np.ndarray], feature_list: List[np.ndarray], all_feats: np.ndarray,
             all_labels: List[str], faiss_index, nms_iou: float, topk_neigh: int, min_area: int):
    """``predict_instances`` from its step 2's output (bool masks, one feature vector each) on."""
    valid_features = []
    valid_masks_original = []
    for m_orig, vec in zip(masks_original, feature_list):
        if vec.shape[0] == all_feats.shape[1]:
            valid_features.append(vec)
            valid_masks_original.append(m_orig)
    if len(valid_features) == 0:
        return []

    query_feats = np.vstack([f.reshape(1, -1) for f in valid_features]).astype(np.float32)
    query_feats = query_feats / (np.linalg.norm(query_feats, axis=1, keepdims=True) + 1e-8)
    query_feats = np.ascontiguousarray(query_feats)

    k = min(topk_neigh, all_feats.shape[0])
    if k <= 0:
        return []

    if faiss_index is not None:
        D, I = faiss_index.search(query_feats, k)
        sims_batch = D
        idxs_batch = I
    else:
        sims_all = query_feats @ all_feats.T  # (N, M)
        idxs_batch = []
        sims_batch = []
        for i in range(sims_all.shape[0]):
            sims = sims_all[i]
            idxs = np.argpartition(sims, -k)[-k:]
            idxs = idxs[np.argsort(sims[idxs])[::-1]]
            idxs_batch.append(idxs)
            sims_batch.append(sims[idxs])
        sims_batch = np.array(sims_batch)
        idxs_batch = np.array(idxs_batch)

    candidates = []
    for m, sims, idxs in zip(valid_masks_original, sims_batch, idxs_batch):
        votes, label_sums = {}, {}
        for rank, idx in enumerate(idxs):
            lab = all_labels[idx]
            lab = 'background' if (lab == 'background' or str(lab).startswith('background_')) else lab
            s = float(sims[rank])
            votes[lab] = votes.get(lab, 0) + 1
            label_sums[lab] = label_sums.get(lab, 0.0) + s

        best_lab, best_votes, best_sum = None, -1, -1e9
        for lab in votes:
            v = votes[lab]
            s = label_sums[lab]
            if v > best_votes or (v == best_votes and s > best_sum):
                best_votes, best_sum, best_lab = v, s, lab
        avg_score = label_sums[best_lab] / max(votes[best_lab], 1)
        candidates.append({'mask': m, 'cls_name': best_lab, 'score': float(avg_score)})

    final_instances = nms_masks_per_class(candidates, nms_iou, min_area)
    final_instances = sorted(final_instances, key=lambda x: x['score'], reverse=True)
    return final_instances


def rasterize_instances(instances: List[Dict[str, Any]], h: int, w: int, dataset_classes: List[str]) -> np.ndarray:
    label_map = {name: i + 1 for i, name in enumerate(dataset_classes)}
    sem = np.zeros((h, w), dtype=np.uint8)
    for inst in instances:
        cls = inst['cls_name']
        if cls == 'background' or cls not in label_map:
            continue
        m = inst['mask']
        sem[m & (sem == 0)] = label_map[cls]
    return sem
