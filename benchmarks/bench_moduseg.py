"""ModuSeg benchmark: bank build per image and inference per image, split into stages, with the KNN
share; then KNN alone against growing banks (the op, FAISS flat, the pure-PyTorch reference). Every
timed path is checked first: the op against the reference and FAISS (labels and votes equal,
confidence within 1e-5), masked_area_pool against its reference, and the built bank against a
rebuild (bitwise).

    python benchmarks/bench_moduseg.py [--backbone tiny-clip|toy-clip|tiny-dinov2] [--size 64]
        [--train 40] [--test 20] [--bank-sizes 1000 10000 100000] [--dim 256] [--queries 30]
        [--device cpu] [--out benchmarks/results]

``--authors``: only the two stages against the authors' code (tests/authors_moduseg.py), each output
checked equal before timing, CPU, one thread, medians of interleaved rounds, ratio = authors' time /
weakseg's: region extraction of one 375 x 500 VOC-like pseudo label map (SBP 3 x 3 x 20, area floor 300,
21 classes: ``purify_regions`` vs ``_extract_class_regions``) and retrieval per image (40 overlapping
proposals, their query vectors, a 20k x 768 bank, K = 25, per-class NMS 0.4, painting: ``search`` +
``_paint``, which also fills the per-class score maps, vs ``predict_instances`` steps 3-6 with the
matrix-product search and with FAISS flat, + ``rasterize_instances``).

Toy sizes by default (64 x 64 toy-world scenes, the tiny random CLIP on 8 px patches, ground-truth
label maps as the pseudo masks, superpixel proposals), so the pseudo-mask method is not in the build
time, as with the reference's precomputed CorrCLIP masks. The paper's VOC figures (84 minutes, 5.3 GB
GPU memory) need the real backbone and proposer on a GPU.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from weakseg.bench import interleaved_ms, machine_facts, write_vs_authors
from weakseg.io import write_text
from weakseg.toy.world import ToyWorld
from weakseg.toy.recipes import MODUSEG_TOY_CONFIG as TOY_CONFIG
from weakseg.methods.moduseg import (FaissSearch, FeatureBank, ModuSeg, ModuSegConfig, encode_regions,
                                     vote_from_neighbors)
from weakseg.ops import knn_vote, knn_vote_reference, masked_area_pool, masked_area_pool_reference


class CheckFailed(AssertionError):
    pass


def _check(cond: bool, what: str) -> None:
    if not cond:
        raise CheckFailed(f"correctness check failed: {what}")


def _backbone(name: str, device: str):
    if name == "tiny-clip":
        return dict(backbone="clip-dense", backbone_model="tiny")
    if name == "toy-clip":
        return dict(backbone="clip-dense", backbone_model="toy")
    if name == "tiny-dinov2":
        return dict(backbone="dinov2", backbone_model="tiny")
    raise SystemExit(f"--backbone: expected tiny-clip, toy-clip or tiny-dinov2, got {name!r}")


def check_knn(bank: torch.Tensor, labels: torch.Tensor, q: torch.Tensor, k: int, nc: int) -> str:
    ref = knn_vote_reference(q, bank, labels, k, nc)
    op = knn_vote(q, bank, labels, k, nc)
    _check(torch.equal(op[0].cpu(), ref[0].cpu()) and torch.equal(op[2].cpu(), ref[2].cpu()),
           f"knn_vote op vs reference labels/votes (N={bank.shape[0]})")
    _check(torch.allclose(op[1].cpu(), ref[1].cpu(), atol=1e-5), "knn_vote op vs reference confidence")
    fs = FaissSearch(bank, ivf_threshold=10 ** 12)
    fa = vote_from_neighbors(*fs.search(q, k), labels.cpu(), nc)
    _check(torch.equal(fa[0], ref[0].cpu()) and torch.equal(fa[2], ref[2].cpu()),
           f"FAISS flat vs reference labels/votes (N={bank.shape[0]})")
    _check(torch.allclose(fa[1], ref[1].cpu(), atol=1e-5), "FAISS flat vs reference confidence")
    return "exact labels+votes, conf 1e-5"


def time_it(fn, repeat: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def pipeline(args, work: Path) -> tuple[list[dict], dict]:
    device = args.device
    world = ToyWorld(args.size, "train", num_scenes=args.train)
    gt = work / "gt"
    gt.mkdir(parents=True, exist_ok=True)
    for i in range(args.train):
        s = world[i]
        Image.fromarray(s.label.numpy().astype(np.uint8)).save(gt / f"{s.name}.png")
    values = {**TOY_CONFIG, **_backbone(args.backbone, device), "device": device}
    cfg = ModuSegConfig.from_dict(values)
    seg = ModuSeg(cfg)
    # correctness: SMFA op vs reference on a real image's regions, then the bank is reproducible
    s0 = world[0]
    feats = seg.features(s0.image)
    masks = torch.stack([s0.label == c for c in torch.unique(s0.label)])[None].to(feats.tokens.device)
    a, b = masked_area_pool(feats.tokens, masks), masked_area_pool_reference(feats.tokens, masks)
    _check(torch.allclose(a[0], b[0], atol=1e-5) and torch.allclose(a[1], b[1], atol=1e-5),
           "masked_area_pool op vs reference")
    seg.timer.reset()
    t0 = time.perf_counter()
    bank = seg.build_bank(world, work / "bank.safetensors", pseudo=gt, progress=False, resume=False)
    build_s = time.perf_counter() - t0
    build_stages = dict(seg.timer.totals)
    again = ModuSeg(cfg).build_bank(world, work / "bank2.safetensors", pseudo=gt, progress=False, resume=False)
    _check(torch.equal(bank.vectors, again.vectors) and torch.equal(bank.labels, again.labels),
           "bank build is reproducible (bitwise)")
    test = ToyWorld(args.size, "test", num_scenes=args.test)
    names = list(world.class_names)
    rows = []
    for search in ("op", "faiss"):
        seg.config = seg.config.replace(search=search)
        seg._faiss = None
        # correctness of the search on this bank with real proposal queries
        props = seg.propose(test[0].image)
        q, _ = encode_regions(seg.features(test[0].image), props.masks, cfg.pooling)
        check = check_knn(seg._bank_vectors, seg._bank_labels, q, cfg.k, len(names))
        seg.segment([test[0].image], names)  # warm-up
        seg.timer.reset()
        t0 = time.perf_counter()
        for i in range(args.test):
            seg.segment([test[i].image], names)
        total = (time.perf_counter() - t0) / args.test
        st = {k: v / args.test for k, v in seg.timer.totals.items()}
        rows.append({"stage": "inference", "search": search, "image": f"{args.size}x{args.size}",
                     "bank_rows": len(bank), "ms_per_image": 1e3 * total,
                     **{f"{k}_ms": 1e3 * v for k, v in st.items()},
                     "knn_share_pct": 100 * st.get("knn", 0.0) / total, "check": check})
    n = args.train
    build_row = {"stage": "build", "search": "-", "image": f"{args.size}x{args.size}", "bank_rows": len(bank),
                 "ms_per_image": 1e3 * build_s / n, **{f"{k}_ms": 1e3 * v / n for k, v in build_stages.items()},
                 "knn_share_pct": 0.0, "check": "bitwise rebuild"}
    return [build_row] + rows, {"backbone_id": seg.backbone_id, "dim": bank.dim}


def knn_scaling(args) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    rows = []
    for n in args.bank_sizes:
        # clustered like a real bank: 21 class centres, rows and queries = centre + noise (noise norm 1.5)
        centres = F.normalize(torch.randn(21, args.dim, generator=g), dim=1)
        sigma = 1.5 / args.dim ** 0.5
        labels = torch.randint(0, 21, (n,), generator=g)
        bank = F.normalize(centres[labels] + sigma * torch.randn(n, args.dim, generator=g), dim=1).to(args.device)
        qc = torch.randint(0, 21, (args.queries,), generator=g)
        q = F.normalize(centres[qc] + sigma * torch.randn(args.queries, args.dim, generator=g), dim=1).to(args.device)
        labels = labels.to(args.device)
        check = check_knn(bank, labels, q, 25, 21)
        fs = FaissSearch(bank, ivf_threshold=10 ** 12)
        row = {"bank_rows": n, "dim": args.dim, "queries": args.queries, "k": 25, "check": check,
               "op_ms": 1e3 * time_it(lambda: knn_vote(q, bank, labels, 25, 21), args.repeat),
               "faiss_flat_ms": 1e3 * time_it(lambda: vote_from_neighbors(*fs.search(q, 25), labels.cpu(), 21),
                                              args.repeat)}
        if n <= 20_000 or args.reference_all:
            row["reference_ms"] = 1e3 * time_it(lambda: knn_vote_reference(q, bank, labels, 25, 21), args.repeat)
        if n > 10_000:
            ivf = FaissSearch(bank, ivf_threshold=0)
            approx = vote_from_neighbors(*ivf.search(q, 25), labels.cpu(), 21)
            exact = knn_vote(q, bank, labels, 25, 21)
            row["faiss_ivf_ms"] = 1e3 * time_it(lambda: vote_from_neighbors(*ivf.search(q, 25), labels.cpu(), 21),
                                                args.repeat)
            row["ivf_label_agreement_pct"] = 100 * float((approx[0] == exact[0].cpu()).float().mean())
        rows.append(row)
    return rows


def authors_stages(rounds: int = 15) -> list[dict]:
    """The region-extraction and retrieval stages against the authors' code (module docstring)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests import authors_moduseg as authors
    from weakseg.methods.moduseg import purify_regions

    g = torch.Generator().manual_seed(0)
    H, W, C = 375, 500, 21
    yy, xx = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    lab = torch.zeros(H, W, dtype=torch.int64)
    for c, (cy, cx, r) in zip((5, 12, 15), ((120, 150, 90), (250, 330, 110), (100, 400, 60))):
        lab[((yy - cy) ** 2 + (xx - cx) ** 2) < r * r] = c
    lab_np = lab.numpy().astype(np.uint8)
    classes, masks = purify_regions(lab, C)
    ref = sorted((r["cls_id"], r["mask"].astype(bool)) for r in authors.extract_class_regions(lab_np, 300, C - 1))
    _check(classes == [c for c, _ in ref] and all(np.array_equal(m.numpy(), r) for m, (_, r) in zip(masks, ref)),
           "purify_regions vs the authors' _extract_class_regions")
    t = interleaved_ms({"weakseg": lambda: purify_regions(lab, C),
                        "authors": lambda: authors.extract_class_regions(lab_np, 300, C - 1)}, rounds)
    rows = [{"stage": "ModuSeg region extraction (375x500, 3 classes + bg)", "check": "classes and masks equal",
             "weakseg_ms": t["weakseg"], "authors_ms": t["authors"], "ratio": t["authors"] / t["weakseg"]}]

    N, D, Q, K = 20_000, 768, 40, 25
    names = ["background"] + [f"c{i}" for i in range(1, C)]
    centres = F.normalize(torch.randn(C, D, generator=g), dim=1)
    blab = torch.randint(0, C, (N,), generator=g)
    bank_v = F.normalize(centres[blab] + 0.05 * torch.randn(N, D, generator=g), dim=1)

    class Stand:  # a stand-in backbone: only its id and dim are read here
        backbone_id, dim = "bench", D

    bank = FeatureBank(bank_v, blab, torch.zeros(N, dtype=torch.int64), ["s"], names, "bench")
    seg = ModuSeg(ModuSegConfig(proposer="superpixel"), backbone=Stand(), bank=bank)
    pm = torch.zeros(Q, H, W, dtype=torch.bool)
    for j in range(Q):
        cy, cx = int(torch.randint(0, H, (1,), generator=g)), int(torch.randint(0, W, (1,), generator=g))
        ry, rx = torch.randint(20, 120, (2,), generator=g).tolist()
        pm[j] = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1
    q = F.normalize(centres[torch.randint(0, C, (Q,), generator=g)] + 0.05 * torch.randn(Q, D, generator=g), dim=1)
    to_out = torch.arange(C)

    def ours():
        lab_, conf, votes = seg.search(q)
        labels, scores = torch.zeros(H, W, dtype=torch.int64), torch.zeros(C, H, W)
        seg._paint(pm, lab_, conf, votes, to_out, True, labels, scores)
        return labels

    masks_np, q_np, bank_np = [m.numpy() for m in pm], [v.numpy() for v in q], bank_v.numpy()
    bank_names = [names[i] for i in blab.tolist()]
    flat_ip = None
    try:
        import faiss
        flat_ip = faiss.IndexFlatIP(D)
        flat_ip.add(bank_np)
    except ImportError:
        pass

    def theirs(index):
        inst = authors.retrieve(masks_np, q_np, bank_np, bank_names, index, 0.4, K, 300)
        return authors.rasterize_instances(inst, H, W, names[1:])

    mine = ours().numpy()
    _check(np.array_equal(mine, theirs(None)), "retrieval labels vs the authors' code (matrix-product search)")
    fns = {"weakseg": ours, "authors_mm": lambda: theirs(None)}
    if flat_ip is not None:
        _check(np.array_equal(mine, theirs(flat_ip)), "retrieval labels vs the authors' code (FAISS flat)")
        fns["authors_faiss"] = lambda: theirs(flat_ip)
    t = interleaved_ms(fns, rounds)
    rows.append({"stage": f"ModuSeg retrieval per image ({Q} proposals, {N // 1000}k x {D} bank; authors: matrix product)",
                 "check": "label maps equal", "weakseg_ms": t["weakseg"], "authors_ms": t["authors_mm"],
                 "ratio": t["authors_mm"] / t["weakseg"]})
    if "authors_faiss" in t:
        rows.append({"stage": "ModuSeg retrieval per image (authors: FAISS flat)", "check": "label maps equal",
                     "weakseg_ms": t["weakseg"], "authors_ms": t["authors_faiss"],
                     "ratio": t["authors_faiss"] / t["weakseg"]})
    return rows


