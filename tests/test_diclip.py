"""DiCLIP's pieces on hand cases and against straightforward references, and the segmenter on tiny models."""

import math

import pytest
import torch

from tests._helpers import assert_raises_naming, diclip_tiny_models, make_diclip as make
from weakseg.backbones.clip import CLIPBackbone
from weakseg.methods.diclip import cam as camlib
from weakseg.methods.diclip import refine as reflib
from weakseg.methods.diclip import vce as vcelib
from weakseg.methods.diclip import DiCLIP, DiCLIPConfig
from weakseg.methods.diclip.modules import (KVAdapter, SegHead, affinity_labels, affinity_loss, balanced_seg_loss,
                                            radius_mask)

NAMES = ["background", "cat", "dog"]


@pytest.fixture(scope="module")
def models():
    return diclip_tiny_models()


def images(n=2, seed=0, size=64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)
    x[:, :, 16:40, 16:40] = torch.tensor([220, 40, 40], dtype=torch.uint8)[:, None, None]  # a red block
    return x


# ------------------------------------------------------------------------------------------- CAMs

def test_token_features_divides_by_the_norm_over_tokens():
    cls, patch = torch.randn(2, 8), torch.randn(2, 3, 4, 8)
    f = camlib.token_features(cls, patch)
    assert f.shape == (2, 13, 8)
    torch.testing.assert_close(f.norm(dim=1), torch.ones(2, 8))
    raw = torch.cat([cls[:, None], patch.flatten(1, 2)], 1)
    torch.testing.assert_close(f, raw / raw.norm(dim=1, keepdim=True))
    torch.testing.assert_close(camlib.token_features(cls, patch, "channels").norm(dim=-1), torch.ones(2, 13))


def test_surgery_similarity_matches_the_elementwise_reference():
    g = torch.Generator().manual_seed(1)
    feats, rows = torch.randn(3, 10, 16, generator=g), torch.randn(7, 16, generator=g)
    torch.testing.assert_close(camlib.surgery_similarity(feats, rows), camlib.surgery_similarity_reference(feats, rows),
                               rtol=1e-5, atol=1e-5)


def test_surgery_similarity_hand_case():
    # one image, CLS orthogonal to both rows -> w = 1; S = G - mean_k G
    feats = torch.tensor([[[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 2.0, 0.0]]])
    rows = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    s = camlib.surgery_similarity(feats, rows)
    torch.testing.assert_close(s, torch.tensor([[[0.0, 0.0], [0.5, -0.5], [-1.0, 1.0]]]))


def test_patch_text_cam_minmax_includes_cls_and_drops_it():
    g = torch.Generator().manual_seed(2)
    feats, text = torch.randn(2, 1 + 12, 8, generator=g), torch.randn(5, 8, generator=g)
    cam = camlib.patch_text_cam(feats, text, 3)
    assert cam.shape == (2, 12, 3)
    s = camlib.surgery_similarity_reference(feats, text).double()
    ref = (s - s.amin(1, keepdim=True)) / (s.amax(1, keepdim=True) - s.amin(1, keepdim=True))
    torch.testing.assert_close(cam, ref[:, 1:, :3].float(), rtol=1e-4, atol=1e-5)
    assert cam.min() >= 0 and cam.max() <= 1
    with pytest.raises(ValueError, match="num_classes"):
        camlib.patch_text_cam(feats, text, 6)


def test_text_weighted_values_hand_case():
    keys = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    values = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 1.0, 0.0]])  # bg, cat, cat; dog has no key
    text = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.5, 0.5]])
    w = camlib.text_weighted_values(keys, values, text)
    # cat column: softmax over keys 1, 2 of K·t_cat = [0, 1]
    e = torch.tensor([math.exp(0.0), math.exp(1.0)])
    torch.testing.assert_close(w[:, 1], torch.tensor([0.0, *(e / e.sum()).tolist()]))
    torch.testing.assert_close(w[:, 0], torch.tensor([1.0, 0.0, 0.0]))
    torch.testing.assert_close(w[:, 2], torch.zeros(3))


