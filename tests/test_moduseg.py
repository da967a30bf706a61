"""ModuSeg: bank build (SBP, SMFA, outlier filter, resumable / sharded safetensors bank), retrieval inference
(op and FAISS search, votes, NMS, painting), CLI, toy-demo hook. Tiny deterministic models only."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import weakseg
from weakseg.backbones.features import PatchFeatures, pad_to_patch_multiple
from weakseg.backbones.proposers import Proposals
from weakseg.core import DemoEntry, SegmentationOutput, check_images
from weakseg.data import Sample
from weakseg.toy.recipes import MODUSEG_TOY_PSEUDO, iseg_demo, moduseg_demo
from weakseg.methods.moduseg import (
    BANK_FORMAT, BANK_FORMAT_VERSION, BankError, FaissSearch, FeatureBank, ModuSeg, ModuSegConfig, encode_regions,
    exact_topk, majority_in_regions, nms_per_class, outlier_filter, pseudo_labels_from_scores, purify_regions,
    vote_from_neighbors,
)
from weakseg.ops import erode_labels_reference, knn_vote

from _helpers import assert_raises_naming

torch.set_num_threads(1)

# ----------------------------------------------------------------------------------------------- fixtures
CLASSES = ["background", "red", "green", "blue"]
COLOURS = {0: (128, 128, 128), 1: (220, 30, 30), 2: (30, 200, 40), 3: (40, 60, 230)}


class ColourPatches:
    """A tiny deterministic dense extractor: per-patch mean colour and colour spread through a fixed
    random projection (patch 8, dim 16); images are zero-padded bottom/right like the real backbones."""

    patch_size = 8
    dim = 16
    backbone_id = "test:colour-patches"

    def __init__(self, seed: int = 0, fail_after: int | None = None):
        g = torch.Generator().manual_seed(seed)
        self.proj = torch.randn(6, self.dim, generator=g)
        self.calls = 0
        self.fail_after = fail_after

    def __call__(self, images) -> PatchFeatures:
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt("simulated interruption")
        self.calls += 1
        items = check_images(images)
        x = torch.stack(items).float() / 255
        H, W = x.shape[-2:]
        x, padding = pad_to_patch_multiple(x, 8)
        mean = F.avg_pool2d(x, 8)
        std = (F.avg_pool2d(x * x, 8) - mean ** 2).clamp_min(0).sqrt()
        tokens = torch.einsum("bchw,cd->bdhw", torch.cat([mean, 4 * std], 1), self.proj)
        return PatchFeatures(tokens, 8, (H, W), tuple(x.shape[-2:]), padding)


def colour_scene(seed: int, size=(72, 88)) -> tuple[torch.Tensor, torch.Tensor]:
    """Gray background with 1-3 axis-aligned rectangles, one colour per class, light noise."""
    g = torch.Generator().manual_seed(seed)
    H, W = size
    label = torch.zeros(H, W, dtype=torch.int64)
    for _ in range(int(torch.randint(1, 4, (1,), generator=g))):
        c = int(torch.randint(1, 4, (1,), generator=g))
        h, w = (int(v) for v in torch.randint(18, 34, (2,), generator=g))
        y, x = int(torch.randint(0, H - h, (1,), generator=g)), int(torch.randint(0, W - w, (1,), generator=g))
        label[y:y + h, x:x + w] = c
    img = torch.zeros(3, H, W)
    for c, rgb in COLOURS.items():
        img[:, label == c] = torch.tensor(rgb, dtype=torch.float32)[:, None]
    img = (img + 6 * torch.randn(3, H, W, generator=g)).clamp(0, 255).round().to(torch.uint8)
    return img, label


class ListDataset:
    def __init__(self, samples, class_names=CLASSES, split="train"):
        self.samples, self.class_names, self.split = samples, list(class_names), split

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        return self.samples[i]


def colour_dataset(n: int, offset: int = 0, size=(72, 88)) -> ListDataset:
    out = []
    for i in range(n):
        img, lab = colour_scene(offset + i, size)
        out.append(Sample(img, lab, sorted(set(torch.unique(lab).tolist())), f"scene_{offset + i:04d}"))
    return ListDataset(out)


def write_pngs(dataset, root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for s in dataset.samples:
        Image.fromarray(s.label.numpy().astype(np.uint8)).save(root / f"{s.name}.png")
    return root


def cfg(**over) -> ModuSegConfig:
    base = dict(min_area=20, erosion_iterations=2, proposer="superpixel", k=5,
                proposer_options=dict(scale=60.0, min_size=20, merge_thresh=10.0))
    base.update(over)
    return ModuSegConfig.from_dict(base)


@pytest.fixture(scope="module")
def colour_data(tmp_path_factory):
    ds = colour_dataset(10)
    root = write_pngs(ds, tmp_path_factory.mktemp("pseudo"))
    return ds, root


def build(tmp: Path, ds, pseudo, name="bank.safetensors", backbone=None, **over):
    seg = ModuSeg(cfg(**over), backbone=backbone or ColourPatches())
    bank = seg.build_bank(ds, tmp / name, pseudo=pseudo, progress=False)
    return seg, bank


def assert_same_bank(a: FeatureBank, b: FeatureBank):
    assert torch.equal(a.vectors, b.vectors)
    assert torch.equal(a.labels, b.labels)
    assert a.sample_ids == b.sample_ids
    assert a.class_names == b.class_names and a.backbone == b.backbone
    assert a.build == b.build and a.report == b.report


# ----------------------------------------------------------------------------------------------- config
def test_config_defaults_are_the_reference_values():
    c = ModuSegConfig()
    assert (c.k, c.min_area, c.erosion_kernel, c.erosion_iterations) == (25, 300, 3, 20)
    assert (c.fg_drop_ratio, c.bg_drop_ratio, c.nms_iou, c.faiss_ivf_threshold) == (0.25, 0.0, 0.4, 100_000)
    assert c.sbp and c.outlier_filter and c.nms and c.pooling == "soft" and c.unassigned == "background"
    assert c.inference_score_thresh() == 0.6 and c.pseudo_thresh() == 0.5
    assert ModuSegConfig(proposer="superpixel").inference_score_thresh() is None
    assert ModuSegConfig(proposer="superpixel", score_thresh=0.1).inference_score_thresh() == 0.1


@pytest.mark.parametrize("field,value,words", [
    ("search", "annoy", ["search", "op", "faiss"]), ("pooling", "max", ["pooling", "soft", "hard"]),
    ("k", 0, ["k", ">= 1"]), ("erosion_kernel", 4, ["erosion_kernel", "odd"]),
    ("fg_drop_ratio", 1.5, ["fg_drop_ratio", "[0, 1]"]), ("backbone", "resnet", ["backbone", "dinov2"]),
    ("proposer", "entityseg", ["proposer", "superpixel"]), ("unassigned", "none", ["unassigned", "ignore"]),
])
def test_config_errors_name_the_field(field, value, words):
    assert_raises_naming(lambda: ModuSegConfig(**{field: value}), ValueError, words)


def test_unknown_option_is_named():
    assert_raises_naming(lambda: weakseg.create("moduseg", set_options=["kk=3"]), ValueError, ["kk"])


# ----------------------------------------------------------------------------------------------- build pieces
def test_purify_regions_is_sbp_then_area_floor():
    lab = torch.zeros(40, 50, dtype=torch.int64)
    lab[5:30, 8:40] = 1
    lab[12:20, 15:25] = 2  # a hole of class 2 inside class 1
    lab[0:40, 45:50] = 3   # a strip along the right border: borders do not erode
    lab[35, 0] = 255
    classes, masks = purify_regions(lab, 4, kernel=3, iterations=2, min_area=0)
    # the spec's definition: p keeps class c iff every in-image pixel within Chebyshev radius 2 has class c
    eroded = torch.full_like(lab, 255)
    for y in range(40):
        for x in range(50):
            win = lab[max(0, y - 2):y + 3, max(0, x - 2):x + 3]
            if bool((win == lab[y, x]).all()):
                eroded[y, x] = lab[y, x]
    assert torch.equal(eroded, erode_labels_reference(lab, 3, 2))
    assert classes == [c for c in range(4) if bool((eroded == c).any())]
    for c, m in zip(classes, masks):
        assert torch.equal(m, eroded == c)
    # the strip of width 5 survives a radius-2 erosion only because the border does not erode
    assert 3 in classes and bool(masks[classes.index(3)][:, 47:].all())
    # the area floor applies after erosion
    area2 = int((eroded == 2).sum())
    c2, _ = purify_regions(lab, 4, kernel=3, iterations=2, min_area=area2 + 1)
    assert 2 not in c2 and 1 in c2
    # sbp off keeps the raw map; background can be skipped; masks are disjoint
    c3, m3 = purify_regions(lab, 4, sbp=False, min_area=0, skip=(0,))
    assert c3 == [1, 2, 3] and torch.equal(m3[1], lab == 2)
    assert int(m3.sum(0).max()) == 1


def test_purify_regions_rejects_bad_ids():
    lab = torch.zeros(8, 8, dtype=torch.int64)
    lab[0, 0] = 7
    assert_raises_naming(lambda: purify_regions(lab, 4), ValueError, ["[0, 4)", "7"])


def test_encode_regions_soft_and_hard_with_padding():
    torch.manual_seed(0)
    H, W, p = 21, 30, 8  # padded to 24 x 32: a 3 x 4 grid with partial patches
    tokens = torch.randn(1, 5, 3, 4)
    feats = PatchFeatures(tokens, p, (H, W), (24, 32), (0, 0, 3, 2))
    masks = torch.zeros(2, H, W, dtype=torch.bool)
    masks[0, 16:21, 24:30] = True  # only the bottom-right (partial) patch
    masks[1, 0:10, 0:12] = True
    vecs, weight = encode_regions(feats, masks, "soft")
    # soft: weights = covered fraction of each 8 x 8 patch (padding counts as uncovered, divisor 64)
    pad = F.pad(masks.float(), (0, 2, 0, 3))
    w = F.avg_pool2d(pad[:, None], 8)[:, 0].flatten(1)  # (2, 12)
    ref = F.normalize(w @ tokens.flatten(2)[0].T / w.sum(1, keepdim=True), dim=1)
    assert torch.allclose(vecs, ref, atol=1e-6)
    assert torch.allclose(weight, w.sum(1), atol=1e-6)
    assert math.isclose(float(weight[0]), 30 / 64, rel_tol=1e-6)
    # hard: binary weights from each patch's centre pixel
    hv, hw = encode_regions(feats, masks, "hard")
    centre = pad[:, 4::8, 4::8].flatten(1)
    assert torch.equal(hw, centre.sum(1))
    assert float(hw[0]) == 1.0  # the centre (20, 28) of the partial patch is a mask pixel
    assert torch.allclose(hv[1], F.normalize(centre[1] @ tokens.flatten(2)[0].T, dim=0), atol=1e-6)


def test_pseudo_label_filtering_and_majority():
    scores = torch.zeros(4, 6, 6)
    scores[3] = 5.0          # the top class everywhere, but not in the image
    scores[1, :, :3] = 2.0
    scores[2, :, 3:] = 1.0
    allowed = torch.tensor([True, True, True, False])
    lab = pseudo_labels_from_scores(scores, allowed)
    assert int((lab == 3).sum()) == 0
    assert bool((lab[:, :3] == 1).all()) and bool((lab[:, 3:] == 2).all())
    region = torch.zeros(1, 6, 6, dtype=torch.bool)
    region[0, :, 1:5] = True  # 12 pixels of class 1, 12 of class 2: the tie goes to the smaller id
    out = majority_in_regions(lab, region, 4)
    assert bool((out[region[0]] == 1).all()) and bool((out[:, 5] == 2).all()) and bool((out[:, 0] == 1).all())


def test_outlier_filter_drops_farthest_fg_only():
    torch.manual_seed(0)
    base = F.normalize(torch.randn(1, 8), dim=1)
    v = F.normalize(base + 0.05 * torch.randn(12, 8), dim=1)
    v[3] = F.normalize(-base, dim=1)[0]   # far from the class-1 mean
    v[11] = F.normalize(-base, dim=1)[0]  # far from the background mean
    labels = torch.tensor([1] * 8 + [0] * 4)
    keep, report = outlier_filter(v, labels, 0.25, 0.0, background=0)
    assert report == {0: [4, 0], 1: [6, 2]}
    assert not bool(keep[3]) and bool(keep[8:].all()) and int((~keep).sum()) == 2
    dist = (v[:8] - v[:8].mean(0)).norm(dim=1)
    assert set(torch.nonzero(~keep).flatten().tolist()) == set(torch.topk(dist, 2).indices.tolist())
    keep2, report2 = outlier_filter(v, labels, 0.25, 0.5, background=0)
    assert report2[0] == [2, 2] and not bool(keep2[11])


# ----------------------------------------------------------------------------------------------- bank file
def test_bank_round_trip(tmp_path, colour_data):
    ds, pseudo = colour_data
    seg, bank = build(tmp_path, ds, pseudo)
    path = tmp_path / "bank.safetensors"
    assert path.is_file() and not list(tmp_path.glob("*.tmp")) and not (tmp_path / "bank.safetensors.parts").exists()
    loaded = FeatureBank.load(path, backbone=ColourPatches.backbone_id, dim=16)
    assert_same_bank(bank, loaded)
    assert loaded.vectors.dtype == torch.float32 and torch.allclose(loaded.vectors.norm(dim=1), torch.ones(len(loaded)))
    assert loaded.class_names == CLASSES and set(loaded.sample_ids) <= {s.name for s in ds.samples}
    # rows are ordered by (image, class)
    names = [s.name for s in ds.samples]
    order = [(names.index(n), int(c)) for n, c in zip(loaded.sample_ids, loaded.labels)]
    assert order == sorted(order)
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        assert set(f.keys()) == {"vectors", "labels", "sample_index"}
    assert meta["format"] == BANK_FORMAT and meta["format_version"] == str(BANK_FORMAT_VERSION)
    assert meta["backbone"] == ColourPatches.backbone_id and json.loads(meta["class_names"]) == CLASSES
    # another save/load keeps everything
    loaded.save(tmp_path / "copy.safetensors")
    assert_same_bank(loaded, FeatureBank.load(tmp_path / "copy.safetensors"))


def _write_bank(path, vectors, labels, meta_over=None, drop=()):
    from safetensors.torch import save_file
    tensors = {"vectors": vectors, "labels": labels, "sample_index": torch.zeros(len(labels), dtype=torch.int64)}
    meta = {"format": BANK_FORMAT, "format_version": str(BANK_FORMAT_VERSION), "backbone": "test:colour-patches",
            "dim": str(vectors.shape[1]), "class_names": json.dumps(CLASSES), "samples": json.dumps(["a"])}
    meta.update(meta_over or {})
    for k in drop:
        tensors.pop(k, None)
        meta.pop(k, None)
    save_file(tensors, str(path), metadata=meta)


def test_corrupt_or_mismatched_bank_errors(tmp_path):
    v = F.normalize(torch.randn(4, 16), dim=1)
    lab = torch.tensor([0, 1, 2, 3])
    p = tmp_path / "b.safetensors"
    _write_bank(p, v, lab)
    FeatureBank.load(p, backbone="test:colour-patches", dim=16)  # valid
    assert_raises_naming(lambda: FeatureBank.load(p, backbone="dinov2:facebook/dinov2-base"), BankError,
                         [str(p), "test:colour-patches", "dinov2:facebook/dinov2-base"])
    assert_raises_naming(lambda: FeatureBank.load(p, dim=768), BankError, [str(p), "16", "768"])
    cases = {
        "version": ({"format_version": "7"}, (), ["format version", "'7'", str(BANK_FORMAT_VERSION)]),
        "format": ({"format": "something-else"}, (), ["format", "something-else", BANK_FORMAT]),
        "keys": ({}, ("labels", "backbone"), ["missing", "labels", "backbone"]),
        "dim": ({"dim": "12"}, (), ["dimension 16", "12"]),
        "labels": ({"class_names": json.dumps(["background", "x"])}, (), ["class ids in [0, 2)"]),
    }
    for name, (over, drop, words) in cases.items():
        q = tmp_path / f"{name}.safetensors"
        _write_bank(q, v, lab, over, drop)
        assert_raises_naming(lambda: FeatureBank.load(q), BankError, [str(q)] + words)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    assert_raises_naming(lambda: FeatureBank.load(garbage), BankError, [str(garbage), "safetensors"])
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(p.read_bytes()[:-40])
    assert_raises_naming(lambda: FeatureBank.load(truncated), BankError, [str(truncated)])
    assert_raises_naming(lambda: FeatureBank.load(tmp_path / "nope.safetensors"), FileNotFoundError, ["nope"])
    # the segmenter applies the same checks, naming the file
    bad_dim = tmp_path / "dim8.safetensors"
    _write_bank(bad_dim, F.normalize(torch.randn(4, 8), dim=1), lab)
    assert_raises_naming(lambda: ModuSeg(cfg(bank=str(bad_dim)), backbone=ColourPatches()), BankError,
                         [str(bad_dim), "8-d", "16-d"])
    other = tmp_path / "other.safetensors"
    _write_bank(other, v, lab, {"backbone": "clip-dense:ViT-B-16"})
    assert_raises_naming(lambda: ModuSeg(cfg(bank=str(other)), backbone=ColourPatches()), BankError,
                         [str(other), "clip-dense:ViT-B-16", "test:colour-patches"])
    ModuSeg(cfg(bank=str(other), check_backbone=False), backbone=ColourPatches())  # the check can be waived


# ----------------------------------------------------------------------------------------------- resume / shard
def test_resumed_build_equals_uninterrupted(tmp_path, colour_data):
    ds, pseudo = colour_data
    _, full = build(tmp_path, ds, pseudo, "full.safetensors")
    failing = ColourPatches(fail_after=5)
    seg = ModuSeg(cfg(flush_every=2), backbone=failing)
    out = tmp_path / "resumed.safetensors"
    with pytest.raises(KeyboardInterrupt):
        seg.build_bank(ds, out, pseudo=pseudo, progress=False)
    parts = Path(str(out) + ".parts")
    assert not out.exists() and len(list(parts.glob("part_*.safetensors"))) >= 3  # 5 images kept, incl. the last chunk
    fresh = ColourPatches()
    bank = ModuSeg(cfg(flush_every=2), backbone=fresh).build_bank(ds, out, pseudo=pseudo, progress=False)
    assert fresh.calls == len(ds) - 5  # only the unfinished images were computed
    assert_same_bank(full, bank)
    assert_same_bank(full, FeatureBank.load(out))
    assert not parts.exists()
    # a finished bank with the same settings is reused, not rebuilt
    again = ColourPatches()
    assert_same_bank(full, ModuSeg(cfg(), backbone=again).build_bank(ds, out, pseudo=pseudo, progress=False))
    assert again.calls == 0


def test_partial_results_of_another_build_are_refused(tmp_path, colour_data):
    ds, pseudo = colour_data
    out = tmp_path / "b.safetensors"
    with pytest.raises(KeyboardInterrupt):
        ModuSeg(cfg(flush_every=1), backbone=ColourPatches(fail_after=2)).build_bank(ds, out, pseudo=pseudo,
                                                                                      progress=False)
    other = ModuSeg(cfg(sbp=False), backbone=ColourPatches())
    assert_raises_naming(lambda: other.build_bank(ds, out, pseudo=pseudo, progress=False), ValueError,
                         ["settings", "--restart"])
    bank = other.build_bank(ds, out, pseudo=pseudo, progress=False, resume=False)
    assert bank.build["settings"]["sbp"] is False


def test_sharded_build_merges_exactly(tmp_path, colour_data):
    ds, pseudo = colour_data
    _, full = build(tmp_path, ds, pseudo, "full.safetensors")
    out = tmp_path / "sharded.safetensors"
    b1 = ModuSeg(cfg(), backbone=ColourPatches())
    assert b1.build_bank(ds, out, pseudo=pseudo, progress=False, rank=1, world_size=2) is None
    assert not out.exists()
    b0 = ColourPatches()
    bank = ModuSeg(cfg(), backbone=b0).build_bank(ds, out, pseudo=pseudo, progress=False, rank=0, world_size=2)
    assert b0.calls == len(ds) // 2
    assert_same_bank(full, bank)


# ----------------------------------------------------------------------------------------------- search / votes
def pad16(x: torch.Tensor) -> torch.Tensor:
    return F.pad(x.float(), (0, 16 - x.shape[1]))


def _seg_with_bank(vectors, labels, names=CLASSES, **over):
    """A segmenter over a hand-made bank (vectors zero-padded to the test backbone's 16 dims)."""
    bank = FeatureBank(F.normalize(pad16(vectors), dim=1), labels.long(), torch.zeros(len(labels), dtype=torch.int64),
                       ["s"], list(names), ColourPatches.backbone_id)
    return ModuSeg(cfg(**over), backbone=ColourPatches(), bank=bank)


@pytest.mark.parametrize("search", ["op", "faiss"])
def test_vote_ties(search):
    q = pad16(torch.tensor([[1.0, 0.0, 0.0]]))
    a, b = [1.0, 0.2, 0.0], [1.0, 0.9, 0.0]
    # equal counts and equal sums (the same vectors twice): the smaller class id wins, whatever the row order
    for labels in ([1, 1, 2, 2], [2, 2, 1, 1]):
        seg = _seg_with_bank(torch.tensor([a, b, a, b]), torch.tensor(labels), k=4, search=search)
        lab, conf, votes = seg.search(q)
        assert int(lab[0]) == 1 and votes[0].tolist() == [0, 2, 2, 0]
    # equal counts: the larger similarity sum wins; confidence = mean similarity of the winner's voters
    c, d = [1.0, 0.05, 0.0], [1.0, 0.1, 0.0]
    seg = _seg_with_bank(torch.tensor([a, b, c, d]), torch.tensor([1, 1, 2, 2]), k=4, search=search)
    lab, conf, votes = seg.search(q)
    sims = F.normalize(torch.tensor([c, d]), dim=1) @ q[0, :3]
    assert int(lab[0]) == 2 and math.isclose(float(conf[0]), float(sims.mean()), rel_tol=1e-6)
    # most votes beats a larger sum: class 3 has 2 voters near 1.0, class 1 has 3 voters summing to ~0.8
    x, y, z = [1.0, 1.0, 0.0], [0.1, 1.0, 0.0], [0.0, 1.0, 0.0]
    seg = _seg_with_bank(torch.tensor([c, d, x, y, z]), torch.tensor([3, 3, 1, 1, 1]), k=5, search=search)
    lab, conf, votes = seg.search(q)
    assert int(lab[0]) == 1 and votes[0].tolist() == [0, 3, 0, 2] and float(conf[0]) < 0.3


def test_vote_from_neighbors_matches_the_op():
    torch.manual_seed(1)
    bank = F.normalize(torch.randn(200, 8), dim=1)
    labels = torch.randint(0, 5, (200,))
    q = F.normalize(torch.randn(30, 8), dim=1)
    sims = q @ bank.T
    vals, idx = torch.sort(sims, dim=1, descending=True, stable=True)
    mine = vote_from_neighbors(vals[:, :7], idx[:, :7], labels, 5)
    ref = knn_vote(q, bank, labels, 7, 5)
    assert torch.equal(mine[0], ref[0]) and torch.equal(mine[2], ref[2])
    assert torch.allclose(mine[1], ref[1], atol=1e-6)
    none = vote_from_neighbors(torch.zeros(2, 3), torch.full((2, 3), -1), labels, 5)
    assert none[0].tolist() == [-1, -1] and none[1].tolist() == [0.0, 0.0]


def test_faiss_flat_equals_the_op():
    torch.manual_seed(0)
    bank = F.normalize(torch.randn(600, 16), dim=1)
    labels = torch.randint(0, 6, (600,))
    q = torch.randn(80, 16)
    seg_op = _seg_with_bank(bank, labels, names=[f"c{i}" for i in range(6)], k=25)
    seg_fa = _seg_with_bank(bank, labels, names=[f"c{i}" for i in range(6)], k=25, search="faiss")
    lo, co, vo = seg_op.search(F.normalize(q, dim=1))
    lf, cf, vf = seg_fa.search(F.normalize(q, dim=1))
    assert seg_fa._faiss.kind == "flat"
    assert torch.equal(lo, lf) and torch.equal(vo, vf)
    assert torch.allclose(co, cf, atol=1e-5)
    rows = torch.nonzero(labels % 2 == 0).flatten()
    ro, rf = seg_op.search(F.normalize(q, dim=1), rows), seg_fa.search(F.normalize(q, dim=1), rows)
    assert torch.equal(ro[0], rf[0]) and torch.equal(ro[2], rf[2]) and bool((ro[0] % 2 == 0).all())
    # k larger than the bank: clipped, like the op
    small = _seg_with_bank(bank[:10], labels[:10], names=[f"c{i}" for i in range(6)], k=25, search="faiss")
    assert int(small.search(q[:3])[2].sum(1).max()) == 10


def test_faiss_ivf_for_large_banks():
    torch.manual_seed(0)
    bank = F.normalize(torch.randn(3000, 16), dim=1)
    labels = torch.randint(0, 4, (3000,))
    q = F.normalize(torch.randn(40, 16), dim=1)
    s = FaissSearch(bank, ivf_threshold=1000, nlist_max=1024, nprobe=32)
    assert s.kind == "ivf" and s.nlist == int(math.sqrt(3000)) and s.nprobe == 32
    # probing every list makes IVF exact
    exact = FaissSearch(bank, ivf_threshold=1000, nprobe=10_000)
    assert exact.nprobe == exact.nlist
    sims, idx = exact.search(q, 25)
    ref = knn_vote(q, bank, labels, 25, 4)
    mine = vote_from_neighbors(sims, idx, labels, 4)
    assert torch.equal(mine[0], ref[0]) and torch.equal(mine[2], ref[2])
    approx = vote_from_neighbors(*s.search(q, 25), labels, 4)
    assert bool((approx[0] >= 0).all()) and float((approx[0] == ref[0]).float().mean()) > 0.5


# ----------------------------------------------------------------------------------------------- inference
def test_empty_proposal_sets_give_background(colour_data, tmp_path):
    ds, pseudo = colour_data
    seg, _ = build(tmp_path, ds, pseudo)
    img = ds.samples[0].image
    H, W = img.shape[-2:]
    out = seg.segment([img], CLASSES, proposals=[Proposals.empty(H, W)])
    assert bool((out.labels == 0).all()) and bool((out.scores[:, 0] == 1).all()) and float(out.scores[:, 1:].sum()) == 0
    tiny = torch.zeros(1, H, W, dtype=torch.bool)
    tiny[0, :3, :3] = True  # under min_area
    out = seg.segment([img], CLASSES, proposals=[Proposals(tiny, torch.ones(1))])
    assert bool((out.labels == 0).all())
    seg.config = seg.config.replace(unassigned="ignore")
    out = seg.segment([img, img], CLASSES, proposals=[Proposals.empty(H, W)] * 2)
    assert out.labels.shape == (2, H, W) and bool((out.labels == 255).all())


def test_painting_order_and_nms():
    masks = torch.zeros(3, 8, 8, dtype=torch.bool)
    masks[0, :, :5] = True
    masks[1, :, 3:] = True
    masks[2, :, :4] = True
    labels, conf = torch.tensor([1, 2, 1]), torch.tensor([0.5, 0.9, 0.7])
    keep = nms_per_class(masks, labels, conf, iou=0.4, min_area=0)
    assert keep.tolist() == [False, True, True]  # mask 0 overlaps the more confident mask 2 (IoU 0.8)
    assert nms_per_class(masks, labels, conf, iou=0.9, min_area=0).tolist() == [True, True, True]
    # mask 2 (32 px) falls under the area floor, so it no longer suppresses mask 0
    assert nms_per_class(masks, labels, conf, iou=0.4, min_area=33).tolist() == [True, True, False]
    # painting: ascending confidence, so the most confident proposal wins the overlaps
    seg = _seg_with_bank(torch.eye(4, 16), torch.arange(4), k=1, nms=False)
    label_map = torch.zeros(8, 8, dtype=torch.int64)
    score_map = torch.zeros(4, 8, 8)
    votes = F.one_hot(labels, 4)
    seg._paint(masks, labels, conf, votes, torch.arange(4), True, label_map, score_map)
    assert bool((label_map[:, 3:] == 2).all()) and bool((label_map[:, :3] == 1).all())
    assert bool((score_map[2, :, 3:] == 1).all()) and bool((score_map[0, :, :3] == 0).all())


def test_end_to_end_colour_world(tmp_path, colour_data):
    ds, pseudo = colour_data
    seg, bank = build(tmp_path, ds, pseudo)
    assert set(bank.labels.tolist()) == {0, 1, 2, 3}
    test = colour_dataset(6, offset=100, size=(61, 75))
    from weakseg.eval.metrics import ConfusionMatrix
    cm = ConfusionMatrix(4)
    for s in test.samples:
        out = seg.segment([s.image], CLASSES)
        assert isinstance(out, SegmentationOutput) and out.scores.shape == (1, 4, 61, 75)
        cm.update(out.labels[0], s.label)
    assert cm.summary(CLASSES)["percent"]["miou_present"] > 90
    assert {"propose", "backbone", "encode", "knn", "paint"} <= set(seg.timer.totals)


def test_segment_class_mapping_and_image_labels(tmp_path, colour_data):
    ds, pseudo = colour_data
    seg, _ = build(tmp_path, ds, pseudo)
    s = next(x for x in colour_dataset(20, offset=200).samples if {1, 2} <= set(x.image_labels))
    full = seg.segment([s.image], CLASSES).labels[0]
    assert {1, 2} <= set(full.unique().tolist())
    # a class left out of class_names is not predicted (its proposals become background)
    sub = seg.segment([s.image], ["background", "green"])
    assert set(sub.labels.unique().tolist()) <= {0, 1}
    assert torch.equal(sub.labels[0] == 1, full == 2)
    # a class the bank does not hold cannot be retrieved: refused, naming it and the bank's classes
    assert_raises_naming(lambda: seg.segment([s.image], ["background", "green", "zebra"]), ValueError,
                         ["class_names", "'zebra'", "not in the feature bank", "green", "weakseg bank build"])
    # with use_image_labels the vote only sees the image's classes
    seg.config = seg.config.replace(use_image_labels=True)
    only_red = torch.tensor([[True, True, False, False]])
    out = seg.segment([s.image], CLASSES, only_red)
    assert set(out.labels.unique().tolist()) <= {0, 1} and bool((out.labels[0][full == 1] == 1).all())


def test_ablation_switches_change_what_they_should(tmp_path, colour_data):
    ds, pseudo = colour_data
    _, ref = build(tmp_path, ds, pseudo, "ref.safetensors")
    _, nosbp = build(tmp_path, ds, pseudo, "nosbp.safetensors", sbp=False)
    _, hard = build(tmp_path, ds, pseudo, "hard.safetensors", pooling="hard", outlier_filter=False)
    _, nofilter = build(tmp_path, ds, pseudo, "nofilter.safetensors", outlier_filter=False)
    # the outlier filter drops floor(25 %) of every foreground class and nothing of the background
    before = nofilter.counts()
    after = ref.counts()
    for name in CLASSES[1:]:
        assert after[name] == before[name] - math.floor(before[name] * 0.25)
    assert after["background"] == before["background"] and len(nofilter) > len(ref)
    # SBP off: regions are not eroded, so the pooled vectors differ while the row structure is comparable
    assert nosbp.build["settings"]["sbp"] is False and not torch.equal(nosbp.vectors[:3], ref.vectors[:3])
    # hard pooling changes the vectors, not which regions exist (compared before the outlier filter)
    assert torch.equal(hard.labels, nofilter.labels) and hard.sample_ids == nofilter.sample_ids
    assert not torch.allclose(hard.vectors, nofilter.vectors, atol=1e-3)
    # K: every proposal gets min(k, N) votes
    for k in (1, 7):
        seg = ModuSeg(cfg(k=k), backbone=ColourPatches(), bank=ref)
        q = F.normalize(torch.randn(5, 16), dim=1)
        assert seg.search(q)[2].sum(1).tolist() == [k] * 5


def test_pseudo_method_uses_image_labels_and_majority(tmp_path):
    ds = colour_dataset(12)

    class Oracle:
        """Scores: the true class, plus an even higher score for class 3 everywhere (not in the image)."""
        config = None

        def __init__(self):
            self.seen = []

        def segment(self, images, class_names, image_labels=None):
            self.seen.append(image_labels)
            s = next(x for x in ds.samples if torch.equal(x.image, images[0]))
            sc = F.one_hot(s.label, 4).permute(2, 0, 1).float()[None]
            sc[:, 3] = 2.0
            return SegmentationOutput(sc, s.label[None], list(class_names))

    oracle = Oracle()
    seg = ModuSeg(cfg(), backbone=ColourPatches())
    without3 = next(x for x in ds.samples if 3 not in x.image_labels)
    with3 = next(x for x in ds.samples if 3 in x.image_labels)
    lab = seg.pseudo_labels(without3, CLASSES, oracle)
    assert oracle.seen[0][0].tolist() == [c in without3.image_labels for c in range(4)]
    assert torch.equal(lab, without3.label)  # class 3 scores highest everywhere but is filtered out
    assert bool((seg.pseudo_labels(with3, CLASSES, oracle) == 3).all())  # allowed here: it wins everywhere
    # majority over proposals: one proposal covering the whole image takes its majority class
    whole = lambda image: Proposals(torch.ones(1, *image.shape[-2:], dtype=torch.bool), torch.ones(1))
    seg2 = ModuSeg(cfg(pseudo_majority=True), backbone=ColourPatches(), proposer=whole)
    lab2 = seg2.pseudo_labels(without3, CLASSES, oracle)
    majority = int(torch.bincount(without3.label.flatten(), minlength=4).argmax())
    assert bool((lab2 == majority).all())
    bank = seg.build_bank(ds, tmp_path / "m.safetensors", pseudo=oracle, progress=False)
    rows = list(zip(bank.sample_ids, bank.labels.tolist()))
    assert all(c == 3 for n, c in rows if n in {x.name for x in ds.samples if 3 in x.image_labels})
    assert {c for n, c in rows if n == without3.name} == set(without3.image_labels)


def test_disk_proposals_by_key(tmp_path, colour_data):
    ds, pseudo = colour_data
    s = ds.samples[0]
    masks_dir = tmp_path / "masks"
    masks_dir.mkdir()
    Image.fromarray((s.label + 1).numpy().astype(np.uint8)).save(masks_dir / f"{s.name}.png")
    bad = ModuSeg(cfg(proposer="disk", proposer_model=str(masks_dir)), backbone=ColourPatches())
    assert_raises_naming(lambda: bad.proposer, TypeError, ["proposer_options", "disk", "scale"])
    seg = ModuSeg(cfg(proposer="disk", proposer_model=str(masks_dir), proposer_options={}, score_thresh=0.0),
                  backbone=ColourPatches())
    seg.build_bank(ds, tmp_path / "b.safetensors", pseudo=pseudo, progress=False)
    out = seg.segment([s.image], CLASSES, keys=[s.name])
    assert float((out.labels[0] == s.label).float().mean()) > 0.95
    assert_raises_naming(lambda: seg.segment([s.image], CLASSES), ValueError, ["keys"])


def test_segment_without_bank_and_bad_inputs(colour_data):
    seg = ModuSeg(cfg(), backbone=ColourPatches())
    img = colour_data[0].samples[0].image
    assert_raises_naming(lambda: seg.segment([img], CLASSES), RuntimeError, ["bank"])
    seg = _seg_with_bank(torch.eye(4, 16), torch.arange(4))
    assert_raises_naming(lambda: seg.segment([img, img[:, :10]], CLASSES), ValueError, ["one size"])
    assert_raises_naming(lambda: seg.segment([img], CLASSES, proposals=[]), ValueError, ["proposals", "one entry"])
    assert_raises_naming(lambda: seg.build_bank(colour_data[0], "/tmp/x.safetensors", pseudo="/nonexistent/dir"),
                         FileNotFoundError, ["/nonexistent/dir"])


# ----------------------------------------------------------------------------------------------- real tiny models
def test_create_with_tiny_clip_and_cli_eval(tmp_path):
    from weakseg.cli import main
    from weakseg.toy.world import ToyWorld

    train = ToyWorld(64, "train", num_scenes=5)
    gt = tmp_path / "gt"
    gt.mkdir()
    for i in range(5):
        s = train[i]
        Image.fromarray(s.label.numpy().astype(np.uint8)).save(gt / f"{s.name}.png")
    bank = tmp_path / "bank.safetensors"
    opts = ["backbone_model=tiny", "min_area=8", "erosion_iterations=2", "proposer=superpixel", "k=5"]
    assert main(["bank", "build", "--pseudo-masks", str(gt), "--dataset", "toyworld", "--limit", "5", "--out",
                 str(bank), "--backbone", "clip-dense", "--quiet", "--set", *opts]) == 0
    loaded = FeatureBank.load(bank)
    assert loaded.backbone == "clip-dense:tiny;surgery=0" and loaded.dim == 32 and len(loaded) > 5
    assert set(loaded.samples) == {train[i].name for i in range(5)}
    seg = weakseg.create("moduseg", bank=str(bank), backbone="clip-dense", set_options=opts)
    # an extractor handed on to another segmenter keeps its id, so the bank still fits
    assert ModuSeg(seg.config, backbone=seg.backbone).backbone_id == seg.backbone_id == loaded.backbone
    out = seg.segment([ToyWorld(64, "test", num_scenes=1)[0].image], list(train.class_names))
    assert out.labels.shape == (1, 64, 64) and int(out.labels.max()) < 6
    out_dir = tmp_path / "eval"
    assert main(["eval", "--method", "moduseg", "--dataset", "toyworld", "--limit", "2", "--out", str(out_dir),
                 "--quiet", "--set", f"bank={bank}", "backbone=clip-dense", *opts]) == 0
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert metrics["num_images"] == 2 and metrics["config"]["bank"] == str(bank)
    assert len(list((out_dir / "preds").glob("*.png"))) == 2
    # a mismatched backbone is a clean CLI error (exit 2), not a traceback
    assert main(["eval", "--method", "moduseg", "--dataset", "toyworld", "--limit", "1", "--out",
                 str(tmp_path / "e2"), "--quiet", "--set", f"bank={bank}", "backbone=dinov2",
                 "backbone_model=tiny"]) == 2
    assert main(["bank", "info", str(bank)]) == 0


def test_cli_pseudo_method_tiny_iseg(tmp_path):
    from weakseg.cli import main

    bank = tmp_path / "bank.safetensors"
    assert main(["bank", "build", "--pseudo-method", "iseg", "--pseudo-set", "model=tiny", "size=64", "tagger=all",
                 "--dataset", "toyworld", "--limit", "3", "--out", str(bank), "--quiet", "--set",
                 "backbone=clip-dense", "backbone_model=tiny", "min_area=8", "erosion_iterations=1"]) == 0
    b = FeatureBank.load(bank)
    assert b.build["source"].startswith("method:ISeg:") and len(b) >= 3


def test_toy_demo_with_injected_models(tmp_path, monkeypatch):
    from weakseg.backbones.features import CLIPDenseFeatures
    from weakseg.toy.world import ToyWorld

    class TinyPseudo:
        """A stand-in pseudo-mask method: a fixed random 1x1 conv of the image, restricted by the labels."""
        config = None

        def __init__(self):
            g = torch.Generator().manual_seed(0)
            self.w = torch.randn(6, 3, generator=g)
            self.calls = 0

        def segment(self, images, class_names, image_labels=None):
            self.calls += 1
            x = torch.stack(list(images)).float() / 255
            sc = torch.einsum("kc,bchw->bkhw", self.w, x).softmax(1)
            if image_labels is not None:
                sc = sc * image_labels[:, :, None, None]
            return SegmentationOutput(sc, sc.argmax(1), list(class_names))

    backbone = CLIPDenseFeatures.tiny(seed=0)
    backbone.backbone_id = "clip-dense:tiny-test"
    pseudo = TinyPseudo()
    entry = moduseg_demo(tmp_path, progress=False, pseudo=pseudo, backbone=backbone, num_train=6)
    assert isinstance(entry, DemoEntry) and entry.baseline is pseudo and isinstance(entry.method, ModuSeg)
    assert "baseline" in entry.note and pseudo.calls == 6
    assert entry.method.config.proposer == "superpixel" and entry.method.config.backbone == "clip-dense"
    bank_path = Path(entry.method.config.bank)
    assert bank_path.is_file() and bank_path.parent == tmp_path
    scene = ToyWorld(64, "test", num_scenes=1)[0]
    labels = torch.zeros(1, 6, dtype=torch.bool)
    labels[0, scene.image_labels] = True
    out = entry.method.segment([scene.image], list(ToyWorld(64).class_names), labels)
    assert out.labels.shape == (1, 64, 64)
    # the cached bank is reused
    again = moduseg_demo(tmp_path, progress=False, pseudo=pseudo, backbone=backbone, num_train=6)
    assert pseudo.calls == 6 and torch.equal(again.method.bank.vectors, entry.method.bank.vectors)
    # no work_dir: a temporary folder, overrides go over the toy config
    tmp_entry = moduseg_demo(None, progress=False, pseudo=pseudo, backbone=backbone, num_train=2, k=3)
    assert tmp_entry.method.config.k == 3 and Path(tmp_entry.method.config.bank).is_file()
    # without an injected pseudo method, the named method must have a toy recipe
    from weakseg.core import METHODS, TOY_DEMOS

    class NoToy:
        pass

    monkeypatch.setitem(METHODS._items, "_no_toy", NoToy)
    assert_raises_naming(lambda: moduseg_demo(tmp_path, progress=False, pseudo_method="_no_toy",
                                              backbone=backbone, num_train=2),
                         ValueError, ["_no_toy", "toy recipe", "pseudo="])
    # with one, its toy recipe makes the pseudo masks and is the baseline
    seen = {}

    def with_toy(work_dir=None, progress=True, **overrides):
        seen["work_dir"], seen["overrides"] = work_dir, overrides
        return DemoEntry(method=TinyPseudo(), baseline=TinyPseudo(), note="x")

    monkeypatch.setitem(METHODS._items, "_with_toy", NoToy)
    monkeypatch.setitem(TOY_DEMOS._items, "_with_toy", with_toy)
    e = moduseg_demo(tmp_path, progress=False, pseudo_method="_with_toy", backbone=backbone, num_train=2)
    assert isinstance(e.baseline, TinyPseudo) and e.baseline.calls == 2 and seen["work_dir"] == tmp_path / "_with_toy"
    assert "_with_toy" in e.note and "_with_toy" in Path(e.method.config.bank).name
    assert seen["overrides"] == {}   # no MODUSEG_TOY_PSEUDO entry: the recipe as it is
    monkeypatch.setitem(MODUSEG_TOY_PSEUDO, "_with_toy", {"steps": 3})
    moduseg_demo(tmp_path, progress=False, pseudo_method="_with_toy", backbone=backbone, num_train=2)
    assert seen["overrides"] == {"steps": 3}
    moduseg_demo(tmp_path, progress=False, pseudo_method="_with_toy", backbone=backbone, num_train=2,
                 pseudo_overrides={"ent": 0.1})
    assert seen["overrides"] == {"ent": 0.1}   # explicit settings replace the table's


def test_toy_demo_on_the_toy_architectures(tmp_path):
    """The toy configuration on the toy world's model architectures (random weights; the demo uses the trained
    ones): iSeg's toy configuration makes the pseudo masks, the toy CLIP's dense features fill the bank,
    superpixels are labelled by retrieval; the vote sees only the image's classes."""
    from weakseg.backbones.features import CLIPDenseFeatures
    from weakseg.toy.world import CLASSES as TOY_CLASSES, ToyWorld
    from weakseg.toy.models import assemble_sd, build_clip, build_unet, build_vae, text_tower_to_hf

    clip = build_clip(3)
    sd = assemble_sd(build_vae(1), build_unet(2), text_tower_to_hf(clip.model))
    pseudo = iseg_demo(tmp_path / "iseg", progress=False, backbone=sd).method
    backbone = CLIPDenseFeatures(clip)
    backbone.backbone_id = "clip-dense:toy-architecture-random"
    entry = moduseg_demo(tmp_path, progress=False, pseudo=pseudo, backbone=backbone, num_train=6)
    assert entry.baseline is pseudo and entry.method.bank.dim == 64 and len(entry.method.bank) >= 6
    assert entry.method.bank.class_names == list(TOY_CLASSES)
    scenes = [ToyWorld(64, "val", num_scenes=2)[i] for i in range(2)]
    labels = torch.zeros(2, len(TOY_CLASSES), dtype=torch.bool)
    for i, s in enumerate(scenes):
        labels[i, s.image_labels] = True
    out = entry.method.segment([s.image for s in scenes], list(TOY_CLASSES), labels)
    assert out.scores.shape == (2, 6, 64, 64) and out.labels.shape == (2, 64, 64)
    for i, s in enumerate(scenes):
        assert set(out.labels[i].unique().tolist()) <= set(s.image_labels)


# ----------------------------------------------------------------------------------------------- the authors' code

def _blob_map(seed, H=70, W=90, C=6):
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    lab = torch.zeros(H, W, dtype=torch.int64)
    for _ in range(5):
        c = int(torch.randint(1, C, (1,), generator=g))
        cy, cx, r = (int(v) for v in (torch.randint(0, H, (1,), generator=g), torch.randint(0, W, (1,), generator=g),
                                      torch.randint(8, 30, (1,), generator=g)))
        lab[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = c
    return lab


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_purify_regions_equals_the_authors_extraction(seed):
    from tests import authors_moduseg as authors

    lab = _blob_map(seed)
    classes, masks = purify_regions(lab, 6, kernel=3, iterations=4, min_area=40)
    ref = authors.extract_class_regions(lab.numpy().astype(np.uint8), 40, 5, 3, 4)
    ref = sorted((r["cls_id"], r["mask"].astype(bool)) for r in ref)  # the code lists 0 last
    assert classes == [c for c, _ in ref] and classes
    for m, (_, r) in zip(masks, ref):
        assert np.array_equal(m.numpy(), r)
    # the same regions as the erode_labels op (a 9x9 square = 3x3 four times)
    er = erode_labels_reference(lab, 9)
    for c, m in zip(classes, masks):
        assert torch.equal(m, er == c)
    with pytest.raises(ValueError, match="class ids"):
        purify_regions(torch.full((5, 5), 6), 6)
    keep_ignore = lab.clone()
    keep_ignore[:10] = 255
    assert purify_regions(keep_ignore, 6, iterations=0, min_area=1)[0] == sorted(set(keep_ignore.unique().tolist()) - {255})


@pytest.mark.parametrize("seed", [0, 1])
def test_retrieval_equals_the_authors_code(seed):
    """Votes, per-class NMS and painting of overlapping proposals, against predict_instances' steps 3-6
    and rasterize_instances (tests/authors_moduseg.py)."""
    from tests import authors_moduseg as authors

    g = torch.Generator().manual_seed(seed)
    names = [f"c{i}" for i in range(6)]
    names[0] = "background"
    centres = F.normalize(torch.randn(6, 16, generator=g), dim=1)
    blab = torch.randint(0, 6, (300,), generator=g)
    bank = F.normalize(centres[blab] + 0.3 * torch.randn(300, 16, generator=g), dim=1)
    seg = _seg_with_bank(bank, blab, names=names, k=7, min_area=30)
    H, W, Q = 40, 50, 14
    yy, xx = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    masks = torch.zeros(Q, H, W, dtype=torch.bool)
    for j in range(Q):
        cy, cx, ry, rx = (int(torch.randint(lo, hi, (1,), generator=g)) for lo, hi in ((0, H), (0, W), (4, 20), (4, 20)))
        masks[j] = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1
    q = F.normalize(centres[torch.randint(0, 6, (Q,), generator=g)] + 0.3 * torch.randn(Q, 16, generator=g), dim=1)
    lab, conf, votes = seg.search(q)
    label_map, score_map = torch.zeros(H, W, dtype=torch.int64), torch.zeros(6, H, W)
    seg._paint(masks, lab, conf, votes, torch.arange(6), True, label_map, score_map)
    inst = authors.retrieve([m.numpy() for m in masks], [v.numpy() for v in q], bank.numpy(),
                            [names[i] for i in blab.tolist()], None, 0.4, 7, 30)
    ref = authors.rasterize_instances(inst, H, W, names[1:])
    assert np.array_equal(label_map.numpy(), ref) and len(set(ref.flatten().tolist())) > 2
    # the scores: the vote share of the proposal that claims each pixel, 1 on the background elsewhere
    assert torch.allclose(score_map.sum(0), torch.ones(H, W))
    assert bool((score_map.argmax(0)[torch.from_numpy(ref) > 0] == torch.from_numpy(ref)[torch.from_numpy(ref) > 0]).all())


def test_gemm_search_equals_the_op_and_breaks_ties_by_row():
    g = torch.Generator().manual_seed(4)
    bank = F.normalize(torch.randn(500, 16, generator=g), dim=1)
    labels = torch.randint(0, 6, (500,), generator=g)
    q = F.normalize(torch.randn(40, 16, generator=g), dim=1)
    names = [f"c{i}" for i in range(6)]
    seg_g = _seg_with_bank(bank, labels, names=names, k=9, search="gemm")
    ref = knn_vote(pad16(q), pad16(bank), labels, 9, 6)
    for got in (seg_g.search(pad16(q)), _seg_with_bank(bank, labels, names=names, k=9).search(pad16(q))):
        assert torch.equal(got[0], ref[0]) and torch.equal(got[2], ref[2])
        assert torch.allclose(got[1], ref[1], atol=1e-6)
    assert ModuSegConfig().search == "auto"
    # ties at the k-th similarity: the smaller row index is taken
    dup = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [0.0, 1.0]])
    sims, idx = exact_topk(torch.tensor([[0.0, 1.0]]), dup, 2)
    assert idx.tolist() == [[1, 2]] and sims.tolist() == [[1.0, 1.0]]
