"""Microbenchmarks of the ops: every implementation is checked against the
reference on the benchmark's own inputs before it is timed, and speed-ups are
ratios measured in the same run (``weakseg bench``, ``make bench``).

Implementations per op: ``weakseg`` (compiled kernel), ``reference`` (the eager
PyTorch reference of weakseg.ops) and the field's usual tool where one exists
(OpenCV ``erode``; FAISS ``IndexFlatIP`` + vote; torch ``mm`` + ``topk`` + vote).
kl_kmeans has no such tool (sklearn's k-means is Euclidean); it is timed against its reference.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch.utils import benchmark as tbench

from weakseg import ops
from weakseg.io import write_text

__all__ = ["run_op_benchmarks", "Row", "machine_facts", "interleaved_ms", "write_vs_authors"]


@dataclass
class Row:
    op: str
    device: str
    case: str
    impl: str
    ms: float
    vs_reference: float | None = None
    check: str = ""
    extra: dict = field(default_factory=dict)


def _time_ms(fn: Callable[[], object], min_run_time: float) -> float:
    t = tbench.Timer(stmt="fn()", globals={"fn": fn})
    return t.blocked_autorange(min_run_time=min_run_time).median * 1e3


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------
# candidates: (name, fn) pairs; fn() -> output comparable with the reference's

def _erode_cases(device: str, quick: bool):
    g = torch.Generator().manual_seed(0)
    size = 128 if quick else 512
    cases = []
    for name, shape, k, it in [(f"1x{size}x{size} 3x3", (1, size, size), 3, 1),
                               (f"1x{size}x{size} 41x41", (1, size, size), 41, 1),
                               (f"1x{size}x{size} 3x3 x20", (1, size, size), 3, 20),
                               ("64x128x128 41x41", (8 if quick else 64, 128, 128), 41, 1)]:
        mask = (torch.rand(shape, generator=g) < 0.97).to(torch.uint8).to(device)
        impls = [("weakseg", lambda m=mask, k=k, it=it: ops.erode(m, k, it)),
                 ("reference", lambda m=mask, k=k, it=it: ops.erode_reference(m, k, it))]
        cv = _opencv_erode(mask, k, it) if device == "cpu" else None
        if cv is not None:
            impls.append(("opencv", cv))
        cases.append((name, impls, _exact))
    return cases


def _opencv_erode(mask, k, it):
    try:
        import cv2
        import numpy as np
    except ImportError:
        return None
    arrs = [m.numpy() for m in mask]
    kernel = np.ones((k, k), np.uint8)

    def run():
        return torch.from_numpy(np.stack([cv2.erode(a, kernel, iterations=it) for a in arrs]))

    return run


def _erode_labels_cases(device: str, quick: bool):
    g = torch.Generator().manual_seed(1)
    size = 128 if quick else 512
    small = torch.randint(0, 21, (1, 1, size // 32, size // 32), generator=g).float()
    lab = torch.nn.functional.interpolate(small, size=(size, size), mode="nearest")[0].long().to(device)
    impls = [("weakseg", lambda: ops.erode_labels(lab, 3, 20)),
             ("reference", lambda: ops.erode_labels_reference(lab, 3, 20))]
    if device == "cpu":
        try:
            import cv2
            import numpy as np

            arr = lab[0].numpy()
            classes = np.unique(arr)
            kernel = np.ones((3, 3), np.uint8)

            def per_class_opencv():  # ModuSeg's way: one erosion per class, then paint
                out = np.full_like(arr, 255)
                for c in classes:
                    keep = cv2.erode((arr == c).astype(np.uint8), kernel, iterations=20).astype(bool)
                    out[keep] = c
                return torch.from_numpy(out)[None]

            impls.append(("opencv per-class", per_class_opencv))
        except ImportError:
            pass
    return [(f"1x{size}x{size} int64, 21 classes, 3x3 x20", impls, _exact)]


def _masked_area_pool_cases(device: str, quick: bool):
    g = torch.Generator().manual_seed(2)
    cases = []
    spec = [(1, 20, 256, 16, 16, 256, 256)] if quick else [(1, 100, 1024, 32, 32, 512, 512),
                                                          (4, 32, 768, 14, 14, 224, 224)]
    for B, M, C, h, w, H, W in spec:
        feats = torch.randn(B, C, h, w, generator=g).to(device)
        masks = (torch.rand(B, M, H, W, generator=g) < 0.3).to(device)
        cases.append((f"B{B} M{M} C{C} {h}x{w} <- {H}x{W} bool",
                      [("weakseg", lambda f=feats, m=masks: ops.masked_area_pool(f, m)),
                       ("reference", lambda f=feats, m=masks: ops.masked_area_pool_reference(f, m))],
                      _close))
    return cases


# ModuSeg on the CPU: Q = the proposals of one image (about 50-300), a bank of 10^4 - 10^6 rows of CLIP
# features (D = 768 / 1024), k = 25. The 10^6-row bank is 4 GiB of float32: cases are generated one at a time.
_MODUSEG_KNN = [(200, 100_000, 768, 25, 21), (100, 1_000_000, 1024, 25, 21)]


def _knn_case(device: str, Q: int, N: int, D: int, k: int, C: int, g: torch.Generator):
    q = torch.randn(Q, D, generator=g).to(device)
    b = torch.randn(N, D, generator=g).to(device)
    bl = torch.randint(0, C, (N,), generator=g).to(device)
    impls = [("weakseg", lambda: ops.knn_vote(q, b, bl, k, C)),
             ("reference", lambda: ops.knn_vote_reference(q, b, bl, k, C)),
             ("torch mm+topk", lambda: _mm_topk_vote(q, b, bl, k, C))]
    fa = _faiss_vote(q, b, bl, k, C) if device == "cpu" else None
    if fa is not None:
        impls.append(("faiss IndexFlatIP", fa))
    return f"Q{Q} N{N} D{D} k{k}", impls, _labels_agree


def _knn_cases(device: str, quick: bool):
    g = torch.Generator().manual_seed(3)
    if quick:
        spec = [(100, 5000, 64, 25, 21)]
    elif device == "cuda":
        spec = [(10000, 1000000, 1024, 25, 81), (1000, 100000, 1024, 25, 21)]
    else:
        spec = [(1000, 100000, 256, 25, 21), (200, 20000, 1024, 25, 81)]
    for Q, N, D, k, C in spec:
        yield _knn_case(device, Q, N, D, k, C, g)
    if device == "cpu" and not quick:
        for i, (Q, N, D, k, C) in enumerate(_MODUSEG_KNN):
            yield _knn_case(device, Q, N, D, k, C, torch.Generator().manual_seed(30 + i))


def _kl_kmeans_cases(device: str, quick: bool):
    g = torch.Generator().manual_seed(4)
    cases = []
    # (name, B, map side, D, seed grid step, iterations): iSeg's 64x64 map of 77-d token vectors with
    # 6x6 grid seeds and 20 iterations; DiCLIP's ACR on 20x20 tokens with 400-d columns, {0,6,12,18}^2, 5 its.
    spec = [("iSeg", 1, 64, 77, 11, 20), ("DiCLIP ACR", 4, 20, 400, 6, 5)]
    if quick:
        spec = [("iSeg quick", 1, 32, 77, 6, 5), ("DiCLIP ACR quick", 2, 20, 400, 6, 2)]
    for name, B, side, D, step, it in spec:
        rows = torch.arange(0, side, step)
        seeds = (rows[:, None] * side + rows[None, :]).reshape(-1)
        # attention-like per-pixel distributions: smooth random logits over the map, softmax over D
        coarse = torch.randn(B, D, side // 8 + 1, side // 8 + 1, generator=g) * 3
        logits = torch.nn.functional.interpolate(coarse, size=(side, side), mode="bilinear", align_corners=False)
        x = torch.softmax(logits.flatten(2).transpose(1, 2) + 0.3 * torch.randn(B, side * side, D, generator=g), -1)
        x, seeds = x.to(device), seeds.to(device)
        impls = [("weakseg", lambda x=x, s=seeds, it=it: ops.kl_kmeans(x, s, it)),
                 ("reference", lambda x=x, s=seeds, it=it: ops.kl_kmeans_reference(x, s, it))]
        cases.append((f"{name} B{B} N{side * side} D{D} S{seeds.numel()} x{it}", impls, _labels_agree))
    return cases


def _vote_from(sims, idx, bl, C):
    """The op's vote rule (:func:`weakseg.ops.knn_vote_from_neighbors`) on neighbours found another way."""
    return ops.knn_vote_from_neighbors(sims, bl[idx], C)


