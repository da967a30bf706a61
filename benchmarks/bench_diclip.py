"""DiCLIP's composite hot spots (docs/specs/diclip.md §7) at the reference's shapes: verify against the
straightforward form, then time both.

- K4 surgery similarity / cache retrieval: the GEMM form of :func:`surgery_similarity` vs CLIP
  Surgery's element-wise (B, 1+N, K, D) product (723 MB for the 220 VOC keys at B = 4);
- K2 ACR refinement: the per-cluster row mean (scatter-add, O(P²)) vs ``(C @ A) / rowsum(C)`` (P³), 3 passes;
- K1 SD affinity: column-max / threshold / row-normalise / two-head chain;

and two stages against the authors' code (tests/authors_diclip.py, the transcription), each checked
equal before it is timed, CPU, one thread, the ratio = authors' time / weakseg's (> 1: weakseg faster):

- CAA (one 320 px image, ViT-B/16 shapes: 12 blocks of (12, 401, 401) attention, 3 surgery blocks, two
  present classes): weakseg's ``caa_attention`` + ``caa_refine`` from the per-head attention its CLIP
  returns, against the authors' head reductions (``nn.MultiheadAttention``'s mean for blocks 0-8, the
  head sum of ``Attention.forward`` for 9-11: work their CLIP forward does for CAA), stack and
  ``refine_cams_with_aff``; also against ``refine_cams_with_aff`` alone, from the already reduced
  attention (weakseg still reduces its 6 blocks there);
- cache build (after the pseudo masks): per image the fg / bg keys of a 512 px mask on the 20 x 20 grid,
  then per class k-means (fg 10, bg 20, random_state 0): weakseg's ``_pool`` + ``kmeans_centroids`` against
  ``generate_kv_cache.py``'s loop.

    python benchmarks/bench_diclip.py [--quick] [--device cpu|cuda] [--out benchmarks/results]
    python benchmarks/bench_diclip.py --authors [--out benchmarks/results]   # the two stages only
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from weakseg.bench import interleaved_ms, write_vs_authors
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


def authors_stages(rounds: int = 15) -> list[dict]:
    """The CAA and cache-build stages against the authors' transcription (module docstring)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests import authors_diclip as authors
    from weakseg.methods.diclip import refine as reflib
    from weakseg.methods.diclip.cache import _pool, kmeans_centroids

    g = torch.Generator().manual_seed(0)
    rows = []
    # ---- CAA
    L, Hh, N, P = 12, 12, 401, 400
    attn = [torch.softmax(3 * torch.randn(1, Hh, N, N, generator=g), dim=-1) for _ in range(L)]
    yy, xx = torch.meshgrid(torch.arange(20), torch.arange(20), indexing="ij")
    cam = torch.rand(P, 20, generator=g) * 0.3
    cam[:, 4] += (((yy - 6) ** 2 + (xx - 7) ** 2) < 20).flatten().float()
    cam[:, 11] += (((yy - 13) ** 2 + (xx - 12) ** 2) < 30).flatten().float()
    cam = cam / cam.amax(0, keepdim=True)
    cls_label = torch.zeros(20, dtype=torch.bool)
    cls_label[[4, 11]] = True
    idx = torch.nonzero(cls_label).flatten()

    def ours():
        aff = reflib.caa_attention(attn, 6, "code", 3)
        return reflib.caa_refine(cam[:, idx].T.reshape(-1, 20, 20), aff[0], 0.79)

    def reduce_theirs():
        return torch.stack([a.mean(1) if i < L - 3 else torch.sum(a, dim=1) for i, a in enumerate(attn)])

    stacked = reduce_theirs()

    def theirs_full():
        out, _ = authors.refine_cams_with_aff(cam, reduce_theirs()[:, 0], cls_label, (320, 320), caa_thre=0.79)
        return torch.stack(out)

    def theirs_reduced():
        out, _ = authors.refine_cams_with_aff(cam, stacked[:, 0], cls_label, (320, 320), caa_thre=0.79)
        return torch.stack(out)

    a, b = ours(), theirs_full()
    if not torch.allclose(a, b, rtol=1e-4, atol=1e-6):
        raise AssertionError(f"CAA: weakseg differs from the authors' code (max abs {float((a - b).abs().max()):.3g})")
    t = interleaved_ms({"weakseg": ours, "authors": theirs_full, "authors_reduced": theirs_reduced}, rounds)
    rows.append({"stage": "DiCLIP CAA (per-head attention in)", "check": "refined CAMs allclose 1e-4",
                 "weakseg_ms": t["weakseg"], "authors_ms": t["authors"], "ratio": t["authors"] / t["weakseg"]})
    rows.append({"stage": "DiCLIP CAA (authors from head-reduced attention)", "check": "same",
                 "weakseg_ms": t["weakseg"], "authors_ms": t["authors_reduced"],
                 "ratio": t["authors_reduced"] / t["weakseg"]})

    # ---- cache build: 20 classes x 12 generated images (512 px masks), fg 10 / bg 20 centroids
    C, per = 21, 12
    feats_all, labels_all, cls_all = [], [], []
    Y, X = torch.meshgrid(torch.arange(512), torch.arange(512), indexing="ij")
    for c in range(1, C):
        for i in range(per):
            f = torch.randn(1, 401, 512, generator=g)
            feats_all.append(f / f.norm(dim=1, keepdim=True))
            cy, cx, r = (int(v) for v in torch.randint(120, 390, (3,), generator=g))
            labels_all.append((((Y - cy) ** 2 + (X - cx) ** 2) < (r // 2) ** 2).long() * c)
            cls_all.append(c)

    def ours_cache():
        per_class = {c: [] for c in range(C)}
        sized = torch.zeros(1, 3, 320, 320)
        for f, lab, c in zip(feats_all, labels_all, cls_all):
            for k, v in _pool(None, sized, lab[None], f, (20, 20), [[0, c]], "nearest")[0].items():
                per_class[k].append(v)
        return torch.cat([kmeans_centroids(torch.stack(per_class[c]), 20 if c == 0 else 10) for c in range(C)])

    names = ["_background_"] + [f"c{c}" for c in range(1, C)]

    def theirs_cache():
        cache_key = {n: [] for n in names}
        for f, lab, c in zip(feats_all, labels_all, cls_all):
            keys = authors.map_keys(f, lab[None])
            if keys is not None:
                cache_key[names[c]].append(keys[0])
                cache_key["_background_"].append(keys[1])
        return authors.cluster_keys(cache_key, 10, names)

    a, b = ours_cache(), theirs_cache().float()
    if a.shape != b.shape or not torch.allclose(a, b, atol=1e-5):
        raise AssertionError("cache build: weakseg's keys differ from the authors' code")
    t = interleaved_ms({"weakseg": ours_cache, "authors": theirs_cache}, max(3, rounds // 3))
    rows.append({"stage": f"DiCLIP cache build ({len(cls_all)} images: pooling + k-means)",
                 "check": "centroids allclose 1e-5", "weakseg_ms": t["weakseg"], "authors_ms": t["authors"],
                 "ratio": t["authors"] / t["weakseg"]})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small batch, one repeat")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=None, help="directory for bench_diclip.json / .md")
    ap.add_argument("--authors", action="store_true", help="only the stages against the authors' code")
    ap.add_argument("--rounds", type=int, default=15, help="interleaved timing rounds of the authors' stages")
    args = ap.parse_args(argv)
    if args.authors:
        return _authors_main(args)
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


def _authors_main(args) -> int:
    torch.set_num_threads(1)
    write_vs_authors(authors_stages(args.rounds), args.out, "diclip_vs_authors_cpu",
                     "DiCLIP stages vs the authors' code (tests/authors_diclip.py)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