def test_static_cache_cam_matches_the_spec_formula():
    g = torch.Generator().manual_seed(3)
    feats, keys = torch.randn(2, 1 + 9, 6, generator=g), torch.randn(5, 6, generator=g)
    values = torch.eye(3)[torch.tensor([0, 0, 1, 2, 2])]
    text = torch.randn(3, 6, generator=g)
    w = camlib.text_weighted_values(keys, values, text)
    got = camlib.static_cache_cam(feats, keys, w)
    # reference: element-wise surgery similarity, ReLU, retrieval, min-max, fg·(1−bg), ReLU, min-max
    s = camlib.surgery_similarity_reference(feats, keys).clamp_min(0)
    r = s[:, 1:] @ w
    mm = lambda x: (x - x.amin(1, keepdim=True)) / (x.amax(1, keepdim=True) - x.amin(1, keepdim=True))
    r = mm(r)
    ref = mm((r[..., 1:] * (1 - r[..., :1])).clamp_min(0))
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    cam_pt = torch.rand(2, 9, 2, generator=g)
    torch.testing.assert_close(camlib.combine_cams(cam_pt, got, 0.5), mm(cam_pt + 0.5 * got))


def test_cache_text_rows_keeps_the_background_mean_unnormalised():
    cls_rows, bg_rows = torch.randn(2, 4), torch.randn(3, 4)
    t = camlib.cache_text_rows(cls_rows, bg_rows)
    torch.testing.assert_close(t[0], bg_rows.mean(0))
    torch.testing.assert_close(t[1:], cls_rows)


# ------------------------------------------------------------------------------------------- VCE / ACR

def test_sd_affinity_matches_reference_chain_and_mean():
    g = torch.Generator().manual_seed(4)
    q, k = torch.randn(2, 2, 16, 5, generator=g), torch.randn(2, 2, 16, 5, generator=g)
    for mode in ("chain", "mean"):
        for thr in (0.2, 5e-4):
            torch.testing.assert_close(vcelib.sd_affinity(q, k, thr, mode),
                                       vcelib.sd_affinity_reference(q, k, thr, mode),
                                       rtol=1e-4, atol=1e-6)
    a = vcelib.sd_affinity(q, k, 0.2, "mean")
    s = a.sum(-1)
    assert torch.all((s - 1).abs() < 1e-5) or torch.all((s == 0) | ((s - 1).abs() < 1e-5))


def test_sd_affinity_hand_case():
    # one head, P = 2: L = q kᵀ = [[2, 1], [0.5, 4]]; colmax = [2, 4] -> [[1, .25], [.25, 1]]
    q = torch.tensor([[[[2.0, 0.0], [0.0, 1.0]]]])
    k = torch.tensor([[[[1.0, 0.5], [0.5, 4.0]]]])
    a = vcelib.sd_affinity(q, k, threshold=0.3)  # 0.25 < 0.3: cut
    torch.testing.assert_close(a[0], torch.eye(2))
    a = vcelib.sd_affinity(q, k, threshold=0.2)  # kept, rows normalised
    e = 1e-5
    m = torch.tensor([[2 / (2 + e), 1 / (4 + e)], [0.5 / (2 + e), 4 / (4 + e)]])
    m = m / m.sum(1, keepdim=True)
    torch.testing.assert_close(a[0], m)


def test_upsample_tokens():
    x = torch.arange(2 * 1 * 4 * 3, dtype=torch.float32).reshape(2, 1, 4, 3)
    assert vcelib.upsample_tokens(x, (2, 2), (2, 2)) is x
    y = vcelib.upsample_tokens(x, (2, 2), (4, 4))
    assert y.shape == (2, 1, 16, 3)
    ref = torch.nn.functional.interpolate(x.reshape(2, 2, 2, 3).permute(0, 3, 1, 2), size=(4, 4), mode="bilinear",
                                          align_corners=False)
    torch.testing.assert_close(y, ref.permute(0, 2, 3, 1).reshape(2, 1, 16, 3))