def _mm_topk_vote(q, b, bl, k, C):
    qn = torch.nn.functional.normalize(q.float(), dim=1)
    bn = torch.nn.functional.normalize(b.float(), dim=1)
    sims, idx = (qn @ bn.T).topk(min(k, b.shape[0]), dim=1)
    return _vote_from(sims, idx, bl, C)


def _faiss_vote(q, b, bl, k, C):
    try:
        import faiss
    except ImportError:
        return None
    qn = torch.nn.functional.normalize(q.float(), dim=1).numpy()
    bn = torch.nn.functional.normalize(b.float(), dim=1).numpy()
    index = faiss.IndexFlatIP(bn.shape[1])
    index.add(bn)

    def run():
        D, I = index.search(qn, k)
        return _vote_from(torch.from_numpy(D), torch.from_numpy(I), bl, C)

    return run


def _refine_cases(device: str, quick: bool):
    g = torch.Generator().manual_seed(4)
    if quick:
        spec = [(1, 1024, 20, 10, 0.015)]
    elif device == "cuda":
        spec = [(1, 4096, 20, 10, 0.015), (4, 1600, 20, 5, 0.02), (1, 4096, 20, 50, 0.1)]
    else:
        spec = [(1, 1024, 20, 10, 0.015), (1, 2048, 20, 10, 0.015), (1, 4096, 20, 10, 0.015), (4, 1600, 20, 5, 0.02)]
    cases = []
    for B, P, K, N, ent in spec:
        # attention-like rows: a softmax of random logits
        attn = (torch.randn(B, P, P, generator=g) * 4).softmax(-1).to(device)
        maps = torch.rand(B, P, K, generator=g).to(device)
        impls = [("weakseg", lambda a=attn, m=maps, N=N, e=ent: ops.refine_propagate(a, m, e, N)),
                 ("reference", lambda a=attn, m=maps, N=N, e=ent: ops.refine_propagate_reference(a, m, e, N))]
        cases.append((f"B{B} P{P} K{K} N{N} ent{ent}", impls, _maps_close(1e-3)))
    if device == "cpu" and not quick:  # every P x K of a grid (N = 10, ent 0.015, as iSeg)
        seen = {name for name, _, _ in cases}
        g = torch.Generator().manual_seed(40)
        for P in (256, 1024, 4096):
            attn = (torch.randn(1, P, P, generator=g) * 4).softmax(-1).to(device)
            for K in (1, 8, 20):
                if f"B1 P{P} K{K} N10 ent0.015" not in seen:
                    maps = torch.rand(1, P, K, generator=g).to(device)
                    impls = [("weakseg", lambda a=attn, m=maps: ops.refine_propagate(a, m, 0.015, 10)),
                             ("reference", lambda a=attn, m=maps: ops.refine_propagate_reference(a, m, 0.015, 10))]
                    cases.append((f"B1 P{P} K{K} N10 ent0.015", impls, _maps_close(1e-3)))
    return cases


