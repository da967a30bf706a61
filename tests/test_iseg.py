"""iSeg on tiny random Stable Diffusion models: prompts and token bookkeeping, the captured layers and
heads, category enhancement, determinism, parity of every refinement path with an eager reference
built from the raw captured attention, open-vocabulary tagging, presets, errors; and the shared
diffusion helpers (methods/diffusion_common)."""

import math
import socket

import pytest
import torch
import torch.nn.functional as F
from _helpers import assert_raises_naming

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from weakseg.backbones.attention import LayerCapture  # noqa: E402
from weakseg.backbones.diffusion import StableDiffusionBackbone  # noqa: E402
from weakseg.core import METHODS  # noqa: E402
from weakseg.methods import iseg as iseg_mod  # noqa: E402
from weakseg.methods.diffusion_common import (build_class_prompt, count_tokens, fuse_cross_attention,  # noqa: E402
                                              normalize_token_maps, select_token_maps)
from weakseg.methods.iseg import (CROSS_LAYERS_16, CROSS_LAYERS_32, PRESETS, SELF_LAYER, ISeg,  # noqa: E402
                                  ISegConfig, cluster_seeds)
from weakseg.ops import kl_kmeans, refine_propagate_reference  # noqa: E402

NAMES = ["background", "aeroplane", "pottedplant", "dog"]
SIDE = 128  # image side the method resizes to -> 16x16 latents (the "64x64" grid of SD at 512 px)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("clip_bpe"))


@pytest.fixture(scope="module")
def sd21(tok_dir):
    return StableDiffusionBackbone.tiny(seed=0, layout="sd21", heads=4, tokenizer_dir=tok_dir)


@pytest.fixture(scope="module")
def sd15(tok_dir):
    return StableDiffusionBackbone.tiny(seed=1, layout="sd15", heads=4, tokenizer_dir=tok_dir)


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (2, 3, 72, 88), generator=g, dtype=torch.uint8)


LABELS = torch.tensor([[1, 1, 1, 0], [1, 0, 1, 1]], dtype=torch.bool)


def make(sd, **kw):
    kw.setdefault("size", SIDE)
    kw.setdefault("tagger", "all")
    return ISeg(ISegConfig(model="tiny", **kw), backbone=sd)


# ---------------------------------------------------------------------------------------------- prompts
def test_prompt_text_and_token_positions(sd21):
    m = make(sd21)
    p = m.prompt(["aeroplane", "pottedplant", "tvmonitor", "dog"])
    assert p.text == ("a photograph of plane and potted plant and tv monitor and dog and other object and "
                      "background, ground, land, grass, tree, building, wall, sky, lake, water")
    # <sot> a photograph of | plane(4) and potted(6) plant(7) and tv(9) monitor(10) and dog(12)
    assert p.class_tokens == ((4,), (6, 7), (9, 10), (12,))
    assert p.selected == ((4,), (7,), (10,), (12,))  # the reference's token subsets: "plant", "monitor"
    assert p.selected_flat == [4, 7, 10, 12]
    for name, toks in zip(p.names, p.class_tokens):
        assert sd21.token_indices(p.text, name) == list(toks)
    # no class: the background part only
    assert m.prompt([]).text.startswith("a photograph of other object and background, ground")


def _authors_key(preset, name):
    """The name the authors' iSeg code writes for dataset class ``name`` (positional tables)."""
    from authors_diffusion import (DS_VOC10_EMBS, ISEG_COCO14_NAME, ISEG_ORI_CONTEXT_NAME, ISEG_VOC12_NAME,
                                   ISEG_VOC_CONTEXT_NAME)
    from weakseg.data.classnames import CONTEXT59_CLASSES, COCO_THINGS, VOC_CLASSES

    if preset.startswith("voc"):
        return list(ISEG_VOC12_NAME)[VOC_CLASSES.index(name) - 1]
    if preset.startswith("coco"):
        return list(ISEG_COCO14_NAME)[COCO_THINGS.index(name)]
    # iSeg's Context labels follow its ORI_CONTEXT_NAME order; DiffSegmenter's list (MMSegmentation order,
    # the same spellings airplane / plant / monitor) bridges the devkit names to it
    ori = DS_VOC10_EMBS[CONTEXT59_CLASSES.index(name)]
    return list(ISEG_VOC_CONTEXT_NAME)[ISEG_ORI_CONTEXT_NAME.index(ori)]