def _authors_main(a) -> int:
    torch.set_num_threads(1)
    write_vs_authors(authors_stages(a.rounds), a.out, "moduseg_vs_authors_cpu",
                     "ModuSeg stages vs the authors' code (tests/authors_moduseg.py)")
    return 0


def table(rows: list[dict], cols: list[str]) -> str:
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(f"{r[c]:.2f}" if isinstance(r.get(c), float) else str(r.get(c, "-"))
                                       for c in cols) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="tiny-clip")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--train", type=int, default=40)
    p.add_argument("--test", type=int, default=20)
    p.add_argument("--bank-sizes", type=int, nargs="*", default=[1000, 10_000, 100_000])
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--queries", type=int, default=30)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--reference-all", action="store_true", help="time the reference on every bank size")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None)
    p.add_argument("--authors", action="store_true", help="only the stages against the authors' code")
    p.add_argument("--rounds", type=int, default=15, help="interleaved timing rounds of the authors' stages")
    a = p.parse_args(argv)
    if a.authors:
        return _authors_main(a)
    with tempfile.TemporaryDirectory() as tmp:
        pipe, info = pipeline(a, Path(tmp))
    scaling = knn_scaling(a)
    stage_cols = ["stage", "search", "image", "bank_rows", "ms_per_image", "data_ms", "pseudo_ms", "sbp_ms",
                  "propose_ms", "backbone_ms", "encode_ms", "knn_ms", "paint_ms", "write_ms", "merge_ms",
                  "knn_share_pct", "check"]
    knn_cols = ["bank_rows", "dim", "queries", "k", "op_ms", "faiss_flat_ms", "faiss_ivf_ms", "reference_ms",
                "ivf_label_agreement_pct", "check"]
    t1, t2 = table(pipe, stage_cols), table(scaling, knn_cols)
    print(t1 + "\n\n" + t2)
    if a.out:
        facts = machine_facts([a.device])
        facts["backbone"] = info["backbone_id"]
        facts["max_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        stem = out / f"moduseg_{a.device}_{a.backbone}_{a.size}"
        text = ("# ModuSeg benchmark: bank build and inference per image, KNN share\n\n"
                + "\n".join(f"- {k}: {v}" for k, v in facts.items())
                + f"\n- scenes: {a.train} toy train scenes (bank), {a.test} toy test scenes (inference); "
                  f"pseudo masks = ground-truth PNGs; proposer = superpixel\n\n"
                + "## Per image (ms; stage columns are the method's StageTimer)\n\n" + t1
                + f"\n\n## KNN + vote alone ({a.queries} queries, K = 25, 21 classes; synthetic bank: 21 random unit "
                  f"centres plus Gaussian noise of norm 1.5, rows L2-normalised; IVF: nlist = min(sqrt N, 1024), "
                  f"nprobe = 32, agreement = its labels vs the exact vote)\n\n"
                + t2 + "\n")
        write_text(stem.with_suffix(".md"), text)
        write_text(stem.with_suffix(".json"), json.dumps({"facts": facts, "pipeline": pipe, "knn": scaling},
                                                         indent=2))
        print(f"wrote {stem}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