def _refine_qk_cases(device: str, quick: bool):
    g = torch.Generator().manual_seed(5)
    spec = [(1, 2, 1024, 64, 20, 10)] if quick else [(1, 2, 4096, 64, 20, 10), (1, 5, 4096, 64, 20, 10)]
    cases = []
    for B, H, P, d, K, N in spec:
        q = torch.randn(B, H, P, d, generator=g).to(device, torch.float16)
        k = torch.randn(B, H, P, d, generator=g).to(device, torch.float16)
        maps = torch.rand(B, P, K, generator=g).to(device)
        impls = [("weakseg qk", lambda q=q, k=k, m=maps, N=N: ops.refine_propagate_qk(q, k, m, 0.015, N)),
                 ("weakseg on stored attention",
                  lambda q=q, k=k, m=maps, N=N: ops.refine_propagate(ops.head_mean_attention(q, k), m, 0.015, N)),
                 ("reference", lambda q=q, k=k, m=maps, N=N: ops.refine_propagate_qk_reference(q, k, m, 0.015, N))]
        cases.append((f"B{B} H{H} P{P} d{d} K{K} N{N}", impls, _maps_close(2e-2 if device == "cuda" else 1e-3)))
    return cases


# ---------------------------------------------------------------------------------------------
# correctness checks: (output, reference) -> (ok, note)

