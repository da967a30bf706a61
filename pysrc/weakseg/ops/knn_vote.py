"""``knn_vote``: cosine k-nearest-neighbour retrieval and majority vote.

Contract (docs/design.md, op 4): queries (Q, D) and bank (N, D) are L2-normalised
inside; the k most similar bank rows (k clipped to N; equal similarities rank
the smaller bank index first) vote with their label; the winner has most
votes, ties broken by the larger sum of its voters' similarities, then the
smaller class id; confidence is the mean similarity of the winner's voters;
votes (Q, num_classes) are int64 counts. With an empty bank every query gets
label -1, confidence 0. Similarities are computed in float32; a NaN similarity
(from non-finite inputs) ranks last, like -inf. ``num_classes`` is at most
``MAX_CLASSES`` = 2**16: votes hold Q x num_classes int64 counts and every
CPU worker a num_classes float buffer, so an unbounded num_classes turns a
typo into a multi-GiB allocation (2**31 classes get the process killed); 2**16
keeps one query's vote row at 512 KiB and is far above the largest label
spaces in use (ImageNet-21k's 21,841 classes; LVIS 1,203; ADE20K-full 3,688).

The compiled kernels stream the bank in tiles (one GEMM per tile) and keep a
running top-k per query, so no Q x N matrix is ever formed.

The vote rule on given neighbours is defined once, in pure PyTorch:
:func:`knn_vote_from_neighbors`; :func:`knn_vote_reference` and every exact or
approximate search outside the op (ModuSeg's GEMM and FAISS paths) vote with it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from weakseg.core import is_int
from weakseg.ops._common import check, has_library_op, has_values, run_op

__all__ = ["knn_vote", "knn_vote_reference", "knn_vote_from_neighbors", "MAX_CLASSES"]

MAX_CLASSES = 1 << 16  # the same bound as the compiled op (csrc/ops/knn_vote.h)


def _check(queries, bank, bank_labels, k, num_classes) -> None:
    op = "knn_vote"
    for name, t in (("queries", queries), ("bank", bank), ("bank_labels", bank_labels)):
        check(isinstance(t, torch.Tensor), op, f"expected {name} to be a tensor, got {type(t).__name__}", TypeError)
    check(queries.dim() == 2, op, f"expected queries of shape (Q, D), got {tuple(queries.shape)}")
    check(bank.dim() == 2, op, f"expected bank of shape (N, D), got {tuple(bank.shape)}")
    check(bank_labels.dim() == 1, op, f"expected bank_labels of shape (N,), got {tuple(bank_labels.shape)}")
    check(queries.is_floating_point(), op, f"expected floating-point queries, got {queries.dtype}", TypeError)
    check(bank.is_floating_point(), op, f"expected a floating-point bank, got {bank.dtype}", TypeError)
    check(bank_labels.dtype in (torch.int64, torch.int32), op,
          f"expected bank_labels of dtype int64 or int32, got {bank_labels.dtype}", TypeError)
    check(queries.device == bank.device == bank_labels.device, op,
          f"expected queries, bank and bank_labels on one device, got {queries.device}, {bank.device} "
          f"and {bank_labels.device}")
    check(queries.shape[1] == bank.shape[1], op,
          f"queries and bank must have the same feature size D, got {queries.shape[1]} and {bank.shape[1]}")
    check(bank_labels.shape[0] == bank.shape[0], op,
          f"bank_labels must have one label per bank row: {bank_labels.shape[0]} labels for {bank.shape[0]} rows")
    check(is_int(k, 1), op, f"k must be an int >= 1, got {k!r}")
    check(is_int(num_classes, 1) and num_classes <= MAX_CLASSES, op,
          f"num_classes must be an int in [1, {MAX_CLASSES}], got {num_classes!r}")
    if bank_labels.numel() and has_values(bank_labels):  # traced (fake) labels: the compiled op checks them
        lo, hi = int(bank_labels.min()), int(bank_labels.max())
        check(lo >= 0 and hi < num_classes, op,
              f"bank_labels must lie in [0, num_classes={num_classes}), found values in [{lo}, {hi}]")


def knn_vote_from_neighbors(sims: torch.Tensor, labels: torch.Tensor, num_classes: int):
    """The vote rule of :func:`knn_vote`, on given neighbours: ``sims`` (Q, k) float similarities and
    ``labels`` (Q, k) integer class ids in [0, num_classes) of each query's neighbours (label -1: no
    neighbour in that slot; it neither votes nor adds to a sum) -> (labels (Q,) int64, confidence (Q,)
    float32, votes (Q, num_classes) int64).

    The winner has most votes, ties broken by the larger sum of its voters' similarities (summed in
    float32 in the given neighbour order), then the smaller class id; confidence = that sum / its
    votes (the mean similarity of the winning voters). A query without any neighbour gets label -1 and
    confidence 0. Pure PyTorch, on the device of ``sims``."""
    Q = sims.shape[0]
    dev = sims.device
    labels = labels.to(dev, torch.int64)
    valid = labels >= 0
    # slot -1 votes into an extra column (num_classes) that is cut off
    lab = torch.where(valid, labels, torch.full_like(labels, num_classes))
    votes = torch.zeros(Q, num_classes + 1, dtype=torch.int64, device=dev).scatter_add_(1, lab, valid.long())
    sums = torch.zeros(Q, num_classes + 1, dtype=torch.float32, device=dev).scatter_add_(
        1, lab, torch.where(valid, sims.float(), torch.zeros((), dtype=torch.float32, device=dev)))
    votes, sums = votes[:, :num_classes].contiguous(), sums[:, :num_classes]
    best = votes.max(dim=1, keepdim=True).values
    # Among the classes with most votes, the largest sum; argmax takes the first (smallest id) on ties.
    masked = torch.where(votes == best, sums, torch.full_like(sums, float("-inf")))
    winner = masked.argmax(dim=1)
    win_votes = votes.gather(1, winner[:, None]).squeeze(1)
    conf = sums.gather(1, winner[:, None]).squeeze(1) / win_votes.clamp_min(1)
    none = ~valid.any(1)
    winner = torch.where(none, torch.full_like(winner, -1), winner)
    conf = torch.where(none, torch.zeros_like(conf), conf)
    return winner, conf, votes


def knn_vote_reference(queries, bank, bank_labels, k: int, num_classes: int):
    """Pure-PyTorch KNN vote (materialises Q x N); same contract as :func:`knn_vote`."""
    _check(queries, bank, bank_labels, k, num_classes)
    Q, N = queries.shape[0], bank.shape[0]
    dev = queries.device
    k = min(k, N)
    labels = torch.full((Q,), -1, dtype=torch.int64, device=dev)
    conf = torch.zeros(Q, dtype=torch.float32, device=dev)
    votes = torch.zeros(Q, num_classes, dtype=torch.int64, device=dev)
    if Q == 0 or k == 0:
        return labels, conf, votes
    q = F.normalize(queries.float(), dim=1)
    b = F.normalize(bank.float(), dim=1)
    sims = (q @ b.T).nan_to_num(nan=float("-inf"))  # NaN ranks last, as -inf
    # A stable descending sort ranks equal similarities by ascending bank index.
    vals, idx = torch.sort(sims, dim=1, descending=True, stable=True)
    vals, idx = vals[:, :k], idx[:, :k]
    return knn_vote_from_neighbors(vals, bank_labels.long()[idx], num_classes)


def knn_vote(queries, bank, bank_labels, k: int, num_classes: int):
    """Cosine KNN of ``queries`` in ``bank`` and a majority vote -> (labels, confidence, votes)."""
    _check(queries, bank, bank_labels, k, num_classes)
    return run_op("knn_vote", knn_vote_reference, queries.device, queries, bank, bank_labels, int(k), int(num_classes))


if has_library_op("knn_vote"):

    @torch.library.register_fake("weakseg::knn_vote")
    def _fake(queries, bank, bank_labels, k, num_classes):
        Q = queries.shape[0]
        return (queries.new_empty((Q,), dtype=torch.int64), queries.new_empty((Q,), dtype=torch.float32),
                queries.new_empty((Q, num_classes), dtype=torch.int64))
