"""DiffSegmenter on tiny random Stable Diffusion models: token bookkeeping, prompts, the attention it
captures (by layer name, resolution, heads), fused vs reference propagation, timestep averaging,
determinism, shapes through the pipeline, candidates (labels / CLIP tagging / all), captions, tau sweep."""

import socket

import pytest
import torch
from _helpers import assert_raises_naming

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import weakseg  # noqa: E402,F401
from weakseg.backbones.diffusion import StableDiffusionBackbone  # noqa: E402
from weakseg.core import METHODS, create  # noqa: E402
from weakseg.methods.common import clip_tag_classes  # noqa: E402
from weakseg.methods.diffsegmenter import (DS_WEIGHTS, DiffSegmenter, DiffSegmenterConfig, build_prompt,  # noqa: E402
                                           caption_continuation, caption_seed, class_token_positions,
                                           fuse_cross_attention,
                                           propagate_fused, propagate_reference, sweep_bg_threshold)

NAMES = ["background", "cat", "dog", "potted plant"]
SELF64 = [f"down_blocks.0.attentions.{i}.transformer_blocks.0.attn1" for i in range(2)] + \
         [f"up_blocks.3.attentions.{i}.transformer_blocks.0.attn1" for i in range(3)]


@pytest.fixture(scope="module")
def tok_dir():
    return None  # the default offline tokenizer folder: written once per machine, shared with "tiny" models


@pytest.fixture(scope="module")
def sd(tok_dir):
    return StableDiffusionBackbone.tiny(seed=0, layout="sd15", tokenizer_dir=tok_dir)


def _cfg(**kw):
    base = dict(model="tiny", image_size=64, open_vocab="all")
    base.update(kw)
    return DiffSegmenterConfig(**base)


def _images(B=2, H=40, W=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (B, 3, H, W), generator=g, dtype=torch.uint8)


# ---------------------------------------------------------------------------------------------- prompts, tokens
def test_prompt_construction_and_token_bookkeeping(sd):
    assert build_prompt("a photograph of {c}++", "cat") == "a photograph of cat++"
    assert build_prompt("a photograph of {c}++", "cat", " sitting on a sofa ") == "a photograph of cat++ sitting on a sofa"
    # a multi-word class gets the weight on every word (Compel's group syntax)
    p = build_prompt("a photograph of {c}++", "potted plant")
    assert p == "a photograph of (potted plant)++"
    _, w = sd.prompt_token_weights(p)
    assert w[0, :7].tolist() == pytest.approx([1, 1, 1, 1, 1.21, 1.21, 1])
    tok = sd.tokenizer.convert_ids_to_tokens
    # <sot> a photograph of cat -> the class token is position 4 (the reference's fixed index)
    prompt = "a photograph of cat++ sitting on a sofa"
    ids = sd.tokenizer(prompt.replace("++", "")).input_ids
    assert class_token_positions(sd, prompt, "cat") == [4] + [5] and tok(ids[4:6]) == ["cat</w>", "sitting</w>"]
    assert class_token_positions(sd, prompt, "cat", fuse_ing=False) == [4]
    assert class_token_positions(sd, "a photograph of cat++ on a sofa", "cat") == [4]  # "on" does not end in ing
    assert class_token_positions(sd, "a photograph of cat++", "cat") == [4]  # nothing after the class
    assert class_token_positions(sd, "a photograph of cat++ ring", "cat") == [4, 5]  # word-level test
    # the reference tests the 5th whitespace word ("sitting") and reads the token after the class (",")
    assert class_token_positions(sd, "a photograph of cat++, sitting", "cat") == [4, 5]
    assert class_token_positions(sd, "a photograph of cat++, sitting", "cat", ing_rule="word") == [4]  # BPE: ","
    multi = "a photograph of (potted plant)++ standing"
    assert class_token_positions(sd, multi, "potted plant", "mean") == [4, 5, 6]
    assert class_token_positions(sd, multi, "potted plant", "first", fuse_ing=False) == [4]
    assert class_token_positions(sd, multi, "potted plant", "last", fuse_ing=False) == [5]
    # captions: BLIP's seed is stripped (case-insensitively), other text kept whole
    assert caption_continuation("a photograph of cat sitting on a couch", "cat") == "sitting on a couch"
    assert caption_continuation("A Photograph of  cat, lying", "cat") == ", lying"
    assert caption_continuation("two dogs on grass", "cat") == "two dogs on grass"
    assert caption_continuation(None, "cat") == "" and caption_continuation("", "cat") == ""
    # the VOC single-token renames (the default) go into the prompts only
    m = DiffSegmenter(_cfg(rename_classes=True), backbone=sd)
    assert m._renamed(["aeroplane", "pottedplant", "tvmonitor", "cat"]) == ["plane", "plant", "monitor", "cat"]
    assert DiffSegmenter(_cfg(), backbone=sd)._renamed(["aeroplane"]) == ["plane"]
    assert DiffSegmenter(_cfg(rename_classes=None), backbone=sd)._renamed(["aeroplane"]) == ["aeroplane"]
    assert DiffSegmenter(_cfg(rename_classes=False), backbone=sd)._renamed(["aeroplane"]) == ["aeroplane"]