@pytest.mark.parametrize("preset", ["voc-wsss", "voc-ovs", "context-ovs", "coco-wsss", "coco-ovs"])
def test_prompts_equal_the_authors(sd21, preset):
    from authors_diffusion import ISEG_COCO14_NAME, ISEG_VOC12_NAME, ISEG_VOC_CONTEXT_NAME, iseg_prompt
    from weakseg.data.classnames import CONTEXT59_CLASSES, COCO_THINGS, VOC_CLASSES

    names = {"voc": VOC_CLASSES[1:], "context": CONTEXT59_CLASSES, "coco": COCO_THINGS}[preset.split("-")[0]]
    table = {"voc": ISEG_VOC12_NAME, "context": ISEG_VOC_CONTEXT_NAME, "coco": ISEG_COCO14_NAME}[preset.split("-")[0]]
    # the tiny model has 4 heads per layer: all heads (the prompts do not depend on them)
    m = ISeg(ISegConfig.from_preset(preset, model="tiny", size=SIDE, tagger="all", heads_16=None, heads_32=None),
             backbone=sd21)
    cfg = m.config
    for i in range(0, len(names), 8):  # every class of the dataset, 8 per prompt
        chunk = list(names[i:i + 8])
        keys = [_authors_key(preset, n) for n in chunk]
        p = m.prompt(chunk)
        text, sel = iseg_prompt(keys, table, bg_context=cfg.background_words, ovs=cfg.background_separator == "")
        assert p.text == text and list(p.names) == keys
        if "fire hydrant" not in keys:  # the authors' table counts 2 tokens for it, BPE has 3 (fire hy drant)
            assert [list(s) for s in p.selected] == sel, (preset, chunk)


def test_context_prompt_smallest_case(sd21):
    # Context "aeroplane": the authors write "plane" (one token, position 4), not "aerop lane" at [4, 5]
    m = ISeg(ISegConfig.from_preset("context-ovs", model="tiny", size=SIDE, tagger="all"), backbone=sd21)
    p = m.prompt(["aeroplane"])
    assert p.text == "a photograph of plane and other object and background" and p.selected == ((4,),)
    assert sd21.tokenizer.convert_ids_to_tokens(sd21.tokenizer(p.text).input_ids[4:5]) == ["plane</w>"]
    assert [m.prompt([n]).names[0] for n in ("pottedplant", "tvmonitor", "computer", "bedclothes")] == \
        ["plant", "monitor", "laptop", "bedding"]


def test_multi_token_names_shift_the_following_classes(sd21):
    tok = sd21.tokenizer
    word = "xylophonists"
    n = count_tokens(tok, word)
    assert n > 1  # a name of several BPE tokens
    p = build_class_prompt(tok, [word, "dining table", "cat"], suffix=" and background",
                           select_words={"dining table": [0, 1]})
    assert p.class_tokens[0] == tuple(range(4, 4 + n))
    assert p.class_tokens[1] == (5 + n, 6 + n) and p.selected[1] == (5 + n, 6 + n)
    assert p.class_tokens[2] == (7 + n + 1,)
    for name, toks in zip(p.names, p.class_tokens):
        assert sd21.token_indices(p.text, name) == list(toks)
    # select a multi-token word inside a multi-word name
    q = build_class_prompt(tok, ["big " + word])
    q2 = build_class_prompt(tok, ["big " + word], select_words={"big " + word: [1]})
    assert q2.selected[0] == q.class_tokens[0][1:] and len(q2.selected[0]) == n


def test_prompt_errors(sd21):
    tok = sd21.tokenizer
    many = [f"class{i} thing" for i in range(40)]
    with pytest.raises(ValueError, match="cuts the class"):
        build_class_prompt(tok, many)
    assert_raises_naming(lambda: build_class_prompt(tok, ["dog"], select_words={"dog": [3]}), ValueError,
                         ["select_words", "dog"])
    assert_raises_naming(lambda: build_class_prompt(tok, ["dog", " "]), ValueError, ["non-empty"])
    # a prefix that does not end at a word boundary would merge with the class: detected
    with pytest.raises(ValueError, match="not at token positions"):
        build_class_prompt(tok, ["ing"], prefix="a photograph of runn")


