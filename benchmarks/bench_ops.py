"""Op microbenchmarks: verify against the reference, then time (CPU, and CUDA when present).

    python benchmarks/bench_ops.py --out benchmarks/results [--ops erode knn_vote] [--quick]

The cases and the timing are weakseg.bench's (``weakseg bench``); this script adds, on the CPU,
ModuSeg's real knn_vote shapes (one image's proposals against a large bank) and a P x K grid for
refine_propagate, and a column with the weakseg kernel's speed-up against every implementation of
the same case (reference, torch mm+topk, FAISS IndexFlatIP, OpenCV), all measured in the same run.
Every implementation is still checked against the reference on the case's inputs before it is timed.
"""

from __future__ import annotations

import sys

import torch

from weakseg import bench as _bench
from weakseg import ops
from weakseg.cli import main

_base_knn_cases = _bench._knn_cases
_base_refine_cases = _bench._refine_cases
_base_run_cases = _bench.run_cases

# ModuSeg on the CPU: Q = the proposals of one image (about 50-300), a bank of 10^4 - 10^6 rows of
# CLIP features (D = 768 / 1024), k = 25. The 10^6-row bank is 4 GiB of float32; it comes last and
# its inputs are made only when the earlier cases are done.
_MODUSEG_KNN = [(200, 100_000, 768, 25, 21), (100, 1_000_000, 1024, 25, 21)]
# refine_propagate: every P x K of this grid (N = 10 steps, ent 0.015, as iSeg).
_REFINE_GRID_P = (256, 1024, 4096)
_REFINE_GRID_K = (1, 8, 20)


def _knn_case(device, Q, N, D, k, C, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(Q, D, generator=g).to(device)
    b = torch.randn(N, D, generator=g).to(device)
    bl = torch.randint(0, C, (N,), generator=g).to(device)
    impls = [("weakseg", lambda: ops.knn_vote(q, b, bl, k, C)),
             ("reference", lambda: ops.knn_vote_reference(q, b, bl, k, C)),
             ("torch mm+topk", lambda: _bench._mm_topk_vote(q, b, bl, k, C))]
    fa = _bench._faiss_vote(q, b, bl, k, C) if device == "cpu" else None
    if fa is not None:
        impls.append(("faiss IndexFlatIP", fa))
    return f"Q{Q} N{N} D{D} k{k}", impls, _bench._labels_agree


def _knn_cases(device: str, quick: bool):
    yield from _base_knn_cases(device, quick)
    if device != "cpu" or quick:
        return
    for i, spec in enumerate(_MODUSEG_KNN):
        yield _knn_case(device, *spec, seed=30 + i)


def _refine_cases(device: str, quick: bool):
    cases = list(_base_refine_cases(device, quick))
    if device != "cpu" or quick:
        return cases
    seen = {name for name, _, _ in cases}
    g = torch.Generator().manual_seed(40)
    for P in _REFINE_GRID_P:
        attn = (torch.randn(1, P, P, generator=g) * 4).softmax(-1).to(device)
        for K in _REFINE_GRID_K:
            name = f"B1 P{P} K{K} N10 ent0.015"
            if name in seen:
                continue
            maps = torch.rand(1, P, K, generator=g).to(device)
            impls = [("weakseg", lambda a=attn, m=maps: ops.refine_propagate(a, m, 0.015, 10)),
                     ("reference", lambda a=attn, m=maps: ops.refine_propagate_reference(a, m, 0.015, 10))]
            cases.append((name, impls, _bench._maps_close(1e-3)))
    return cases


def _run_cases(op: str, device: str, quick: bool):
    """weakseg.bench.run_cases, plus each row's "weakseg_speedup": its ms over the weakseg kernel's ms in
    the same case (the first implementation whose name starts with "weakseg")."""
    rows = _base_run_cases(op, device, quick)
    for r in rows:
        ours = next(x for x in rows if x.case == r.case and x.impl.startswith("weakseg"))
        r.extra["weakseg_speedup"] = round(r.ms / ours.ms, 3)
    return rows


def _format_table(rows) -> str:
    mem = any("peak_extra_mib" in r.extra for r in rows)
    lines = ["| op | device | case | implementation | ms (median) | speed-up vs reference | weakseg speed-up vs this "
             "| check |" + (" peak extra MiB |" if mem else ""),
             "|---|---|---|---|---:|---:|---:|---|" + ("---:|" if mem else "")]
    for r in rows:
        ws = r.extra.get("weakseg_speedup")
        line = (f"| {r.op} | {r.device} | {r.case} | {r.impl} | {r.ms:.3f} | {r.vs_reference:.2f}x | "
                f"{'' if ws is None else f'{ws:.2f}x'} | {r.check} |")
        if mem:
            line += f" {r.extra.get('peak_extra_mib', '')} |"
        lines.append(line)
    return "\n".join(lines)


_bench.CASES["knn_vote"] = _knn_cases
_bench.CASES["refine_propagate"] = _refine_cases
_bench.run_cases = _run_cases
_bench.format_table = _format_table

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