@pytest.mark.parametrize("preset", ["code", "code-context", "code-coco"])
def test_code_presets_write_the_reference_prompts(sd, preset):
    """Every class of VOC / Context / COCO-Object: the prompt and the token read equal the reference
    scripts' (tests/authors_diffusion.py), without a caption and with one whose next word ends in "ing"."""
    from authors_diffusion import DS_COCO_EMBS, DS_VOC10_EMBS, DS_VOC12_EMBS, ds_voc10_coco_prompt, ds_voc12_prompt
    from weakseg.data.classnames import CONTEXT59_CLASSES, COCO_THINGS, VOC_CLASSES

    names, embs = {"code": (VOC_CLASSES[1:], DS_VOC12_EMBS), "code-context": (CONTEXT59_CLASSES, DS_VOC10_EMBS),
                   "code-coco": (COCO_THINGS, DS_COCO_EMBS)}[preset]
    m = DiffSegmenter(DiffSegmenterConfig.from_preset(preset, model="tiny", image_size=64, open_vocab="all"),
                      backbone=sd)
    assert m._renamed(names) == embs  # the reference's class words, position by position
    seed = caption_seed(m.config.prompt_template)
    for word in embs:
        for tail in ("", " standing on the grass", " on a table"):
            blip = seed.format(c=word) + tail
            if preset == "code":
                want = ds_voc12_prompt(word, blip)
            else:
                want = ds_voc10_coco_prompt(word, sd.tokenizer, blip, coco=preset == "code-coco")
            got = m.prompts_for(word, caption_continuation(blip, word, seed))
            assert got[0] == want[0], (preset, word, tail)
            if preset == "code-coco" and len(want[1]) == 2:
                # the COCO script reads [3+L, 5+L], the token after the "ing" word; here the "ing" word itself
                assert got[1] == [want[1][0], want[1][0] + 1]
            else:
                assert got[1] == want[1], (preset, word, tail)


def test_reference_prompt_smallest_cases(sd):
    m = DiffSegmenter(_cfg(), backbone=sd)
    # VOC "diningtable": the reference writes the single token "table" at position 4 (not din ing table [4, 5, 6])
    word = m._renamed(["diningtable"])[0]
    assert m.prompts_for(word) == ("a photograph of table++", [4])
    # "sitting," does not end in "ing" for the reference: only the class token
    assert m.prompts_for("dog", "sitting, looking at the camera")[1] == [4]
    w = DiffSegmenter(_cfg(ing_rule="word"), backbone=sd)
    assert w.prompts_for("dog", "sitting, looking at the camera")[1] == [4, 5]
    assert m.prompts_for("dog", "sitting on the grass")[1] == w.prompts_for("dog", "sitting on the grass")[1] == [4, 5]
    # the Context / COCO scripts weight the last word of a multi-word class and read its last token
    c = DiffSegmenter(DiffSegmenterConfig.from_preset("code-coco", model="tiny", image_size=64), backbone=sd)
    assert c.prompts_for("traffic light") == ("a photography of traffic light++", [5])
    assert build_prompt("a photo of {c}++", "traffic light", weight_words="last") == "a photo of traffic light++"


