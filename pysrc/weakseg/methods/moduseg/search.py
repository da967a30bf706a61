"""ModuSeg's retrieval: the k most similar bank rows of each proposal vector and their vote.

Backends (``ModuSegConfig.search``): ``weakseg.ops.knn_vote`` ("op", K = 25, cosine; never holds the
queries x bank similarities on the GPU), one GEMM + ``torch.topk`` (:func:`exact_topk`, "gemm"; the
same neighbours), "auto" (the op, on every device) or FAISS (:class:`FaissSearch`, "faiss":
``IndexFlatIP``, ``IndexIVFFlat`` above ``faiss_ivf_threshold`` bank rows, nlist = min(sqrt N, 1024),
nprobe = min(32, nlist)). Every backend votes with the one rule of the op,
:func:`weakseg.ops.knn_vote.knn_vote_from_neighbors` (winner = most votes, then the larger summed
similarity, then the smaller class id; confidence = mean similarity of the winning voters).

Differences from the reference code, each deliberate:
- vote ties in (count, summed similarity) go to the smaller class id (the ``knn_vote`` op's contract);
  the reference takes the label seen first in rank order. Exact float ties only.
- FAISS IVF is trained on the bank in its fixed (image, class) order, so results are reproducible.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from weakseg.ops.knn_vote import knn_vote_from_neighbors

__all__ = ["exact_topk", "FaissSearch", "vote_from_neighbors", "resolve_search", "search_bank"]


def vote_from_neighbors(sims: torch.Tensor, idx: torch.Tensor, bank_labels: torch.Tensor, num_classes: int):
    """The ``knn_vote`` rule on given neighbours: sims / idx (Q, k) (idx -1 = no neighbour) -> (labels,
    confidence, votes) exactly as the op decides (:func:`weakseg.ops.knn_vote.knn_vote_from_neighbors`
    on the neighbours' ``bank_labels``; label -1 without voters)."""
    lab = torch.where(idx >= 0, bank_labels[idx.clamp_min(0)], torch.full_like(idx, -1))
    return knn_vote_from_neighbors(sims, lab, num_classes)


def exact_topk(queries: torch.Tensor, bank: torch.Tensor, k: int, bank_normalized: bool = False
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """The k most cosine-similar bank rows of each query (both sides L2-normalised here, the bank only
    unless ``bank_normalized`` says its rows are unit already): one GEMM for
    (Q, N) similarities, ``torch.topk``; ties at the k-th similarity go to the smaller row index (the
    rows with such a tie are re-ordered by a stable sort). k is clipped to N. -> (sims, idx) (Q, k)."""
    q = F.normalize(queries.float(), dim=1)
    b = bank.float() if bank_normalized else F.normalize(bank.float(), dim=1)
    k = min(int(k), b.shape[0])
    if k == 0 or q.shape[0] == 0:
        return q.new_zeros(q.shape[0], k), torch.zeros(q.shape[0], k, dtype=torch.int64, device=q.device)
    sims = q @ b.T
    vals, idx = sims.topk(k, dim=1)
    tie = (sims >= vals[:, -1:]).sum(1) > k
    if bool(tie.any()):
        v, i = torch.sort(sims[tie], dim=1, descending=True, stable=True)
        vals[tie], idx[tie] = v[:, :k], i[:, :k]
    return vals, idx


def _import_faiss():
    try:
        import faiss
    except ImportError:
        raise ImportError("ModuSegConfig.search='faiss' needs the faiss package (pip install faiss-cpu, or "
                          "faiss-gpu); search='auto', 'gemm' or 'op' needs nothing extra") from None
    return faiss


class FaissSearch:
    """Inner-product search over the (unit-row) bank with FAISS: ``IndexFlatIP`` (exact) up to
    ``ivf_threshold`` rows, else ``IndexIVFFlat`` with nlist = min(sqrt N, nlist_max) lists and
    nprobe = min(nprobe, nlist) (approximate). Always on the CPU (the op is the GPU path)."""

    def __init__(self, vectors: torch.Tensor, *, ivf_threshold: int = 100_000, nlist_max: int = 1024,
                 nprobe: int = 32, seed: int = 0):
        faiss = _import_faiss()
        x = np.ascontiguousarray(F.normalize(vectors.detach().float().cpu(), dim=1).numpy())
        self.n, self.d = x.shape
        self.kind = "flat"
        if self.n > ivf_threshold:
            self.kind = "ivf"
            self.nlist = max(1, min(int(math.sqrt(self.n)), nlist_max))
            self.nprobe = max(1, min(nprobe, self.nlist))
            quantizer = faiss.IndexFlatIP(self.d)
            index = faiss.IndexIVFFlat(quantizer, self.d, self.nlist, faiss.METRIC_INNER_PRODUCT)
            index.cp.seed = int(seed)
            index.train(x)
            index.add(x)
            index.nprobe = self.nprobe
            self._quantizer = quantizer  # keep alive
        else:
            index = faiss.IndexFlatIP(self.d)
            index.add(x)
        self.index = index

    def search(self, queries: torch.Tensor, k: int, rows: torch.Tensor | None = None):
        """(sims (Q, k'), idx (Q, k')) with k' = min(k, candidates); ``rows``: restrict to these bank rows."""
        faiss = _import_faiss()
        q = np.ascontiguousarray(F.normalize(queries.detach().float().cpu(), dim=1).numpy())
        n = self.n if rows is None else int(rows.numel())
        k = min(int(k), n)
        if q.shape[0] == 0 or k == 0:
            return torch.zeros(q.shape[0], k), torch.full((q.shape[0], k), -1, dtype=torch.int64)
        params = None
        if rows is not None:
            sel = faiss.IDSelectorBatch(np.ascontiguousarray(rows.cpu().numpy().astype(np.int64)))
            params = (faiss.SearchParametersIVF(sel=sel, nprobe=self.nprobe) if self.kind == "ivf"
                      else faiss.SearchParameters(sel=sel))
        D, I = self.index.search(q, k, params=params) if params is not None else self.index.search(q, k)
        return torch.from_numpy(D.copy()), torch.from_numpy(I.astype(np.int64))


def resolve_search(mode: str, device: torch.device) -> str:
    """The backend ``ModuSegConfig.search`` names on ``device``: "auto" is the op on every device (its CPU
    kernel overtook one GEMM + top-k at every ModuSeg shape: benchmarks/results/moduseg_search_cpu_2026-12-06.md)."""
    return "op" if mode == "auto" else mode


def search_bank(seg, queries: torch.Tensor, rows: torch.Tensor | None = None):
    """KNN vote of unit ``queries`` (Q, D) against the bank of the ModuSeg segmenter ``seg`` (or its
    ``rows``) with the configured backend (:meth:`ModuSeg.search` calls this) -> (labels, confidence,
    votes) in bank class ids. The FAISS index is built on first use and kept in ``seg._faiss``."""
    if seg.bank is None:
        raise RuntimeError("ModuSeg: no feature bank loaded (set bank=PATH or build one with `weakseg bank build`)")
    cfg = seg.config
    nc = len(seg.bank.class_names)
    mode = resolve_search(cfg.search, seg._bank_vectors.device)
    if mode == "gemm":
        bank, labels = seg._bank_vectors, seg._bank_labels
        if rows is not None:
            bank, labels = bank[rows.to(bank.device)], labels[rows.to(bank.device)]
        sims, idx = exact_topk(queries.to(bank.device, torch.float32), bank, cfg.k, bank_normalized=True)
        lab, conf, votes = vote_from_neighbors(sims, idx, labels, nc)
        return lab.cpu(), conf.cpu(), votes.cpu()
    if mode == "op":
        from weakseg.ops import knn_vote

        bank, labels = seg._bank_vectors, seg._bank_labels
        if rows is not None:
            bank, labels = bank[rows.to(bank.device)], labels[rows.to(bank.device)]
        lab, conf, votes = knn_vote(queries.to(bank.device, torch.float32), bank, labels, cfg.k, nc)
        return lab.cpu(), conf.cpu(), votes.cpu()
    if seg._faiss is None:
        seg._faiss = FaissSearch(seg.bank.vectors, ivf_threshold=cfg.faiss_ivf_threshold,
                                 nlist_max=cfg.faiss_nlist_max, nprobe=cfg.faiss_nprobe, seed=cfg.seed)
    sims, idx = seg._faiss.search(queries, cfg.k, rows)
    return vote_from_neighbors(sims, idx, seg.bank.labels.cpu(), nc)
