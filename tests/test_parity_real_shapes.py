"""Parity of each method's main stages with a transcription of the authors' code, at the papers' real
shapes (issue 21.3) and at a reduced size.

The oracles live in tests/authors_*.py (authors_iseg.py: iSeg's fusion, KL clustering and ERS
propagation; authors_diffusion.py: DiffSegmenter's attention store and self-attention product;
authors_diclip.py: the surgery CLIP and CAA; authors_moduseg.py: region extraction and retrieval).

Shapes (real / reduced):

* iSeg: 64x64 latent (P = 4096) / 32x32, 77 tokens, cross heads 100 at 16x16-equivalent and 30 at
  32x32-equivalent with the VOC head subsets, self-attention 5 heads of 64 (SD 2.1's 64x64 layer),
  heads [1, 2], 3 classes, ent 0.015, 10 steps, KL clustering 32 -> 36 seeds, 20 rounds.
* DiffSegmenter: P = 4096 / 1024, 8 heads of 40 (SD 1.5's 64x64 self-attention), 2 layers (the real
  model has 5; two keep the oracle's stored P x P maps at 1 GiB per prompt), 3 prompts.
* DiCLIP: ViT-B/16 (random weights) at 448 px = 28x28 patches, 21 classes (6 present) / a 12-layer
  12-head tiny CLIP at 224 px = 14x14; surgery on the last 3 blocks with a VCE-like bias.
* ModuSeg: a 512x512 21-class pseudo label map, a 20k x 768 bank, 40 proposals, k = 25 (fast enough to
  run at the real shapes by default; no reduced twin).

Inputs are random but shaped like the real ones (softmax rows for attention, sum-normalised token maps,
unit-norm features), float32, fixed seeds. Tolerances (relative to the largest magnitude of the oracle's
output): the stages are sums of up to P = 4096 float32 products, repeated up to 10 times; float32 has
eps = 1.2e-7, so a summation error of order eps·sqrt(P)·steps ~ 1e-4 is the most either side can be
expected to reach: 2e-4 bounds the 10-step propagation, 1e-4 the 12-block CLIP forward and CAA (a
squared transition after three Sinkhorn rounds), 1e-5 the single products and the fusion. Discrete
outputs (cluster labels, region masks, retrieved labels) must be equal.

The real shapes of iSeg, DiffSegmenter and DiCLIP take well over 5 s each and up to a few GiB; the suite
runs ``slow`` tests by default, so they are marked ``slow`` AND skipped unless ``WEAKSEG_REAL_SHAPES=1``;
their reduced twins (iSeg at 32x32: 49 seeds) always run. Every real shape, ModuSeg's included:
``WEAKSEG_REAL_SHAPES=1 pytest tests/test_parity_real_shapes.py -k "not reduced" -s`` (``-s`` prints each
comparison's errors and seconds).
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

REAL = os.environ.get("WEAKSEG_REAL_SHAPES", "") == "1"
_REAL_MARKS = [pytest.mark.slow,
               pytest.mark.skipif(not REAL, reason="real-shape parity runs only with WEAKSEG_REAL_SHAPES=1 "
                                                   "(slow tests are not deselected by default)")]


def _sizes(reduced, real):
    return [pytest.param(reduced, id="reduced"), pytest.param(real, id="real", marks=_REAL_MARKS)]


def _errors(mine: torch.Tensor, theirs: torch.Tensor) -> tuple[float, float]:
    """(max abs error, max abs error / max |theirs|)."""
    mine, theirs = mine.double(), theirs.double()
    assert mine.shape == theirs.shape, (mine.shape, theirs.shape)
    err = (mine - theirs).abs().max().item()
    return err, err / max(theirs.abs().max().item(), 1e-300)


def _report(what: str, shape: str, err: tuple[float, float] | None, t0: float) -> None:
    e = "exact" if err is None else f"max_abs={err[0]:.3e} max_rel={err[1]:.3e}"
    print(f"\nPARITY {what} [{shape}] {e} seconds={time.perf_counter() - t0:.1f}")


# =========================================================================================== iSeg
ISEG = _sizes(dict(side=32, r16=8, r32=16), dict(side=64, r16=16, r32=32))
ISEG_SELF_HEADS, ISEG_HEAD_DIM, ISEG_TOKENS = 5, 64, 77
ISEG_SELECTED = ((4,), (6, 7), (9,))  # three classes, one of two tokens ("potted plant" style mean)


class _FakeStore:
    """What ISeg._refine_maps reads from an AttentionStore, from full per-layer tensors sliced to the
    heads its capture specs name."""

    def __init__(self, specs, cross_probs, grids, q, k, scale):
        self._heads = {n: s.heads for s in specs for n in ((s.layers,) if isinstance(s.layers, str) else s.layers)}
        self._cross, self._grids, self._q, self._k, self._scale = cross_probs, grids, q, k, scale

    def _sel(self, name, t):
        h = self._heads[name]
        return t if h is None else t[:, list(h)]

    def probs(self, name):
        return self._sel(name, self._cross[name])

    def grid(self, name):
        return self._grids[name]

    def qk(self, name):
        return self._sel(name, self._q), self._sel(name, self._k)

    def scale(self, name):
        return self._scale

    def mean(self, name):
        q, k = self.qk(name)
        return ((q @ k.transpose(-1, -2)) * self._scale).softmax(-1).mean(1)


def _iseg_case(side, r16, r32, seed=0):
    """(ISeg-like object, its config, fake store, the authors' layer scores in forward order)."""
    from weakseg.methods.iseg import ISeg, ISegConfig
    from weakseg.methods.iseg.config import CROSS_LAYERS_16, CROSS_LAYERS_32, SELF_LAYER

    cfg = ISegConfig.from_preset("voc-wsss", model="tiny", size=8 * side)
    layers = {**{n: ("cross", 20) for n in CROSS_LAYERS_16}, **{n: ("cross", 10) for n in CROSS_LAYERS_32},
              SELF_LAYER: ("self", ISEG_SELF_HEADS)}
    m = object.__new__(ISeg)
    m.config, m.sd = cfg, SimpleNamespace(attention_layers=lambda: layers)
    m._plan_cross = {16: m._head_plan(cfg.cross_layers_16, cfg.heads_16, "16"),
                     32: m._head_plan(cfg.cross_layers_32, cfg.heads_32, "32")}

    g = torch.Generator().manual_seed(seed)
    scores, probs, grids = {}, {}, {}
    # SD's forward order: down 32, down 16, up 16, up 32, then the 64x64 self-attention layer
    order = [CROSS_LAYERS_32[0], *CROSS_LAYERS_16, *CROSS_LAYERS_32[1:]]
    token_bias = torch.randn(ISEG_TOKENS, generator=g) * 2  # some tokens attract more attention everywhere
    for name in order:
        r = r16 if name in CROSS_LAYERS_16 else r32
        h = layers[name][1]
        s = torch.randn(1, h, r * r, ISEG_TOKENS, generator=g) * 1.5 + token_bias
        scores[name], probs[name], grids[name] = s, s.softmax(-1), (r, r)
    P = side * side
    q = torch.randn(1, ISEG_SELF_HEADS, P, ISEG_HEAD_DIM, generator=g) * 2.5
    k = torch.randn(1, ISEG_SELF_HEADS, P, ISEG_HEAD_DIM, generator=g)
    scale = ISEG_HEAD_DIM ** -0.5
    scores[SELF_LAYER] = (q @ k.transpose(-1, -2)) * scale
    grids[SELF_LAYER] = (side, side)
    store = _FakeStore(m.capture_specs(), probs, grids, q, k, scale)
    return m, cfg, store, scores


def _iseg_authors(cfg, scores, side, refine: bool):
    import authors_iseg as authors

    cross, selfs = authors.attention_maps_by_resolution(scores)
    # the grids here are 16/32 (real) or 8/16 (reduced); the code's keys are the 16x16 / 32x32 layers
    r16, r32 = sorted(cross)
    cross = {16: cross[r16], 32: cross[r32]}
    c0 = authors.process_cross_att(cross, ISEG_SELECTED, index={16: cfg.heads_16, 32: cfg.heads_32},
                                   use_cluster=True, fea_size=side, number_cluster=cfg.cluster_number,
                                   stage_num=cfg.cluster_iterations, kl_dtype=torch.float64)
    if not refine:
        return c0
    return authors.ers_propagate(c0, selfs[side], heads=cfg.self_heads, ent=cfg.ent, iters=cfg.steps)


def _iseg_mine(m, store, side):
    names = [[f"c{i}" for i in range(len(ISEG_SELECTED))]]
    prompts = [SimpleNamespace(selected=ISEG_SELECTED)]
    with torch.no_grad():
        out = m._refine_maps(store, names, prompts, 1, side, side)[0]  # (K, h, w)
    return out.flatten(1).T[None]  # (1, P, K) like the authors'


@pytest.mark.parametrize("shape", ISEG)
def test_iseg_fusion_and_kl_clustering_equal_the_authors(shape):
    """Cross fusion (head subsets, sum-normalised, bilinear, 0.7/0.3), KL clustering (36 seeds, 20
    rounds; the authors' distance evaluated in float64 as weakseg does), per-class token means."""
    t0 = time.perf_counter()
    m, cfg, store, scores = _iseg_case(**shape)
    m.config = dataclasses.replace(cfg, baseline=True)
    mine = _iseg_mine(m, store, shape["side"])
    theirs = _iseg_authors(cfg, scores, shape["side"], refine=False)
    err = _errors(mine, theirs)
    _report("iseg fusion+cluster (c0)", f"P={shape['side'] ** 2} T=77 K=3", err, t0)
    # a wrong cluster label moves a pixel's row to another cluster's mean: a relative error ~1
    assert err[1] <= 1e-5, err


@pytest.mark.parametrize("fused_qk", [True, False], ids=["qk", "probs"])
@pytest.mark.parametrize("shape", ISEG)
def test_iseg_ers_propagation_equals_the_authors(shape, fused_qk):
    """The whole refinement: c0 as above, then ERS (heads [1, 2], /colmax, ent log10, clamp, row-norm)
    and 10 propagation steps with per-class min/sum normalisation — weakseg.ops.refine_propagate_qk
    (fused_qk) or refine_propagate on the head-mean probabilities."""
    t0 = time.perf_counter()
    m, cfg, store, scores = _iseg_case(**shape)
    m.config = dataclasses.replace(cfg, fused_qk=fused_qk)
    mine = _iseg_mine(m, store, shape["side"])
    theirs = _iseg_authors(cfg, scores, shape["side"], refine=True)
    err = _errors(mine, theirs)
    _report(f"iseg ERS+{cfg.steps} steps ({'qk' if fused_qk else 'probs'})",
            f"P={shape['side'] ** 2} heads 2/5 K=3", err, t0)
    assert err[1] <= 2e-4, err


# ================================================================================== DiffSegmenter
DS = _sizes(dict(res=32), dict(res=64))
DS_LAYERS, DS_HEADS, DS_DIM, DS_PROMPTS = 2, 8, 320, 3


@pytest.mark.parametrize("shape", DS)
def test_diffsegmenter_self_attention_product_equals_the_authors(shape):
    """Per prompt: the mean over every (layer, head) self-attention map of the 64x64 layers times the
    fused cross map — weakseg's capture (store="qk" -> propagate_fused; store="mean" grouped per
    resolution -> propagate_reference) on a batch of prompts vs the authors' store + product per prompt."""
    from diffusers.models.attention import AttentionMixin
    from diffusers.models.attention_processor import Attention

    from authors_diffusion import ds_attention_forward, ds_self_attention_product
    from weakseg.backbones.attention import LayerCapture, install_capture
    from weakseg.methods.diffsegmenter import propagate_fused, propagate_reference

    t0 = time.perf_counter()
    res = shape["res"]
    P = res * res

    class SelfLayers(torch.nn.Module, AttentionMixin):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.blocks = torch.nn.ModuleList(
                torch.nn.ModuleDict({"attn1": Attention(DS_DIM, heads=DS_HEADS, dim_head=DS_DIM // DS_HEADS)})
                for _ in range(DS_LAYERS))

        def forward(self, hs):
            return [b["attn1"](h) for b, h in zip(self.blocks, hs)]

    layers = SelfLayers().eval()
    g = torch.Generator().manual_seed(1)
    hs = [torch.randn(DS_PROMPTS, P, DS_DIM, generator=g) * 3 for _ in range(DS_LAYERS)]
    x = torch.rand(DS_PROMPTS, res, res, generator=g)  # each prompt's fused cross-attention map

    mine = {}
    with torch.no_grad():
        for path in ("fused", "reference"):
            spec = (LayerCapture("blocks.*.attn1", store="qk") if path == "fused"
                    else LayerCapture("blocks.*.attn1", store="mean", group="resolution", reuse=True))
            with install_capture(layers, [spec], latent_hw=(res, res)) as store:
                layers(hs)
            flat = x.reshape(DS_PROMPTS, -1)
            if path == "fused":
                mine[path] = propagate_fused([store.qk(n) for n in store.layers], flat).view(-1, res, res)
            else:
                mine[path] = propagate_reference(store.resolution_mean("self", res), flat).view(-1, res, res)
            del store

        theirs = []
        for b in range(DS_PROMPTS):  # the authors run one prompt at a time (a [cond] batch of 1)
            stored = []
            for blk, h in zip(layers.blocks, hs):
                a = blk["attn1"]
                hb = h[b:b + 1]
                q, k, v = a.to_q(hb), a.to_k(hb), a.to_v(hb)
                q, k, v = (t.view(1, P, DS_HEADS, -1).permute(0, 2, 1, 3).reshape(DS_HEADS, P, -1) for t in (q, k, v))
                ds_attention_forward(q, k, v, a.scale, stored)
            theirs.append(ds_self_attention_product(stored, 1, res, x[b]))
            del stored
        theirs = torch.stack(theirs)
    for path, out in mine.items():
        err = _errors(out, theirs)
        _report(f"diffsegmenter self-attn product ({path})", f"P={P} {DS_LAYERS}x{DS_HEADS} heads {DS_PROMPTS} prompts",
                err, t0)
        assert err[1] <= 1e-5, (path, err)


# ========================================================================================= DiCLIP
DICLIP = _sizes(dict(grid=14, model="tiny"), dict(grid=28, model="ViT-B-16"))
DICLIP_CLASSES, DICLIP_PRESENT = 21, (0, 3, 7, 12, 15, 20)


def _clip(model):
    from weakseg.backbones.clip import CLIPBackbone

    if model == "tiny":  # ViT-B/16's depth, heads and patch at a fifth of its width
        return CLIPBackbone.tiny(seed=0, image_size=224, patch_size=16, width=192, layers=12, heads=12, embed_dim=64)
    return CLIPBackbone.from_config(model, seed=0)


@pytest.mark.parametrize("shape", DICLIP)
def test_diclip_surgery_and_caa_equal_the_authors(shape):
    """The surgery CLIP's features and per-block attention (VCE bias on the last 3 blocks), then CAA
    (mean of the last 6 blocks' patch attention as the code stacks it, Sinkhorn-like transition,
    squared; per present class the boxes of the CAM at 0.79 and the product)."""
    import authors_diclip as authors
    from weakseg.backbones.clip import interpolate_pos_embed
    from weakseg.methods.diclip import cam as camlib
    from weakseg.methods.diclip import refine as reflib

    t0 = time.perf_counter()
    n = shape["grid"]
    P, side = n * n, 16 * n
    clip = _clip(shape["model"])
    g = torch.Generator().manual_seed(0)
    img = torch.randint(0, 256, (1, 3, side, side), generator=g, dtype=torch.uint8)
    x = clip.preprocess(img)
    vis = clip.model.visual
    pos = interpolate_pos_embed(vis.positional_embedding, (n, n))
    bias = torch.rand(1, P, P, generator=g)
    bias = bias / bias.sum(-1, keepdim=True)
    with torch.no_grad():
        out = clip.encode_normalized(x, pos, surgery_layers=3, attn_bias=bias, return_attn=True)
        feats = camlib.token_features(out.cls, out.patch)
        blocks = authors.from_open_clip(vis, surgery_layers=3)
        a_feats, a_attn, _ = authors.encode_image(vis, blocks, x, pos, ex_feats=bias[:, None])
    err_f = _errors(feats, a_feats)
    _report("diclip surgery features", f"{n}x{n} patches, {clip.num_layers} blocks", err_f, t0)
    assert err_f[1] <= 1e-4, err_f  # 12 blocks of float32 transformer arithmetic

    # CAMs: non-negative, a few peaked classes like CLIP CAMs after their min-max
    cams = torch.rand(P, DICLIP_CLASSES, generator=g) ** 3
    labels = torch.zeros(DICLIP_CLASSES, dtype=torch.bool)
    labels[list(DICLIP_PRESENT)] = True
    aff = reflib.caa_attention(out.attn, 6, "code", 3, out.surgery_attn, None)
    idx = torch.nonzero(labels).flatten()
    mine = reflib.caa_refine(cams[:, idx].T.reshape(-1, n, n), aff[0], 0.79)
    ref, cls_lst = authors.refine_cams_with_aff(cams, a_attn[:, 0], labels, (side, side), caa_thre=0.79)
    assert cls_lst.tolist() == idx.tolist()
    theirs = torch.stack(ref)
    assert theirs.abs().max() > 0
    err = _errors(mine, theirs)
    _report("diclip CAA (refine_cams_with_aff)", f"{n}x{n} patches, 21 classes, {len(idx)} present", err, t0)
    assert err[1] <= 1e-4, err


# ======================================================================================== ModuSeg
# the real shapes take well under a second here: they run by default, without a reduced twin
MODUSEG = [pytest.param(dict(H=512, W=512, N=20_000, D=768), id="real")]
MS_CLASSES, MS_PROPOSALS, MS_K = 21, 40, 25


def _label_map(H, W, g):
    """A 21-class pseudo label map: background with 12 overlapping elliptic blobs of random classes, large
    enough for several to survive the 41x41 erosion (3x3, 20 times)."""
    yy, xx = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    lab = torch.zeros(H, W, dtype=torch.int64)
    for _ in range(12):
        c = int(torch.randint(1, MS_CLASSES, (1,), generator=g))
        cy, cx = int(torch.randint(0, H, (1,), generator=g)), int(torch.randint(0, W, (1,), generator=g))
        ry, rx = (int(v) for v in torch.randint(H // 8, H // 5, (2,), generator=g))
        lab[((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1] = c
    return lab


@pytest.mark.parametrize("shape", MODUSEG)
def test_moduseg_region_extraction_equals_the_authors(shape):
    """Semantic boundary purification: per class cv2.erode 3x3 x 20 and the 300-pixel floor."""
    import authors_moduseg as authors
    from weakseg.methods.moduseg import purify_regions

    t0 = time.perf_counter()
    H, W = shape["H"], shape["W"]
    lab = _label_map(H, W, torch.Generator().manual_seed(0))
    classes, masks = purify_regions(lab, MS_CLASSES)
    ref = sorted((r["cls_id"], r["mask"].astype(bool))
                 for r in authors.extract_class_regions(lab.numpy().astype(np.uint8), 300, MS_CLASSES - 1))
    assert len(classes) >= 5 and classes[0] == 0  # enough classes survive for the comparison to mean something
    assert classes == [c for c, _ in ref]
    for mk, (_, r) in zip(masks, ref):
        assert np.array_equal(mk.numpy(), r)
    _report("moduseg region extraction", f"{H}x{W}, {MS_CLASSES} classes, {len(classes)} regions", None, t0)


@pytest.mark.parametrize("shape", MODUSEG)
def test_moduseg_retrieval_equals_the_authors(shape):
    """Cosine top-25 in the bank, the vote (count, then similarity sum), per-class NMS at IoU 0.4, the
    painting in score order — label maps equal to the authors' (matrix-product search)."""
    import authors_moduseg as authors
    from weakseg.methods.moduseg import FeatureBank, ModuSeg, ModuSegConfig

    t0 = time.perf_counter()
    H, W, N, D = shape["H"], shape["W"], shape["N"], shape["D"]
    g = torch.Generator().manual_seed(0)
    names = ["background"] + [f"c{i}" for i in range(1, MS_CLASSES)]
    centres = F.normalize(torch.randn(MS_CLASSES, D, generator=g), dim=1)
    blab = torch.randint(0, MS_CLASSES, (N,), generator=g)
    # noise of norm ~1.5 around unit centres, whatever D: the neighbours of a query are mixed
    spread = 1.5 / math.sqrt(D)
    bank_v = F.normalize(centres[blab] + spread * torch.randn(N, D, generator=g), dim=1)

    class Stand:  # a stand-in backbone: only its id and dim are read
        backbone_id, dim = "parity", D

    bank = FeatureBank(bank_v, blab, torch.zeros(N, dtype=torch.int64), ["s"], names, "parity")
    seg = ModuSeg(ModuSegConfig(proposer="superpixel"), backbone=Stand(), bank=bank)
    yy, xx = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    pm = torch.zeros(MS_PROPOSALS, H, W, dtype=torch.bool)
    for j in range(MS_PROPOSALS):
        cy, cx = int(torch.randint(0, H, (1,), generator=g)), int(torch.randint(0, W, (1,), generator=g))
        ry, rx = torch.randint(H // 25, H // 4, (2,), generator=g).tolist()
        pm[j] = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1
    qlab = torch.randint(0, MS_CLASSES, (MS_PROPOSALS,), generator=g)
    q = F.normalize(centres[qlab] + spread * torch.randn(MS_PROPOSALS, D, generator=g), dim=1)

    lab_, conf, votes = seg.search(q)
    mine = torch.zeros(H, W, dtype=torch.int64)
    scores = torch.zeros(MS_CLASSES, H, W)
    seg._paint(pm, lab_, conf, votes, torch.arange(MS_CLASSES), True, mine, scores)
    inst = authors.retrieve([m.numpy() for m in pm], [v.numpy() for v in q], bank_v.numpy(),
                            [names[i] for i in blab.tolist()], None, 0.4, MS_K, 300)
    theirs = authors.rasterize_instances(inst, H, W, names[1:])
    assert ModuSegConfig().k == MS_K
    assert len(set(theirs.flatten().tolist())) > 3
    assert np.array_equal(mine.numpy(), theirs)
    _report("moduseg retrieval (label map)", f"{H}x{W}, bank {N}x{D}, {MS_PROPOSALS} proposals, k={MS_K}", None, t0)