# ---------------------------------------------------------------------------------------------- config
def test_config_defaults_presets_and_errors(sd, tmp_path, monkeypatch):
    c = DiffSegmenterConfig()
    assert (c.model, c.timesteps, c.cross_weights, c.image_size) == ("runwayml/stable-diffusion-v1-5", (100,),
                                                                    (0.3, 0.5, 0.1, 0.1), 512)
    assert c.prompt_template == "a photograph of {c}++" and c.fuse_ing and not c.baseline
    assert c.propagation == "auto" and c.bg_threshold == 0.5 and c.dtype == "auto"
    assert (c.rename_classes, c.ing_rule, c.weight_words, c.class_token) == ("voc", "code", "all", "mean")
    assert_raises_naming(lambda: DiffSegmenterConfig(rename_classes="ade"), ValueError, ["rename_classes", "ade"])
    assert_raises_naming(lambda: DiffSegmenterConfig(ing_rule="bpe"), ValueError, ["ing_rule", "bpe"])
    assert_raises_naming(lambda: DiffSegmenterConfig(weight_words="first"), ValueError, ["weight_words"])
    assert_raises_naming(lambda: DiffSegmenterConfig(attention_budget_mib=-1), ValueError, ["attention_budget_mib"])
    assert METHODS.config_class("diffsegmenter") is DiffSegmenterConfig
    assert DiffSegmenterConfig.from_preset("paper").timesteps == (1, 50, 100, 150)
    assert DiffSegmenterConfig.from_preset("baseline").baseline is True
    # explicit values win over the preset, also when they equal the default
    p = DiffSegmenterConfig.from_dict({"preset": "paper", "timesteps": [100]})
    assert p.timesteps == (100,) and p.preset == "paper"
    assert p.replace(bg_threshold=0.4).timesteps == (100,)
    assert DiffSegmenterConfig(preset="paper").timesteps == (1, 50, 100, 150)
    m = create("diffsegmenter", model="tiny", image_size=64, preset="baseline")
    assert isinstance(m, DiffSegmenter) and m.config.baseline and m.sd.name == "tiny-sd21"
    assert_raises_naming(lambda: DiffSegmenterConfig(preset="best"), ValueError, ["preset", "best", "paper"])
    assert_raises_naming(lambda: DiffSegmenterConfig(dtype="float16"), ValueError, ["dtype", "cuda"])
    assert_raises_naming(lambda: DiffSegmenterConfig(class_token="middle"), ValueError, ["class_token", "middle"])
    assert_raises_naming(lambda: DiffSegmenterConfig(prompt_template="a photo"), ValueError, ["prompt_template", "{c}"])
    assert_raises_naming(lambda: DiffSegmenterConfig(bg_threshold=1.5), ValueError, ["bg_threshold"])
    assert_raises_naming(lambda: DiffSegmenterConfig(timesteps=(1000,)), ValueError, ["timesteps"])
    assert_raises_naming(lambda: DiffSegmenterConfig(image_size=60), ValueError, ["image_size", "multiple of 8"])
    assert c.pamr_iterations == 0 and DiffSegmenterConfig.from_preset("toy").pamr_iterations == 10
    for bad in (-1, 2.5, True):
        assert_raises_naming(lambda: DiffSegmenterConfig(pamr_iterations=bad), ValueError,
                             ["DiffSegmenterConfig.pamr_iterations"])
    for bad in ((), (0, 1), (1.5,), 4):
        assert_raises_naming(lambda: DiffSegmenterConfig(pamr_dilations=bad), ValueError,
                             ["DiffSegmenterConfig.pamr_dilations"])
    import weakseg.toy

    monkeypatch.setattr(weakseg.toy, "WEIGHTS_DIR", tmp_path / "no-weights")
    assert_raises_naming(lambda: DiffSegmenter(DiffSegmenterConfig(model="toy")), FileNotFoundError,
                         ["no-weights", "python -m weakseg.toy.train"])
    missing = str(tmp_path / "nope")
    assert_raises_naming(lambda: DiffSegmenter(DiffSegmenterConfig(model=missing)), FileNotFoundError, [missing])
    m = DiffSegmenter(_cfg(cross_weights=(0.5, 0.5)), backbone=sd)
    assert_raises_naming(lambda: m.segment(_images(1), NAMES), ValueError, ["cross_weights", "4 cross-attention"])


def test_loads_a_local_directory_offline(sd, tmp_path, monkeypatch):
    sd.save_pretrained(tmp_path / "sd")

    def no_network(*a, **k):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    m = DiffSegmenter(_cfg(model=str(tmp_path / "sd")))
    for n, p in m.sd.unet_model.named_parameters():
        torch.testing.assert_close(p, dict(sd.unet_model.named_parameters())[n])