# ---------------------------------------------------------------------------------------------- helpers
def test_normalize_fuse_and_select():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(2, 5, 4, 4, generator=g)
    b = torch.rand(2, 5, 8, 8, generator=g)
    s = normalize_token_maps(a, "sum")
    assert torch.allclose(s.sum((-2, -1)), torch.ones(2, 5))
    mm = normalize_token_maps(b, "minmax")
    assert torch.allclose(mm.amin((-2, -1)), torch.zeros(2, 5)) and torch.allclose(mm.amax((-2, -1)), torch.ones(2, 5))
    fused = fuse_cross_attention({16: a, 32: b, 8: a}, {16: 0.7, 32: 0.3, 8: 0.0}, (8, 8))
    up = F.interpolate(a / a.sum((-2, -1), keepdim=True), size=(8, 8), mode="bilinear", align_corners=False)
    assert torch.allclose(fused, 0.7 * up + 0.3 * b / b.sum((-2, -1), keepdim=True), atol=1e-6)
    fused2 = fuse_cross_attention({16: a}, {16: 1.0}, (8, 8), norm="minmax", order="resize-norm")
    assert torch.allclose(fused2, normalize_token_maps(F.interpolate(a, size=(8, 8), mode="bilinear",
                                                                     align_corners=False), "minmax"))
    with pytest.raises(ValueError, match="non-zero weight"):
        fuse_cross_attention({16: a}, {16: 0.0}, (8, 8))
    sel = select_token_maps(a, [[[1, 2], [4]], [[0]]])
    assert sel.shape == (2, 2, 4, 4)
    assert torch.allclose(sel[0, 0], a[0, 1:3].mean(0)) and torch.equal(sel[0, 1], a[0, 4])
    assert torch.equal(sel[1, 0], a[1, 0]) and not sel[1, 1].any()  # padded with zeros
    assert_raises_naming(lambda: select_token_maps(a, [[[7]], [[0]]]), IndexError, ["[7]", "[0, 5)"])


def test_cluster_seeds_grid():
    s = cluster_seeds(64, 64, 32)
    rows = torch.tensor([0, 11, 22, 33, 44, 55])
    assert torch.equal(s, (rows[:, None] * 64 + rows[None]).flatten())
    assert cluster_seeds(16, 16, 32).numel() == 64  # step 16 // sqrt(32) = 2