def test_acr_seeds_code_grid_and_exact():
    s = vcelib.acr_seeds(20, 20, 9)
    want = [r * 20 + c for r in (0, 6, 12, 18) for c in (0, 6, 12, 18)]
    assert s.tolist() == want  # 16 anchors for 9 requested clusters, as the code
    assert vcelib.acr_seeds(20, 20, 9, exact=True).numel() == 9


def test_cluster_mean_rows_equals_indicator_product():
    g = torch.Generator().manual_seed(5)
    a = torch.rand(2, 12, 12, generator=g)
    labels = torch.randint(0, 4, (2, 12), generator=g)
    labels[:, :4] = torch.arange(4)  # every label present
    torch.testing.assert_close(vcelib.cluster_mean_rows(a, labels), vcelib.acr_reference(a, labels, 1))


def test_acr_against_reference_and_idempotent():
    from weakseg.ops import kl_kmeans_reference

    g = torch.Generator().manual_seed(6)
    q, k = torch.randn(1, 2, 36, 4, generator=g), torch.randn(1, 2, 36, 4, generator=g)
    a = vcelib.sd_affinity(q, k)
    ref_, labels = vcelib.acr(a, (6, 6), clusters=4, kmeans_iterations=5, iterations=3)
    # the labels are kl_kmeans on the columns from the grid seeds
    cols = a.transpose(1, 2).contiguous()
    cols = torch.where(cols == 0, torch.full_like(cols, 1e-6), cols)
    ref_labels, _ = kl_kmeans_reference(cols, vcelib.acr_seeds(6, 6, 4), 5)
    assert torch.equal(labels, ref_labels)
    torch.testing.assert_close(ref_, vcelib.acr_reference(a, labels, 3), rtol=1e-5, atol=1e-6)
    one, _ = vcelib.acr(a, (6, 6), clusters=4, iterations=1)
    torch.testing.assert_close(one, ref_, rtol=1e-5, atol=1e-7)  # the code's 3 passes are idempotent
    rec, _ = vcelib.acr(a, (6, 6), clusters=4, iterations=3, recluster=True)
    assert rec.shape == a.shape and torch.isfinite(rec).all()


# ------------------------------------------------------------------------------------------- refinement

def test_box_mask_hand_case_with_the_codes_clipping():
    cam = torch.zeros(6, 8)
    cam[1:4, 2:5] = 1.0  # a 3x3 blob
    m = reflib.box_mask(cam, 0.5)
    want = torch.zeros(6, 8)
    want[1:4, 2:5] = 1
    assert torch.equal(m, want)
    cam = torch.zeros(6, 8)
    cam[3:6, 5:8] = 1.0  # touching the bottom-right border: the right/bottom edges are clipped to w-1 / h-1
    want = torch.zeros(6, 8)
    want[3:5, 5:7] = 1
    assert torch.equal(reflib.box_mask(cam, 0.5), want)
    assert reflib.box_mask(torch.zeros(4, 4), 0.5).sum() == 0


def test_caa_refine_matches_a_loop_reference():
    g = torch.Generator().manual_seed(7)
    aff = torch.rand(16, 16, generator=g)
    cams = torch.rand(2, 4, 4, generator=g)
    got = reflib.caa_refine(cams, aff, 0.6)
    t = aff.double()
    t = t / t.sum(0, keepdim=True); t = t / t.sum(1, keepdim=True)
    for _ in range(2):
        t = t / t.sum(0, keepdim=True); t = t / t.sum(1, keepdim=True)
    t = (t + t.T) / 2
    t = t @ t
    for c in range(2):
        m = reflib.box_mask(cams[c], 0.6).flatten().double()
        ref = (t * m[None]) @ cams[c].flatten().double()
        torch.testing.assert_close(got[c].flatten(), ref.float(), rtol=1e-5, atol=1e-6)
    tr = reflib.caa_transition(aff)
    torch.testing.assert_close(tr, tr.T)