# ---------------------------------------------------------------------------------------------- capture
@pytest.mark.parametrize("layout", ["sd15", "sd21"])
def test_captures_the_layers_resolutions_and_heads_the_spec_names(layout, sd, tok_dir):
    model = sd if layout == "sd15" else StableDiffusionBackbone.tiny(seed=0, layout="sd21", tokenizer_dir=tok_dir)
    m = DiffSegmenter(_cfg(propagation="reference"), backbone=model)
    assert m.self_attention_layers() == SELF64  # down_blocks.0 x 2 + up_blocks.3 x 3, self-attention
    heads = model.attention_layers()
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    e, _ = model.encode_prompt(["a photograph of cat++", "a photograph of dog++"])
    _, ref = model.unet(z, 100, e, capture=m.capture_specs())
    assert set(ref.layers) == set(SELF64) | {n for n, (k, _) in heads.items() if k == "cross"}
    assert {ref.grid(n) for n in SELF64} == {(8, 8)}  # the full latent grid (64x64 at 512²)
    assert ref.count(("self", 8)) == sum(heads[n][1] for n in SELF64)  # every head of every layer
    assert ref.count(("self", 8)) == 5 * (2 if layout == "sd15" else 1)
    cross = {n: h for n, (k, h) in heads.items() if k == "cross"}
    assert len(cross) == 16 and ref.resolutions("cross") == [(8, 8), (4, 4), (2, 2), (1, 1)]
    for r in (8, 4, 2, 1):
        assert ref.count(("cross", r)) == sum(h for n, h in cross.items() if ref.grid(n) == (r, r))
        assert ref.resolution_mean("cross", r).shape == (2, r * r, 77)
    # the fused path keeps q/k of exactly those layers and heads, no P x P map
    _, fused = model.unet(z, 100, e, capture=DiffSegmenter(_cfg(), backbone=model).capture_specs())
    for n in SELF64:
        q, k = fused.qk(n)
        assert q.shape[:3] == k.shape[:3] == (2, heads[n][1], 64)
    # the q/k reproduce the reference's mean over the (layer, head) maps
    A = torch.cat([torch.softmax(q @ k.transpose(-1, -2) * fused.scale(n), -1)
                   for n in SELF64 for q, k in [fused.qk(n)]], 1).mean(1)
    torch.testing.assert_close(A, ref.resolution_mean("self", 8), atol=1e-6, rtol=1e-5)


def test_reuse_capture_forms_each_map_once_and_keeps_the_output(sd, monkeypatch):
    """The reference path's capture (reuse=True): the 64x64 self layers' output comes from the recorded
    probabilities (no second SDPA), equal to the plain UNet's output and the recorded mean equal to the
    non-reusing capture's."""
    from weakseg.backbones.attention import LayerCapture

    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    e, _ = sd.encode_prompt(["a photograph of cat++", "a photograph of dog++"])
    plain = sd.unet(z, 100, e)
    _, once = sd.unet(z, 100, e, capture=[LayerCapture(SELF64, store="mean", group="resolution")])
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda q, *a, **k: calls.append(q.shape[2]) or sdpa(q, *a, **k))
    out, reused = sd.unet(z, 100, e, capture=DiffSegmenter(_cfg(propagation="reference"), backbone=sd).capture_specs())
    assert 64 not in calls  # the captured layers at the latent grid (8x8 here) call no SDPA
    torch.testing.assert_close(out, plain, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(reused.resolution_mean("self", 8), once.resolution_mean("self", 8), atol=1e-6, rtol=1e-5)
    calls.clear()
    _, _ = sd.unet(z, 100, e, capture=[LayerCapture(SELF64, store="mean", group="resolution")])
    assert calls.count(64) >= len(SELF64)  # without reuse the captured layers call SDPA for their output
    for bad in (dict(store="qk", reuse=True), dict(store="mean", heads=(0,), reuse=True),
                dict(store="probs", cond_only=True, reuse=True)):
        assert_raises_naming(lambda: LayerCapture(SELF64, **bad), ValueError, ["reuse"])


# ---------------------------------------------------------------------------------------------- maths
def test_propagate_fused_equals_the_explicit_mean_map():
    g = torch.Generator().manual_seed(0)
    qk = [(torch.randn(3, h, 50, d, generator=g), torch.randn(3, h, 50, d, generator=g)) for h, d in ((2, 8), (3, 4))]
    maps = torch.cat([torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, -1) for q, k in qk], 1).mean(1)
    x = torch.rand(3, 50, generator=g)
    ref = propagate_reference(maps, x)
    torch.testing.assert_close(ref, (maps @ x[..., None])[..., 0])
    torch.testing.assert_close(propagate_fused(qk, x), ref, atol=1e-6, rtol=1e-5)
    X = torch.rand(3, 50, 2, generator=g)
    torch.testing.assert_close(propagate_fused(qk, X), propagate_reference(maps, X), atol=1e-6, rtol=1e-5)
    # a row-stochastic average stays within the range of x
    assert ref.min() >= x.min() - 1e-6 and ref.max() <= x.max() + 1e-6


