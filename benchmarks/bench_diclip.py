"""DiCLIP's composite hot spots (specs/diclip.md §7) at the reference's shapes: verify against the
straightforward form, then time both.

- K4 surgery similarity / cache retrieval: the GEMM form of :func:`surgery_similarity` vs CLIP
  Surgery's element-wise (B, 1+N, K, D) product (723 MB for the 220 VOC keys at B = 4);
- K2 ACR refinement: the per-cluster row mean (scatter-add, O(P²)) vs ``(C @ A) / rowsum(C)`` (P³), 3 passes;
- K1 SD affinity: column-max / threshold / row-normalise / two-head chain.

    python benchmarks/bench_diclip.py [--quick] [--device cpu|cuda] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from weakseg.methods.diclip import cam as camlib
from weakseg.methods.diclip import vce as vcelib


def _time(fn, repeats: int, device: str) -> float:
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return 1e3 * (time.perf_counter() - t0) / repeats


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small batch, one repeat")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=None, help="directory for bench_diclip.json / .md")
    args = ap.parse_args(argv)
    dev = args.device
    B, N, D, M, P = (1, 401, 512, 220, 400) if args.quick else (4, 401, 512, 220, 400)
    reps = 1 if args.quick else 5
    g = torch.Generator().manual_seed(0)
    rows = []

    raw = torch.randn(B, N, D, generator=g)
    feats = (raw / raw.norm(dim=1, keepdim=True)).to(dev)  # DiCLIP's token-axis normalisation
    keys = torch.nn.functional.normalize(torch.randn(M, D, generator=g), dim=-1).to(dev)
    fast = camlib.surgery_similarity(feats, keys)
    ref = camlib.surgery_similarity_reference(feats.cpu(), keys.cpu())
    err = float((fast.cpu() - ref).abs().max() / ref.abs().max())
    rows.append({"step": "K4 surgery similarity (B,401,220)", "max_rel_err": err,
                 "fused_ms": _time(lambda: camlib.surgery_similarity(feats, keys), reps, dev),
                 "reference_ms": _time(lambda: camlib.surgery_similarity_reference(feats.cpu(), keys.cpu()), 1, "cpu"),
                 "reference_tensor_mb": B * N * M * D * 8 / 2**20})

    a = torch.rand(B, P, P, generator=g).to(dev)
    labels = torch.randint(0, 16, (B, P), generator=g).to(dev)
    fast = vcelib.cluster_mean_rows(a, labels)
    ref = vcelib.acr_reference(a.cpu(), labels.cpu(), 3)
    rows.append({"step": "K2 ACR refinement (B,400,400), 16 clusters",
                 "max_rel_err": float((fast.cpu() - ref).abs().max() / ref.abs().max()),
                 "fused_ms": _time(lambda: vcelib.cluster_mean_rows(a, labels), reps, dev),
                 "reference_ms": _time(lambda: vcelib.acr_reference(a.cpu(), labels.cpu(), 3), 1, "cpu")})

    q, k = torch.randn(B, 2, P, 64, generator=g).to(dev), torch.randn(B, 2, P, 64, generator=g).to(dev)
    fast = vcelib.sd_affinity(q, k)
    ref = vcelib.sd_affinity_reference(q.cpu(), k.cpu()) if args.quick else None
    rows.append({"step": "K1 SD affinity (B,2,400,64) chain", "max_rel_err":
                 float((fast.cpu() - ref).abs().max() / ref.abs().max()) if ref is not None else None,
                 "fused_ms": _time(lambda: vcelib.sd_affinity(q, k), reps, dev), "reference_ms": None})

    lines = ["| step | max rel err | ms | reference ms |", "|---|---:|---:|---:|"]
    for r in rows:
        e = "-" if r["max_rel_err"] is None else f"{r['max_rel_err']:.2e}"
        rm = "-" if r["reference_ms"] is None else f"{r['reference_ms']:.1f}"
        lines.append(f"| {r['step']} | {e} | {r['fused_ms']:.2f} | {rm} |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench_diclip.json").write_text(json.dumps({"device": dev, "batch": B, "rows": rows}, indent=2))
        (out / "bench_diclip.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