def test_caa_attention_modes_on_a_hand_case():
    g = torch.Generator().manual_seed(8)
    attn = [torch.rand(1, 4, 5, 5, generator=g) for _ in range(4)]
    surg = [torch.rand(1, 5, 5, generator=g) * 30 for _ in range(2)]
    # "code": the last 2 (surgery) blocks summed over the heads, the one before head-averaged
    a = reflib.caa_attention(attn, layers=3, surgery_layers=2)
    torch.testing.assert_close(a, (attn[1].mean(1) + attn[2].sum(1) + attn[3].sum(1))[:, 1:, 1:] / 3)
    s = reflib.caa_attention(attn, layers=3, mode="surgery", surgery_layers=2, surgery_attn=surg)
    torch.testing.assert_close(s, (attn[1].mean(1) + surg[0] + surg[1])[:, 1:, 1:] / 3)
    m = reflib.caa_attention(attn, layers=3, mode="head-mean", surgery_layers=2)
    torch.testing.assert_close(m, (attn[1].mean(1) + attn[2].mean(1) + attn[3].mean(1))[:, 1:, 1:] / 3)
    seg = torch.rand(1, 4, 4, generator=g)
    gated = reflib.caa_attention(attn, layers=3, surgery_layers=2, seg_attn=seg)
    mats = [attn[1].mean(1)[:, 1:, 1:], attn[2].sum(1)[:, 1:, 1:], attn[3].sum(1)[:, 1:, 1:]]
    diffs = torch.stack([(seg - m).sum() for m in mats])
    keep = [m for m, d in zip(mats, diffs) if d <= diffs.mean()]
    torch.testing.assert_close(gated, sum(keep) / (len(keep) + 1e-5) * seg, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="mode"):
        reflib.caa_attention(attn, mode="sum")
    with pytest.raises(ValueError, match="surgery_attn"):
        reflib.caa_attention(attn, mode="surgery", surgery_layers=2)


def test_caa_surgery_block_rows_sum_to_the_head_count():
    # probabilities with no mass on the CLS column: every patch row of a head sums to 1
    p = torch.rand(2, 3, 5, 5)
    p[..., 0] = 0
    p = p / p.sum(-1, keepdim=True)
    rows = reflib.caa_attention([p, p], layers=1, surgery_layers=1).sum(-1)
    torch.testing.assert_close(rows, torch.full((2, 4), 3.0))
    torch.testing.assert_close(reflib.caa_attention([p, p], layers=1, surgery_layers=0).sum(-1), torch.ones(2, 4))
    # a real CLIP forward: the last block's patch rows plus their CLS column sum to the head count
    clip = CLIPBackbone.tiny(seed=1, layers=4, heads=4)
    out = clip(images(1), surgery_layers=3, return_attn=True)
    a = reflib.caa_attention(out.attn, layers=1, surgery_layers=3)
    total = a.sum(-1) + out.attn[-1][:, :, 1:, 0].sum(1)
    torch.testing.assert_close(total, torch.full_like(total, 4.0))