def test_fuse_cross_attention_minmax_weights_and_token_mean():
    T = 6
    g = torch.Generator().manual_seed(1)
    cross = [torch.rand(2, r * r, T, generator=g) for r in (1, 2, 4, 8)]  # coarsest first
    out = fuse_cross_attention(cross, [[4], [4, 5]], DS_WEIGHTS, (8, 8))
    assert out.shape == (2, 8, 8)
    want = torch.zeros(2, 8, 8)
    for maps, w in zip(cross, DS_WEIGHTS):
        r = int(maps.shape[1] ** 0.5)
        sel = torch.stack([maps[0, :, 4], maps[1, :, 4:6].mean(-1)]).view(2, 1, r, r)
        up = torch.nn.functional.interpolate(sel, size=(8, 8), mode="bilinear", align_corners=False)[:, 0]
        lo, hi = up.flatten(1).min(1).values[:, None, None], up.flatten(1).max(1).values[:, None, None]
        # the reference's (x - min) / (max - min), no eps; the 1x1 level, constant up to the rounding of the
        # upsampling (where the reference would divide ~0 by ~0), gives 0 here
        if r > 1:
            want += w * (up - lo) / (hi - lo)
    torch.testing.assert_close(out, want, atol=1e-6, rtol=1e-5)
    # the 1x1 level is constant, so its min-max map is 0 and its weight never counts
    assert out.min() >= 0 and out.max() <= sum(DS_WEIGHTS[1:]) + 1e-6


# ---------------------------------------------------------------------------------------------- pipeline
def test_fused_reference_and_baseline_paths_agree(sd):
    imgs = list(_images(2))
    items = [(0, "cat", ""), (1, "dog", "sitting on grass")]
    fused = DiffSegmenter(_cfg(propagation="fused"), backbone=sd).class_maps(imgs, items)
    ref = DiffSegmenter(_cfg(propagation="reference"), backbone=sd).class_maps(imgs, items)
    auto = DiffSegmenter(_cfg(), backbone=sd)
    assert auto.propagation_for(2, 64) == "reference"  # 2 x 2 x 64² x 4 bytes fit the 2048 MiB budget
    torch.testing.assert_close(auto.class_maps(imgs, items), ref, atol=0, rtol=0)
    tight = DiffSegmenter(_cfg(attention_budget_mib=2 * 2 * 64 * 64 * 4 / 2 ** 20 * 0.99), backbone=sd)
    assert tight.propagation_for(2, 64) == "fused" and tight.propagation_for(1, 64) == "reference"
    torch.testing.assert_close(tight.class_maps(imgs, items), fused, atol=0, rtol=0)
    assert fused.shape == (2, 8, 8)
    torch.testing.assert_close(fused, ref, atol=1e-5, rtol=1e-4)
    # baseline = the fused cross-attention maps; the propagated maps are their self-attention average
    m = DiffSegmenter(_cfg(baseline=True), backbone=sd)
    base = m.class_maps(imgs, items)
    assert not torch.allclose(base, fused, atol=1e-3)
    assert base.max() <= sum(DS_WEIGHTS) + 1e-5 and base.min() >= 0
    for i in range(2):  # each propagated value is a convex combination of the baseline values
        assert fused[i].min() >= base[i].min() - 1e-5 and fused[i].max() <= base[i].max() + 1e-5