def _exact(out, ref):
    ok = torch.equal(out.cpu(), ref.cpu())
    return ok, "exact" if ok else "MISMATCH"


def _close(out, ref):
    try:
        torch.testing.assert_close(out[0].cpu(), ref[0].cpu(), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(out[1].cpu(), ref[1].cpu(), rtol=1e-5, atol=1e-6)
        return True, "allclose"
    except AssertionError:
        return False, "MISMATCH"


def _maps_close(rel: float):
    """Maps agree within rel * max|reference| (float32 kernels against the eager float32
    sequence; 2e-2 for the bf16 T' of refine_propagate_qk on CUDA)."""
    def check(out, ref):
        err = (out.double().cpu() - ref.double().cpu()).abs().max().item()
        scale = ref.double().abs().max().item()
        return err <= rel * scale, f"max err {err / max(scale, 1e-30):.1e} x max"
    return check


def _labels_agree(out, ref):
    agree = (out[0].cpu() == ref[0].cpu()).float().mean().item()
    return agree >= 0.999, f"labels agree {agree:.4%}"


CASES = {
    "erode": _erode_cases,
    "erode_labels": _erode_labels_cases,
    "masked_area_pool": _masked_area_pool_cases,
    "knn_vote": _knn_cases,
    "refine_propagate": _refine_cases,
    "refine_propagate_qk": _refine_qk_cases,
    "kl_kmeans": _kl_kmeans_cases,
}


def run_cases(op: str, device: str, quick: bool) -> list[Row]:
    rows: list[Row] = []
    min_run = 0.05 if quick else 0.5
    for case, impls, checker in CASES[op](device, quick):
        ref_fn = dict(impls)["reference"]
        ref = ref_fn()
        _sync(device)
        times: dict[str, float] = {}
        notes: dict[str, str] = {}
        peaks: dict[str, float] = {}
        for name, fn in impls:
            out = fn()
            _sync(device)
            ok, note = (True, "oracle") if name == "reference" else checker(out, ref)
            if not ok:
                raise AssertionError(f"bench {op} [{device}] {case}: {name} disagrees with the reference ({note})")
            notes[name] = note
            times[name] = _time_ms(fn, min_run)
            if device == "cuda":
                peaks[name] = _peak_extra_mib(fn)
        ours = next(t for name, t in times.items() if name.startswith("weakseg"))
        for name, _ in impls:
            # the weakseg kernel's speed-up against this implementation, in the same run
            extra = {"weakseg_speedup": round(times[name] / ours, 3)}
            if name in peaks:
                extra["peak_extra_mib"] = round(peaks[name], 1)
            rows.append(Row(op, device, case, name, times[name], times["reference"] / times[name], notes[name], extra))
    return rows


def _peak_extra_mib(fn) -> float:
    """Peak CUDA memory allocated by one call beyond what was allocated before it."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    del out
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def format_table(rows: list[Row]) -> str:
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


def machine_facts(devices) -> dict:
    facts = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        # other jobs on the machine skew CPU timings: the load when the run ended
        "load_avg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }
    if "cuda" in devices:
        facts["gpu"] = torch.cuda.get_device_name(0)
    return facts


def run_op_benchmarks(ops: list[str] | None = None, devices: list[str] | None = None, out: str | None = None,
                      quick: bool = False) -> int:
    names = ops or list(CASES)
    unknown = [n for n in names if n not in CASES]
    if unknown:
        raise ValueError(f"unknown op(s) {unknown}; known: {list(CASES)}")
    devices = devices or (["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    for d in devices:
        if d not in ("cpu", "cuda"):
            raise ValueError(f"--device: expected cpu or cuda, got {d!r}")
        if d == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA device is available")
    rows: list[Row] = []
    for d in devices:
        for n in names:
            rows.extend(run_cases(n, d, quick))
            print(format_table([r for r in rows if r.op == n and r.device == d]), flush=True)
    facts = machine_facts(devices)
    table = format_table(rows)
    print()
    print(table)
    if out:
        outdir = Path(out)
        outdir.mkdir(parents=True, exist_ok=True)
        tag = "cuda-" + torch.cuda.get_device_name(0).replace(" ", "_") if "cuda" in devices else "cpu"
        stem = outdir / f"ops_{tag}{'_quick' if quick else ''}"
        md = "# weakseg op benchmarks\n\n" + "\n".join(f"- {k}: {v}" for k, v in facts.items()) + "\n\n" + table + "\n"
        write_text(stem.with_suffix(".md"), md)
        write_text(stem.with_suffix(".json"), json.dumps({"facts": facts, "rows": [asdict(r) for r in rows]}, indent=2))
        print(f"\nwrote {stem}.md and {stem}.json")
    return 0


def interleaved_ms(fns: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Median ms of each callable after one warm-up call each, the callables alternating round by round
    (so that every one sees the same machine load)."""
    import statistics
    import time

    for f in fns.values():
        f()
    ts: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            ts[k].append(time.perf_counter() - t0)
    return {k: 1e3 * statistics.median(v) for k, v in ts.items()}


def write_vs_authors(rows: list[dict], out: str | os.PathLike | None, stem: str, title: str) -> str:
    """The table of a method's stages against the authors' code (rows: stage, check, weakseg_ms, authors_ms,
    ratio), printed, and with ``out`` written as ``<stem>.md`` / ``<stem>.json`` with date, command, machine
    and load average (CPU, 1 thread). Returns the table."""
    lines = ["| stage | check | weakseg ms | authors ms | authors / weakseg |", "|---|---|---:|---:|---:|"]
    lines += [f"| {r['stage']} | {r['check']} | {r['weakseg_ms']:.1f} | {r['authors_ms']:.1f} | {r['ratio']:.2f}x |"
              for r in rows]
    text = "\n".join(lines)
    print(text)
    if out:
        d = Path(out)
        meta = {"date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                "command": "python " + " ".join(sys.argv), "machine": machine_facts(["cpu"]),
                "load_average": os.getloadavg(), "threads": 1, "rows": rows}
        write_text(d / f"{stem}.json", json.dumps(meta, indent=2) + "\n")
        write_text(d / f"{stem}.md",
                   f"# {title}\n\n{meta['date']}, `{meta['command']}`, CPU, 1 thread, load average "
                   f"{meta['load_average'][0]:.2f} (2-core machine shared with other jobs); medians of interleaved "
                   f"rounds; each output checked equal before timing.\n\n" + text + "\n")
    return text