def _authors_caa_case(seed=0, layers=8, heads=4, seg=False):
    """weakseg's CAA next to the authors' code (tests/authors_diclip.py) on a small random CLIP with a
    VCE-like bias on the surgery attention: (weakseg's refined CAMs, the authors', their features)."""
    from tests import authors_diclip as authors
    from weakseg.backbones.clip import interpolate_pos_embed

    g = torch.Generator().manual_seed(seed)
    clip = CLIPBackbone.tiny(seed=seed, layers=layers, heads=heads)
    x = clip.preprocess(images(2, seed=seed))
    vis = clip.model.visual
    pos = interpolate_pos_embed(vis.positional_embedding, (8, 8))
    P = 64
    bias = torch.rand(2, P, P, generator=g)
    bias = bias / bias.sum(-1, keepdim=True)
    with torch.no_grad():
        out = clip.encode_normalized(x, pos, surgery_layers=3, attn_bias=bias, return_attn=True)
    feats = camlib.token_features(out.cls, out.patch)
    blocks = authors.from_open_clip(vis, surgery_layers=3)
    a_feats, a_attn, _ = authors.encode_image(vis, blocks, x, pos, ex_feats=bias[:, None])
    cams = torch.rand(2, P, 3, generator=g) ** 3
    labels = torch.tensor([[1, 0, 1], [1, 1, 1]], dtype=torch.bool)
    seg_attn = torch.rand(2, P, P, generator=g) if seg else None
    aff = reflib.caa_attention(out.attn, 6, "code", 3, out.surgery_attn, seg_attn)
    mine, theirs = [], []
    for b in range(2):
        idx = torch.nonzero(labels[b]).flatten()
        mine.append(reflib.caa_refine(cams[b][:, idx].T.reshape(-1, 8, 8), aff[b], 0.79))
        ref, cls_lst = authors.refine_cams_with_aff(cams[b], a_attn[:, b], labels[b], (64, 64), caa_thre=0.79,
                                                    seg_attn=None if seg_attn is None else seg_attn[b:b + 1], patch=8)
        assert cls_lst.tolist() == idx.tolist()
        theirs.append(torch.stack(ref))
    return mine, theirs, feats, a_feats


@pytest.mark.parametrize("seg", [False, True])
def test_caa_equals_the_authors_code_on_a_small_clip(seg):
    mine, theirs, feats, a_feats = _authors_caa_case(seg=seg)
    torch.testing.assert_close(feats, a_feats, rtol=1e-4, atol=1e-6)  # the same CLIP, bias included
    for m, t in zip(mine, theirs):
        assert t.abs().max() > 0
        torch.testing.assert_close(m, t, rtol=1e-4, atol=1e-6)


def test_caa_surgery_and_head_mean_modes_differ_from_the_code():
    clip = CLIPBackbone.tiny(seed=1, layers=4, heads=4)
    out = clip(images(1), surgery_layers=3, return_attn=True)
    code = reflib.caa_attention(out.attn, 6, "code", 3)
    surg = reflib.caa_attention(out.attn, 6, "surgery", 3, out.surgery_attn)
    mean = reflib.caa_attention(out.attn, 6, "head-mean", 3)
    assert not torch.allclose(code, surg) and not torch.allclose(code, mean)


def test_config_refuses_the_old_caa_surgery_option():
    with pytest.raises(ValueError, match="caa_surgery.*caa_attention"):
        DiCLIPConfig.from_dict({"preset": "tiny", "caa_surgery": True})
    with pytest.raises(ValueError, match="caa_attention"):
        DiCLIPConfig(preset="tiny", caa_attention="sum")
    assert DiCLIPConfig().caa_attention == "code"


def test_sd_walk_matches_the_spec_reference():
    g = torch.Generator().manual_seed(9)
    q, k = torch.randn(1, 2, 25, 4, generator=g), torch.randn(1, 2, 25, 4, generator=g)
    maps = torch.rand(1, 25, 3, generator=g)
    torch.testing.assert_close(reflib.sd_walk(q, k, maps, 5), reflib.walk_reference(q, k, maps, 5), rtol=1e-4,
                               atol=1e-6)


def test_par_shapes_and_bounds():
    g = torch.Generator().manual_seed(10)
    img = torch.randn(1, 3, 16, 16, generator=g)
    masks = torch.rand(1, 2, 4, 4, generator=g)
    out = reflib.PAR(dilations=(1, 2), iterations=3)(img, masks)
    assert out.shape == (1, 2, 16, 16)
    up = torch.nn.functional.interpolate(masks, size=(16, 16), mode="bilinear", align_corners=True)
    # each step is a convex combination (weights sum to 1 + 0.01) of neighbour values
    assert out.max() <= up.max() * 1.01 ** 3 + 1e-6 and out.min() >= 0
    const = reflib.PAR(dilations=(1,), iterations=2)(img, torch.ones(1, 1, 4, 4))
    torch.testing.assert_close(const, torch.full_like(const, 1.01 ** 2))


# ------------------------------------------------------------------------------------------- adapter, head, losses