def test_timestep_averaging_and_determinism(sd):
    imgs = list(_images(1))
    items = [(0, "cat", "")]
    m = DiffSegmenter(_cfg(timesteps=(50, 150)), backbone=sd)
    both = m.class_maps(imgs, items)
    one = [DiffSegmenter(_cfg(timesteps=(t,)), backbone=sd).class_maps(imgs, items) for t in (50, 150)]
    torch.testing.assert_close(both, (one[0] + one[1]) / 2, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(one[0], one[1])
    again = DiffSegmenter(_cfg(timesteps=(50,)), backbone=sd).class_maps(imgs, items)
    torch.testing.assert_close(again, one[0], atol=0, rtol=0)  # same seed, same maps
    other = DiffSegmenter(_cfg(timesteps=(50,), seed=1), backbone=sd).class_maps(imgs, items)
    assert not torch.allclose(other, one[0])


def test_noise_draws_average_over_timesteps_and_draws(sd, monkeypatch):
    """noise_draws = 2 (not DiffSegmenter's): per image, the reference's draw and the next one from the same
    generator; the maps of every (timestep, draw) are averaged."""
    imgs = list(_images(2))
    items = [(0, "cat", ""), (1, "dog", ""), (1, "cat", "")]
    seen, orig = [], sd.add_noise

    def rec(z, t, noise=None, generator=None):
        seen.append((t, noise.clone()))
        return orig(z, t, noise=noise, generator=generator)

    monkeypatch.setattr(sd, "add_noise", rec)
    both = DiffSegmenter(_cfg(timesteps=(50, 150), noise_draws=2), backbone=sd).class_maps(imgs, items)
    assert [t for t, _ in seen] == [50, 50, 150, 150]
    first, second = seen[0][1], seen[1][1]
    assert torch.equal(seen[2][1], first) and torch.equal(seen[3][1], second)  # every timestep reuses the draws
    assert torch.equal(first[0], first[1])  # per image: its own generator, seeded alike (same-shaped VAE samples before)
    seen.clear()
    one = DiffSegmenter(_cfg(timesteps=(50, 150)), backbone=sd).class_maps(imgs, items)
    assert torch.equal(seen[0][1], first)  # the first draw is the reference's single one
    monkeypatch.setattr(sd, "add_noise", lambda z, t, noise=None, generator=None: orig(z, t, noise=second[:len(z)]))
    alt = DiffSegmenter(_cfg(timesteps=(50, 150)), backbone=sd).class_maps(imgs, items)
    torch.testing.assert_close(both, (one + alt) / 2, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(one, alt)
    for bad in (0, 2.0, True):
        assert_raises_naming(lambda: _cfg(noise_draws=bad), ValueError, ["noise_draws", ">= 1"])


def test_segment_shapes_labels_and_batch_invariance(sd):
    m = DiffSegmenter(_cfg(batch_size=3), backbone=sd)
    imgs = _images(2, 40, 48)
    labels_in = torch.tensor([[True, True, False, True], [True, False, True, False]])
    out = m.segment(imgs, NAMES, labels_in)
    assert out.scores.shape == (2, 4, 40, 48) and out.labels.shape == (2, 40, 48)
    assert out.labels.dtype == torch.int64 and out.class_names == NAMES
    assert (out.scores[:, 0] == 0.5).all()  # the constant background tau
    # absent classes are never run, score 0 and never win; present ones are min-maxed to [0, 1]
    assert (out.scores[0, 2] == 0).all() and (out.scores[1, 1] == 0).all() and (out.scores[1, 3] == 0).all()
    for b, c in ((0, 1), (0, 3), (1, 2)):
        assert out.scores[b, c].min() == 0 and out.scores[b, c].max() == pytest.approx(1, abs=5e-3)
    assert set(out.labels[0].unique().tolist()) <= {0, 1, 3} and set(out.labels[1].unique().tolist()) <= {0, 2}
    want = torch.cat([torch.full_like(out.scores[:, :1], 0.5), out.scores[:, 1:]], 1)
    want = torch.where(torch.cat([torch.ones_like(labels_in[:, :1]), labels_in[:, 1:]], 1)[:, :, None, None], want,
                       torch.full_like(want, -1)).argmax(1)
    assert torch.equal(out.labels, want)
    # an image's result does not depend on its batch (per-image seeding) nor on the list form
    alone = m.segment([imgs[1]], NAMES, labels_in[1:])
    torch.testing.assert_close(alone.scores, out.scores[1:], atol=1e-4, rtol=0)
    # the threshold moves the background boundary: tau = 0 -> background only where every class is 0
    low = DiffSegmenter(_cfg(bg_threshold=0.0), backbone=sd).segment([imgs[1]], NAMES, labels_in[1:])
    assert (low.labels == 0).sum() <= (alone.labels == 0).sum()
    # datasets without a background: plain argmax over the classes
    nb = m.segment([imgs[0]], ["cat", "dog"])
    assert nb.scores.shape == (1, 2, 40, 48) and set(nb.labels.unique().tolist()) <= {0, 1}
    assert_raises_naming(lambda: m.segment([imgs[0], imgs[1, :, :32]], NAMES), ValueError, ["size", "per image"])
    assert_raises_naming(lambda: m.segment(imgs, NAMES, torch.ones(2, 3, dtype=torch.bool)), ValueError,
                         ["image_labels"])
    assert_raises_naming(lambda: m.segment(imgs, NAMES, captions=["x"]), ValueError, ["captions", "2"])


def test_pamr_option_refines_the_class_maps_before_the_background_rule(sd):
    """pamr_iterations > 0 (not DiffSegmenter's; the toy preset's): the min-max class maps go through PAMR on
    the image before the constant background tau; absent classes stay 0."""
    from weakseg.methods.common import PAMR

    imgs = _images(2, 40, 48)
    labels_in = torch.tensor([[True, True, False, True], [True, False, True, True]])
    raw = DiffSegmenter(_cfg(), backbone=sd).segment(imgs, NAMES, labels_in)
    out = DiffSegmenter(_cfg(pamr_iterations=2, pamr_dilations=[1, 3]), backbone=sd).segment(imgs, NAMES, labels_in)
    want = PAMR(2, (1, 3))(imgs.float() / 255, raw.scores[:, 1:])
    torch.testing.assert_close(out.scores[:, 1:], want, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(want, raw.scores[:, 1:], atol=1e-3)
    assert (out.scores[:, 0] == 0.5).all() and (out.scores[:, 1:][~labels_in[:, 1:]] == 0).all()
    masked = torch.where(labels_in[:, :, None, None], out.scores, torch.full_like(out.scores, -1))
    assert torch.equal(out.labels, masked.argmax(1))


def test_open_vocabulary_candidates_from_clip_tagging(sd):
    from weakseg.backbones.clip import CLIPBackbone

    clip = CLIPBackbone.tiny(seed=0)
    m = DiffSegmenter(_cfg(open_vocab="clip", tag_topk=1), backbone=sd, clip=clip)
    imgs = _images(2, 64, 64)
    want = clip_tag_classes(clip, imgs, NAMES, topk=1, threshold=0.1)
    got = m.candidates(list(imgs), NAMES, None)
    assert torch.equal(got, want) and got[:, 0].all() and got[:, 1:].sum(1).tolist() == [1, 1]
    out = m.segment(imgs, NAMES)
    run = out.scores[:, 1:].flatten(2).amax(2) > 0
    assert torch.equal(run, want[:, 1:])  # only the tagged classes were segmented
    # "all": every class is a candidate
    assert DiffSegmenter(_cfg(), backbone=sd).candidates(list(imgs), NAMES, None).all()


def test_user_captions_reach_the_prompt(sd, monkeypatch):
    m = DiffSegmenter(_cfg(), backbone=sd)
    seen = []
    orig = m.prompts_for

    def spy(name, cont=""):
        p = orig(name, cont)
        seen.append(p)
        return p

    monkeypatch.setattr(m, "prompts_for", spy)
    imgs = _images(2)
    labels_in = torch.tensor([[True, True, False, False]] * 2)
    out = m.segment(imgs, NAMES, labels_in, captions=["a photograph of cat sitting on a mat", None])
    assert seen == [("a photograph of cat++ sitting on a mat", [4, 5]), ("a photograph of cat++", [4])]
    plain = m.segment(imgs, NAMES, labels_in)
    torch.testing.assert_close(out.scores[1], plain.scores[1])  # image 1 had no caption
    assert not torch.allclose(out.scores[0], plain.scores[0])


# ---------------------------------------------------------------------------------------------- tau sweep
def test_sweep_bg_threshold_finds_the_best_tau():
    names = ["background", "a", "b"]
    gt = torch.tensor([[0, 0, 1, 2]])
    fg_a = torch.tensor([[0.2, 0.5, 0.8, 0.1]])
    fg_b = torch.tensor([[0.1, 0.3, 0.2, 0.7]])
    scores = torch.stack([torch.zeros_like(fg_a), fg_a, fg_b])  # channel 0 is replaced by tau
    best, curve = sweep_bg_threshold([(scores, gt)], names)
    assert len(curve) == 45 and min(curve) == pytest.approx(0.30) and max(curve) == pytest.approx(0.74)
    # tau in [0.5, 0.7) (ties go to the background): pixels 0, 1 -> background, 2 -> a, 3 -> b: perfect
    assert curve[0.6] == pytest.approx(1.0) and 0.5 <= best < 0.7 and curve[best] == pytest.approx(1.0)
    assert curve[0.4] < 1.0  # pixel 1 (0.5) would be "a"
    b2, c2 = sweep_bg_threshold([(scores[None], gt)], names, thresholds=[0.1, 0.6])
    assert b2 == 0.6 and set(c2) == {0.1, 0.6}
    assert_raises_naming(lambda: sweep_bg_threshold([(scores, gt)], ["a", "b", "c"]), ValueError, ["background"])
    assert_raises_naming(lambda: sweep_bg_threshold([], names), ValueError, ["empty"])


@pytest.mark.cuda
def test_fp16_on_gpu_matches_fp32(tok_dir):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    sd = StableDiffusionBackbone.tiny(seed=0, layout="sd15", tokenizer_dir=tok_dir)
    imgs = list(_images(2))
    items = [(0, "cat", ""), (1, "dog", "")]
    ref = DiffSegmenter(_cfg(device="cuda", dtype="float32"), backbone=sd.to("cuda")).class_maps(imgs, items)
    m = DiffSegmenter(_cfg(device="cuda", dtype="float16"), backbone=sd.to("cuda", torch.float16))
    half = m.class_maps(imgs, items)
    assert half.dtype == torch.float32 and torch.isfinite(half).all()
    torch.testing.assert_close(half, ref, atol=3e-2, rtol=0)
    unfused = DiffSegmenter(_cfg(device="cuda", dtype="float16", propagation="reference"),
                            backbone=m.sd).class_maps(imgs, items)
    torch.testing.assert_close(half, unfused, atol=5e-3, rtol=0)


def test_blip_captioner_from_a_local_directory(sd, tmp_path, monkeypatch):
    """A tiny random BLIP, saved and read back offline; its caption continues the seeded prompt."""
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "photograph", "of", "cat", "dog", "sitting", "on",
             "mat", "the", "grass"]
    (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n")
    tok = BertTokenizer(str(tmp_path / "vocab.txt"))
    tok.add_special_tokens({"bos_token": "[DEC]"})
    proc = BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tok)
    cfg = BlipConfig(text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, encoder_hidden_size=32, bos_token_id=tok.bos_token_id,
                                      pad_token_id=0, sep_token_id=3),
                     vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, image_size=32, patch_size=16), projection_dim=32)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        BlipForConditionalGeneration(cfg).save_pretrained(tmp_path / "blip")
    proc.save_pretrained(tmp_path / "blip")

    def no_network(*a, **k):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    m = DiffSegmenter(_cfg(captioner=str(tmp_path / "blip"), caption_max_new_tokens=4), backbone=sd)
    img = _images(1)[0]
    cont = m.caption(img, "cat")
    assert cont == m.caption(img, "cat")  # greedy decoding: deterministic
    assert 0 < len(cont.split()) <= 4 and set(cont.split()) <= set(words[5:])
    prompts = []
    monkeypatch.setattr(m, "class_maps", lambda imgs, items: prompts.extend(items) or torch.zeros(len(items), 8, 8))
    m.segment([img], NAMES, torch.tensor([[True, True, False, False]]))
    assert prompts == [(0, "cat", cont)]
    assert_raises_naming(lambda: DiffSegmenter(_cfg(captioner=str(tmp_path / "none")), backbone=sd).caption(img, "cat"),
                         OSError, ["captioner", "none"])