# ---------------------------------------------------------------------------------------------- capture
@pytest.mark.parametrize("layout", ["sd21", "sd15"])
def test_captured_layers_and_heads_are_the_specs(layout, request, images, monkeypatch):
    sd = request.getfixturevalue(layout)
    m = make(sd, heads_32=(1, 5, 11), heads_16=None)
    seen = {}
    real = sd.unet

    def spy(latents, t, embeds, capture=None):
        if capture is None:  # the inner call of the capturing one
            return real(latents, t, embeds)
        out, store = real(latents, t, embeds, capture=capture)
        seen.update(specs=capture, store=store, t=t, latents=latents)
        return out, store

    monkeypatch.setattr(sd, "unet", spy)
    m.segment(images[:1], NAMES, LABELS[:1])
    specs = {s.layers[0]: s for s in seen["specs"]}
    assert SELF_LAYER == "up_blocks.3.attentions.1.transformer_blocks.0.attn1"
    assert specs[SELF_LAYER].heads == (1, 2) and specs[SELF_LAYER].store == "qk"
    assert set(specs) == {SELF_LAYER, *CROSS_LAYERS_16, *CROSS_LAYERS_32}
    assert CROSS_LAYERS_32 == ("down_blocks.1.attentions.1.transformer_blocks.0.attn2",
                               "up_blocks.2.attentions.0.transformer_blocks.0.attn2",
                               "up_blocks.2.attentions.1.transformer_blocks.0.attn2")
    assert len(CROSS_LAYERS_16) == 5 and all(n.startswith(("down_blocks.2.", "up_blocks.1.")) for n in CROSS_LAYERS_16)
    # global head indices over the 32x32 layers (4 heads each, forward order) -> local heads per layer
    assert [specs[n].heads for n in CROSS_LAYERS_32] == [(1,), (1,), (3,)]
    assert all(specs[n].heads is None and specs[n].store == "probs" for n in CROSS_LAYERS_16)
    store, lat = seen["store"], seen["latents"]
    assert seen["t"] == 100
    assert store.grid(SELF_LAYER) == tuple(lat.shape[-2:]) == (SIDE // 8, SIDE // 8)
    assert all(store.grid(n) == (SIDE // 16, SIDE // 16) for n in CROSS_LAYERS_32)
    assert all(store.grid(n) == (SIDE // 32, SIDE // 32) for n in CROSS_LAYERS_16)
    assert all(sd.attention_layers()[n][0] == "cross" for n in CROSS_LAYERS_16 + CROSS_LAYERS_32)
    # the probs path captures the head mean; non-ERS all heads; baseline no self-attention at all
    assert make(sd, fused_qk=False).capture_specs()[-1] == LayerCapture(SELF_LAYER, store="mean", heads=(1, 2))
    assert make(sd, use_ers=False).capture_specs()[-1].heads is None
    assert all(s.layers[0] != SELF_LAYER for s in make(sd, baseline=True).capture_specs())


def test_category_enhancement_scales_the_class_token_embeddings(sd21, images, monkeypatch):
    m = make(sd21)
    got = []
    real = sd21.unet
    monkeypatch.setattr(sd21, "unet", lambda z, t, e, capture=None: got.append(e) or real(z, t, e, capture=capture))
    m.segment(images, NAMES, LABELS)
    plain, _ = sd21.encode_prompt([m.prompt(["aeroplane", "pottedplant"]).text, m.prompt(["pottedplant", "dog"]).text])
    scale = torch.ones(2, 77, 1)
    scale[0, [4, 7]] = 1.6  # plane, plant (not "potted")
    scale[1, [5, 7]] = 1.6  # plant, dog
    assert torch.allclose(got[0], plain * scale)


# ---------------------------------------------------------------------------------------------- pipeline
def _reference(sd, images, labels, cfg):
    """The method re-done eagerly from the raw captured probabilities (all heads of every layer) and
    the pure-PyTorch reference ops, in float64 after the UNet (the cluster assignment is taken from
    ``kl_kmeans`` on the float32 maps, so near-ties resolve as in the method; the op itself is tested
    against its reference in test_kl_kmeans.py). Returns the expected scores of the ERS, non-ERS and
    baseline paths."""
    B = images.shape[0]
    z = sd.encode_images(images, size=cfg.size, sample=False, resample="bilinear")
    noise = torch.randn((1, 4) + tuple(z.shape[-2:]), generator=torch.Generator().manual_seed(cfg.seed))
    zt, _ = sd.add_noise(z, 100, noise.expand(B, -1, -1, -1))
    texts, sels = [], []
    renames = {"aeroplane": "plane", "pottedplant": "potted plant"}
    for b in range(B):
        cls = [renames.get(n, n) for n, on in zip(NAMES[1:], labels[b, 1:]) if on]
        texts.append("a photograph of " + " and ".join(cls) + " and other object and background, " + iseg_mod.VOC_STUFF)
        sels.append([sd.token_indices(texts[-1], "plant" if c == "potted plant" else c) for c in cls])
    emb, _ = sd.encode_prompt(texts)
    emb = emb.clone()
    for b in range(B):
        emb[b, [i for s in sels[b] for i in s]] *= cfg.gamma
    layers = list(CROSS_LAYERS_16 + CROSS_LAYERS_32)
    _, st = sd.unet(zt, 100, emb, capture=[LayerCapture(n) for n in layers + [SELF_LAYER]])
    h, w = z.shape[-2:]

    def res_maps(dtype):
        out = {}
        for res, lays, heads in ((16, CROSS_LAYERS_16, cfg.heads_16), (32, CROSS_LAYERS_32, cfg.heads_32)):
            allh = torch.cat([st.probs(n) for n in lays], 1).to(dtype)
            allh = allh[:, list(heads)] if heads is not None else allh
            gh, gw = st.grid(lays[0])
            out[res] = allh.mean(1).transpose(1, 2).reshape(B, 77, gh, gw)
        return out

    x = 0
    for res, mp in res_maps(torch.float64).items():
        mp = mp / mp.sum((-2, -1), keepdim=True)
        x = x + {16: 0.7, 32: 0.3}[res] * F.interpolate(mp, size=(h, w), mode="bilinear", align_corners=False)
    x = x.flatten(2).transpose(1, 2)  # (B, P, 77)
    if cfg.use_cluster:
        # k-means assignments flip on float rounding at near-ties: assign on the method's float32 maps
        f32 = fuse_cross_attention(res_maps(torch.float32), {16: 0.7, 32: 0.3}, (h, w))
        lab, _ = kl_kmeans(f32.flatten(2).transpose(1, 2).contiguous(), cluster_seeds(h, w), 20)
        onehot = F.one_hot(lab).double()  # (B, P, n): the reference code's one-hot averaging
        same = onehot @ onehot.transpose(1, 2)
        x = (same @ x) / same.sum(-1, keepdim=True)
    c0 = torch.stack([torch.stack([x[b][:, s].mean(1) for s in sels[b]], 1) for b in range(B)])  # (B, P, K)
    probs = st.probs(SELF_LAYER).double()
    paths = {"ers": refine_propagate_reference(probs[:, [1, 2]].mean(1), c0, cfg.ent, cfg.steps),
             "noers": probs.mean(1) @ c0, "baseline": c0}
    expected = {}
    for key, c in paths.items():
        maps = c.transpose(1, 2).reshape(B, -1, h, w)
        maps = F.interpolate(maps, size=images.shape[-2:], mode="bilinear", align_corners=False)
        flat = maps.flatten(2)
        lo, hi = flat.amin(2, keepdim=True), flat.amax(2, keepdim=True)
        maps = ((flat - lo) / (hi - lo)).view_as(maps)  # the reference code's min-max (no eps)
        fg = torch.zeros(B, 3, *images.shape[-2:], dtype=torch.float64)
        for b in range(B):
            fg[b, labels[b, 1:]] = maps[b]
        expected[key] = torch.cat([(1 - fg.amax(1, keepdim=True)) ** 2, fg], 1)
    return expected


def _check(out, ref):
    assert out.scores.shape == (2, 4, 72, 88) and out.labels.shape == (2, 72, 88)
    assert out.class_names == NAMES
    assert torch.allclose(out.scores.double(), ref, atol=2e-4), (out.scores.double() - ref).abs().max()
    # labels: argmax over the allowed classes (background wins ties), never an absent class
    assert torch.equal(out.labels, out.scores.masked_fill(~LABELS[:, :, None, None], -1).argmax(1))
    assert not out.scores[0, 3].any() and not out.scores[1, 1].any()


def test_every_path_matches_the_eager_reference(sd21, images):
    """fused (q, k) and probability paths, ERS and non-ERS, and the baseline, against one reference."""
    base = make(sd21, steps=3)
    ref = _reference(sd21, images, LABELS, base.config)
    outs = {}
    for key, mode in [("ers", dict(fused_qk=True)), ("ers", dict(fused_qk=False)),
                      ("noers", dict(use_ers=False, fused_qk=True)), ("noers", dict(use_ers=False, fused_qk=False)),
                      ("baseline", dict(baseline=True))]:
        out = make(sd21, steps=3, **mode).segment(images, NAMES, LABELS)
        _check(out, ref[key])
        outs.setdefault(key, []).append(out)
    # the fused (q, k) path and the probabilities path agree with each other
    for a, b in (outs["ers"], outs["noers"]):
        assert torch.allclose(a.scores, b.scores, atol=1e-4)
    # the three paths give different maps (the refinement does something)
    assert (outs["ers"][0].scores - outs["baseline"][0].scores).abs().max() > 0.05
    assert (outs["noers"][0].scores - outs["baseline"][0].scores).abs().max() > 0.05


def test_clustering_input_has_exact_zeros_replaced(sd21, images, monkeypatch):
    """As the authors' DFC_KL: exact zeros of the fused maps become 1e-6 before the KL k-means, and the
    cluster means are taken over the replaced maps."""
    import weakseg.ops

    from weakseg.methods.iseg import method as iseg_method

    fuse = iseg_method.fuse_cross_attention
    seen = {}

    def zeroed(*a, **kw):
        out = fuse(*a, **kw).clone()
        out[:, :, :2] = 0  # two rows of every token map exactly zero
        seen["grid"] = tuple(out.shape[-2:])
        return out

    def spy(x, seeds, iterations):
        seen["x"] = x.clone()
        return kl_kmeans(x, seeds, iterations)

    monkeypatch.setattr(iseg_method, "fuse_cross_attention", zeroed)
    monkeypatch.setattr(weakseg.ops, "kl_kmeans", spy)
    make(sd21, steps=1).segment(images, NAMES, LABELS)
    x = seen["x"]
    assert not (x == 0).any()
    h, w = seen["grid"]
    rows = x.reshape(x.shape[0], h, w, x.shape[-1])[:, :2]
    assert rows.numel() > 0 and torch.all(rows == 1e-6)


def test_head_subsets_without_clustering_match_the_reference(sd21, images):
    m = make(sd21, use_cluster=False, heads_16=(0, 3, 17), heads_32=(2, 9), steps=2)
    _check(m.segment(images, NAMES, LABELS), _reference(sd21, images, LABELS, m.config)["ers"])


def test_determinism_seed_and_batch_independence(sd21, images):
    m = make(sd21)
    a = m.segment(images, NAMES, LABELS)
    b = m.segment(images, NAMES, LABELS)
    assert torch.equal(a.scores, b.scores) and torch.equal(a.labels, b.labels)
    one = make(sd21, batch_size=1).segment([images[1]], NAMES, LABELS[1:])
    # batching does not change an image's result (up to the float rounding of batched convolutions)
    assert torch.allclose(one.scores[0], a.scores[1], atol=2e-3)
    other = make(sd21, seed=7).segment(images, NAMES, LABELS)
    assert not torch.allclose(other.scores, a.scores, atol=1e-3)


def _noise_runs(sd, monkeypatch, run, replace=None):
    """Run ``run()`` with ``sd.add_noise`` recording the noise of every call (and, with ``replace``, using that
    noise instead of the method's); returns (result, [noise of each call])."""
    seen, orig = [], sd.add_noise

    def rec(z, t, noise=None, generator=None):
        seen.append(noise.clone())
        return orig(z, t, replace.expand_as(noise) if replace is not None else noise, generator)

    with monkeypatch.context() as mp:
        mp.setattr(sd, "add_noise", rec)
        return run(), seen


def test_noise_draws_average_the_class_maps_of_each_draw(sd21, images, monkeypatch):
    """noise_draws = 2 (not iSeg's; the toy preset's 4): the first draw is the reference's single one, the
    second comes next from the same re-seeded generator, and the class maps are their mean."""
    names = [["aeroplane", "pottedplant"], ["pottedplant", "dog"]]
    two, seen2 = _noise_runs(sd21, monkeypatch, lambda: make(sd21, noise_draws=2).class_maps(list(images), names))
    one, seen1 = _noise_runs(sd21, monkeypatch, lambda: make(sd21).class_maps(list(images), names))
    assert len(seen2) == 2 and len(seen1) == 1
    assert torch.equal(seen2[0], seen1[0]) and not torch.allclose(seen2[1], seen2[0])
    assert torch.equal(seen2[1][0], seen2[1][1])  # the same draws for every image of a batch (re-seeded per image)
    second, _ = _noise_runs(sd21, monkeypatch, lambda: make(sd21).class_maps(list(images), names),
                            replace=seen2[1][:1])
    for a, b, c in zip(two, one, second):
        torch.testing.assert_close(a, (b + c) / 2, rtol=1e-5, atol=1e-7)
        assert not torch.allclose(b, c, atol=1e-6)
    for bad in (0, -1, 1.5, "2", True):
        assert_raises_naming(lambda: make(sd21, noise_draws=bad), ValueError, ["noise_draws", ">= 1"])


def test_threshold_background_and_sd15(sd15, images):
    m = ISeg(ISegConfig.from_preset("coco-wsss", model="tiny:sd15", size=SIDE, tagger="all",
                                    class_renames={}), backbone=sd15)
    out = m.segment(images, NAMES, LABELS)
    fg = out.scores[:, 1:]
    assert torch.equal(out.scores[:, 0], (fg.amax(1) == 0).float())  # background exactly where nothing >= 0.45
    assert ((fg == 0) | (fg >= 0.45)).all()


def test_pamr_option_refines_the_class_maps_before_the_background_rule(sd21, images, monkeypatch):
    """pamr_iterations > 0 (not iSeg's; the toy preset's): the min-max class maps go through PAMR on the image,
    then the same background rule (a threshold here: it cuts the refined maps, not the raw ones)."""
    import weakseg.methods.iseg.method as iseg_method
    from weakseg.methods.common import PAMR, BackgroundRule, scores_to_labels

    cfg = dict(background="threshold", background_value=0.4)
    fg = {}

    def keep(f, *a):
        fg["raw"] = f.clone()
        return scores_to_labels(f, *a)

    with monkeypatch.context() as mp:
        mp.setattr(iseg_method, "scores_to_labels", keep)
        make(sd21, **cfg).segment(images, NAMES, LABELS)
    out = make(sd21, pamr_iterations=3, pamr_dilations=[1, 2], **cfg).segment(images, NAMES, LABELS)
    refined = PAMR(3, (1, 2))(images.float() / 255, fg["raw"])
    want_scores, want_labels = scores_to_labels(refined, NAMES, LABELS, BackgroundRule("threshold", 0.4))
    torch.testing.assert_close(out.scores, want_scores, rtol=1e-5, atol=1e-6)
    assert torch.equal(out.labels, want_labels)
    assert not torch.allclose(refined, fg["raw"], atol=1e-3)   # PAMR changed the maps
    assert (out.scores[:, 1:][~LABELS[:, 1:]] == 0).all()       # absent classes stay 0 after PAMR


def test_open_vocabulary_tags_with_clip(sd21, images):
    from weakseg.backbones.clip import CLIPBackbone
    from weakseg.methods.common import clip_tag_classes

    clip = CLIPBackbone.tiny(seed=0)
    m = ISeg(ISegConfig(model="tiny", size=SIDE, tagger="clip", tag_topk=1, tag_templates="single"),
             backbone=sd21, clip=clip)
    out = m.segment(images, NAMES)
    keep = clip_tag_classes(clip, images, NAMES, topk=1, threshold=0.1, templates="single")
    assert keep.sum(1).tolist() == [2, 2]
    fg = out.scores[:, 1:].flatten(2).amax(2) > 0
    assert torch.equal(fg, keep[:, 1:])
    for b in range(2):
        assert set(out.labels[b].unique().tolist()) <= set(torch.nonzero(keep[b]).flatten().tolist())


def test_no_background_class_and_empty_labels(sd21, images):
    m = make(sd21)
    out = m.segment(images, ["cat", "dog"], torch.tensor([[True, False], [True, True]]))
    assert out.scores.shape == (2, 2, 72, 88) and (out.labels[0] == 0).all()
    none = m.segment(images[:1], NAMES, torch.tensor([[True, False, False, False]]))
    assert (none.labels == 0).all() and torch.equal(none.scores[0, 0], torch.ones(72, 88))


# ---------------------------------------------------------------------------------------------- config
def test_presets_and_registration():
    assert METHODS.get("iseg") is ISeg and METHODS.config_class("iseg") is ISegConfig
    d = ISegConfig()
    assert (d.seed, d.t, d.gamma, d.ent, d.steps, d.self_heads, d.use_cluster, d.fused_qk) == \
        (1101, 100, 1.6, 0.015, 10, (1, 2), True, True)
    assert (d.cross_weight_16, d.cross_weight_32, d.background, d.background_value) == (0.7, 0.3, "power", 2.0)
    expect = {"voc-wsss": (0.015, 10), "coco-wsss": (0.1, 10), "voc-ovs": (0.015, 8), "context-ovs": (0.002, 5),
              "coco-ovs": (0.2, 10)}
    for name, (ent, steps) in expect.items():
        c = ISegConfig.from_preset(name)
        assert (c.ent, c.steps, c.preset) == (ent, steps, name)
    c = ISegConfig.from_preset("coco-ovs", ent=0.015)
    assert c.ent == 0.015 and c.background == "threshold" and c.background_value == 0.45
    assert c.replace(steps=3).ent == 0.015 and c.replace(steps=3).steps == 3  # explicit values survive replace
    assert ISegConfig(preset="voc-ovs").heads_16 == iseg_mod.VOC_HEADS_16 and len(iseg_mod.VOC_HEADS_16) == 41
    assert ISegConfig(preset="voc-ovs").background_separator == ""
    # the stuff words of the prompt: the reference's strings after its string-literal concatenation
    assert iseg_mod.VOC_STUFF == "ground, land, grass, tree, building, wall, sky, lake, water"
    assert iseg_mod.COCO_STUFF.endswith("water, river, sea, railway, ")
    assert iseg_mod.ISEG_BACKGROUND_COCO[:len(iseg_mod.ISEG_BACKGROUND_VOC)] == iseg_mod.ISEG_BACKGROUND_VOC
    assert ISegConfig().background_words == iseg_mod.VOC_STUFF and PRESETS["coco-wsss"]["background_words"] == \
        iseg_mod.COCO_STUFF
    assert PRESETS["voc-wsss"]["heads_32"] == (22, 5, 21, 13, 8, 27, 28, 6, 25)
    assert_raises_naming(lambda: ISegConfig.from_preset("ade"), ValueError, ["preset", "ade", "voc-wsss"])
    assert_raises_naming(lambda: ISegConfig(dtype="float16"), ValueError, ["dtype", "float16", "GPU"])
    assert_raises_naming(lambda: ISegConfig(tagger="blip"), ValueError, ["tagger", "clip"])
    assert_raises_naming(lambda: ISegConfig(background="constant", background_value=3), ValueError,
                         ["BackgroundRule.value"])
    assert_raises_naming(lambda: ISegConfig.from_dict({"stepz": 3}), ValueError, ["stepz"])
    assert ISegConfig().pamr_iterations == 0 and ISegConfig.from_preset("toy").pamr_iterations == 10
    for bad in (-1, 2.5, True):
        assert_raises_naming(lambda: ISegConfig(pamr_iterations=bad), ValueError, ["ISegConfig.pamr_iterations"])
    for bad in (-1, 2.5, True):  # a bool is not a step count (weakseg.core.is_int)
        assert_raises_naming(lambda: ISegConfig(steps=bad), ValueError, ["steps", "an int >= 0"])
    for bad in ((), (0, 1), (1.5,), 4):
        assert_raises_naming(lambda: ISegConfig(pamr_dilations=bad), ValueError, ["ISegConfig.pamr_dilations"])


def test_model_errors(sd21, tmp_path, monkeypatch):
    assert_raises_naming(lambda: make(sd21, heads_16=(0, 40)), ValueError, ["heads_16", "40", "20 heads"])
    assert_raises_naming(lambda: make(sd21, self_heads=(1, 4)), ValueError, ["self_heads", SELF_LAYER, "4 heads"])
    assert_raises_naming(lambda: make(sd21, self_layer=CROSS_LAYERS_16[0]), ValueError, ["self_layer"])
    assert_raises_naming(lambda: make(sd21, cross_layers_32=("up_blocks.9.x",)), ValueError,
                         ["cross_layers_32", "up_blocks.9.x"])
    import weakseg.toy

    monkeypatch.setattr(weakseg.toy, "WEIGHTS_DIR", tmp_path / "no-weights")
    assert_raises_naming(lambda: ISeg(ISegConfig(model="toy")), FileNotFoundError,
                         ["no-weights", "python -m weakseg.toy.train"])
    m = make(sd21)
    assert_raises_naming(lambda: m.segment([torch.zeros(3, 64, 64, dtype=torch.uint8),
                                            torch.zeros(3, 32, 64, dtype=torch.uint8)], NAMES), ValueError,
                         ["images", "size"])


def test_local_model_loads_offline(sd21, tmp_path, monkeypatch, images):
    path = sd21.save_pretrained(tmp_path / "sd")

    def no_network(*a, **k):
        raise AssertionError("network access while loading a local model")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    m = ISeg(ISegConfig(model=str(path), size=SIDE, tagger="all"))
    ref = make(sd21)
    a = m.segment(images[:1], NAMES, LABELS[:1])
    b = ref.segment(images[:1], NAMES, LABELS[:1])
    assert torch.allclose(a.scores, b.scores, atol=1e-5)
    assert_raises_naming(lambda: ISeg(ISegConfig(model=str(tmp_path / "nope"))), FileNotFoundError, ["nope"])
    assert math.isfinite(float(a.scores.sum()))