def test_adapter_initialisation():
    keys = torch.randn(5, 8)
    values = torch.eye(3)[torch.tensor([0, 0, 1, 2, 2])]
    ad = KVAdapter(keys, values, prompts=4, seed=0)
    assert ad.fc1.weight.shape == (9, 8) and ad.fc2.weight.shape == (3, 9)
    assert torch.equal(ad.fc1.weight[:5], keys)
    assert torch.equal(ad.fc2.weight[:, :5], values.T)  # the raw one-hot values (the code)
    assert ad.fc1.weight[5:].abs().max() <= 2 and ad.fc2.weight[:, 5:].abs().max() <= 2  # trunc-normal, std 1
    assert ad.fc1.bias.abs().sum() > 0  # PyTorch's default bias init, not zero
    again = KVAdapter(keys, values, prompts=4, seed=0)
    assert torch.equal(again.fc1.weight, ad.fc1.weight) and torch.equal(again.fc2.bias, ad.fc2.bias)
    tw = torch.rand(5, 3)
    paper = KVAdapter(keys, values, prompts=4, zero_bias=True, fc2_values=tw)
    assert paper.fc1.bias.abs().sum() == 0 and torch.equal(paper.fc2.weight[:, :5], tw.T)
    ad.eval()
    x = torch.randn(2, 7, 8)
    ref = ad.fc2(torch.relu(ad.fc1(x)))
    torch.testing.assert_close(ad(x), ref)
    with pytest.raises(ValueError, match="keys"):
        KVAdapter(torch.randn(5, 8), torch.eye(3)[:4])


def test_balanced_seg_loss_hand_case():
    logits = torch.tensor([[[[2.0, 0.0, 1.0]], [[0.0, 3.0, 1.0]]]])  # (1, 2, 1, 3)
    labels = torch.tensor([[[0, 1, 255]]])
    lp = torch.log_softmax(logits, dim=1)
    want = 0.5 * (-lp[0, 0, 0, 0] - lp[0, 1, 0, 1])
    torch.testing.assert_close(balanced_seg_loss(logits, labels), want)
    # two background pixels, no foreground: half the background CE
    labels = torch.tensor([[[0, 0, 255]]])
    torch.testing.assert_close(balanced_seg_loss(logits, labels), 0.5 * (-(lp[0, 0, 0, 0] + lp[0, 0, 0, 1]) / 2))
    assert balanced_seg_loss(logits, torch.full((1, 1, 3), 255)).item() == 0


def test_affinity_labels_and_loss_hand_case():
    labels = torch.tensor([[[1, 1], [0, 255]]])
    aff = affinity_labels(labels, (2, 2), radius=8)
    want = torch.tensor([[255, 1, 0, 255], [1, 255, 0, 255], [0, 0, 255, 255], [255, 255, 255, 255]])
    assert torch.equal(aff[0], want)
    assert radius_mask(1, 5, 1)[0].tolist() == [True, True, False, False, False]
    far = affinity_labels(torch.zeros(1, 1, 5, dtype=torch.long), (1, 5), radius=1)
    assert far[0, 0, 2] == 255 and far[0, 0, 1] == 1
    p = torch.full((1, 4, 4), 0.25)
    # 2 positive pairs, 4 negative pairs: 0.5·2·0.75/3 + 0.5·4·0.25/5
    torch.testing.assert_close(affinity_loss(p, aff), torch.tensor(0.5 * 1.5 / 3 + 0.5 * 1.0 / 5))


def test_seg_head_shapes():
    head = SegHead(in_width=16, num_layers=3, num_classes=4, dim=8, blocks=2, heads=2).eval()
    layers = [torch.randn(2, 1 + 12, 16) for _ in range(3)]
    logits, attn = head(layers, (3, 4))
    assert logits.shape == (2, 4, 3, 4) and attn.shape == (2, 12, 12)
    assert attn.min() > 0 and attn.max() < 1
    with pytest.raises(ValueError, match="layers"):
        head(layers[:2], (3, 4))


# ------------------------------------------------------------------------------------------- the segmenter

def test_vce_bias_enters_every_head_of_the_surgery_attention(models):
    m = make(models)
    x = images(1)
    fwd = m.forward(x)
    assert fwd.bias is not None and fwd.bias.shape == (1, 64, 64)
    # the bias equals sd_affinity + ACR recomputed from the SD pass
    a = vcelib.sd_affinity(vcelib.upsample_tokens(fwd.sd.vce_q, fwd.sd.vce_grid, fwd.grid),
                           vcelib.upsample_tokens(fwd.sd.vce_k, fwd.sd.vce_grid, fwd.grid))
    ref, _ = vcelib.acr(a, fwd.grid, 9, 5, 3)
    torch.testing.assert_close(fwd.bias, ref)
    plain = m.forward(x, vce=False)
    heads = m.clip.num_heads
    for with_b, without in zip(fwd.out.surgery_attn, plain.out.surgery_attn):
        torch.testing.assert_close(with_b[:, 1:, 1:] - without[:, 1:, 1:], heads * fwd.bias, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(with_b[:, 0], without[:, 0])  # the CLS row is untouched
    assert not torch.allclose(fwd.feats, plain.feats)


def test_segment_shapes_and_allowed_classes(models):
    m = make(models)
    x = images(2)
    labels = torch.tensor([[1, 1, 0], [1, 0, 1]], dtype=torch.bool)
    out = m.segment(x, NAMES, labels)
    assert out.scores.shape == (2, 3, 64, 64) and out.labels.shape == (2, 64, 64)
    assert set(out.labels[0].unique().tolist()) <= {0, 1} and set(out.labels[1].unique().tolist()) <= {0, 2}
    assert out.scores[0, 2].abs().sum() == 0
    assert set(m.timer.totals) == {"unet", "vce", "clip", "refine"} and all(v > 0 for v in m.timer.totals.values())
    again = m.segment(x, NAMES, labels)
    assert torch.equal(again.labels, out.labels)  # seeded noise: deterministic
    # other image sizes come back at their size
    out = m.segment([images(1, size=56)[0][:, :40]], NAMES)
    assert out.labels.shape == (1, 40, 56)


def test_segment_variants_run(models):
    x = images(1)
    for kw in (dict(vce=False, refine=()), dict(refine=("par",), par_dilations=(1, 2), par_iterations=2),
               dict(vce_head_mode="mean", vce_threshold=5e-4, acr_exact_seeds=True, acr_recluster=True),
               dict(refine=("caa",)), dict(feature_norm="channels")):
        out = make(models, **kw).segment(x, NAMES)
        assert out.labels.shape == (1, 64, 64)


def test_config_errors(models):
    assert_raises_naming(lambda: DiCLIPConfig(mode="x"), ValueError, ["mode"])
    assert_raises_naming(lambda: DiCLIPConfig(refine=("walk", "crf")), ValueError, ["refine"])
    assert_raises_naming(lambda: DiCLIPConfig(mode="head"), ValueError, ["checkpoint"])
    assert_raises_naming(lambda: DiCLIPConfig.from_dict({"nope": 1}), ValueError, ["nope"])
    assert_raises_naming(lambda: DiCLIPConfig(preset="nope"), ValueError, ["preset"])
    assert_raises_naming(lambda: make(models, vce_layer="up_blocks.9.attn1").segment(images(1), NAMES), ValueError,
                         ["vce_layer"])
    assert_raises_naming(lambda: make(models, walk_heads=(7,)).segment(images(1), NAMES), ValueError, ["walk_heads"])
    assert_raises_naming(lambda: make(models, size=60), ValueError, ["size"])
    assert_raises_naming(lambda: make(models).segment(images(1), ["cat", "dog"]), ValueError, ["background"])
    assert_raises_naming(lambda: make(models, cam_source="dynamic"), ValueError, ["dynamic"])


def test_registered():
    import weakseg

    assert "diclip" in weakseg.list_methods()
    cfg = DiCLIPConfig.from_dict({"preset": "toy"})
    assert cfg.size == 64 and cfg.vce_heads == (0, 1) and cfg.clip_model == "toy"
    voc = DiCLIPConfig()
    assert voc.templates == "origami" and voc.class_prompts["person"] == "person with clothes,people,human"
    assert voc.vce_layer.startswith("up_blocks.1.attentions.2")
    assert voc.walk_layer.startswith("up_blocks.3.attentions.1")


def test_toy_preset_fits_the_toy_architecture():
    """The "toy" preset's sizes, layers and heads exist in the toy world's models (random weights here)."""
    from weakseg.toy.world import ToyWorld
    from weakseg.toy.models import assemble_sd, build_clip, build_unet, build_vae, text_tower_to_hf

    clip = build_clip(3)
    sd = assemble_sd(build_vae(1), build_unet(2), text_tower_to_hf(clip.model))
    m = DiCLIP(DiCLIPConfig.from_dict({"preset": "toy"}), clip=clip, sd=sd)
    w = ToyWorld(64, "val", num_scenes=1)
    sc = w[0]
    lab = torch.zeros(1, len(w.class_names), dtype=torch.bool)
    lab[0, sc.image_labels] = True
    fwd = m.forward(sc.image[None])
    assert fwd.grid == (8, 8) and fwd.sd.vce_grid == (8, 8) and fwd.sd.walk_grid == (16, 16)
    out = m.segment([sc.image], w.class_names, lab)
    assert out.labels.shape == (1, 64, 64)
    assert set(out.labels.unique().tolist()) <= set(sc.image_labels)


# ------------------------------------------------------------------------------------------- cache build

def test_kmeans_centroids_default_is_the_codes_kmeans_call():
    from sklearn.cluster import KMeans

    from weakseg.methods.diclip import cache as cachelib

    g = torch.Generator().manual_seed(3)
    x = torch.cat([torch.randn(30, 8, generator=g) + 3 * torch.randn(1, 8, generator=g) for _ in range(6)])
    # the authors' call: KMeans(n_clusters, random_state=0) on their float32 features
    ref = torch.from_numpy(KMeans(n_clusters=4, random_state=0).fit(x.float().numpy()).cluster_centers_)
    torch.testing.assert_close(cachelib.kmeans_centroids(x, 4), ref.float())
    ten = cachelib.kmeans_centroids(x, 4, n_init=10)  # the former pinned choice, still available
    assert ten.shape == (4, 8) and not torch.allclose(ten, ref.float())
    with pytest.raises(ValueError, match="n_init"):
        cachelib.kmeans_centroids(x, 4, n_init=0)


def test_cache_masks_are_made_at_the_image_size(models, monkeypatch):
    m = make(models)
    seen = []
    orig = m.labels_from_maps

    def spy(maps, allowed, names, size):
        seen.append(size)
        return orig(maps, allowed, names, size)

    monkeypatch.setattr(m, "labels_from_maps", spy)
    img = images(1, size=96)[0]
    pooled = m.pseudo_mask_features(img, NAMES, [0, 1])
    assert seen == [(96, 96)] and set(pooled) <= {0, 1} and pooled


def test_cache_keys_equal_the_authors_map():
    from tests import authors_diclip as authors
    from weakseg.methods.diclip.cache import _pool

    g = torch.Generator().manual_seed(5)
    feats = torch.randn(1, 401, 8, generator=g)
    lab = torch.zeros(1, 512, 512, dtype=torch.int64)
    lab[0, 100:290, 60:333] = 7
    got = _pool(None, torch.zeros(1, 3, 320, 320), lab, feats, (20, 20), [[0, 7]], "nearest")[0]
    fg, bg = authors.map_keys(feats, lab)
    torch.testing.assert_close(got[7], fg[0])
    torch.testing.assert_close(got[0], bg[0])
    area = _pool(None, torch.zeros(1, 3, 320, 320), lab, feats, (20, 20), [[0, 7]], "area")[0]
    assert set(area) == {0, 7} and not torch.allclose(area[7], got[7])
