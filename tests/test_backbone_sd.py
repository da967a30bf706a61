"""Stable Diffusion backbone: tiny random-weight sd21 / sd15 layouts, offline tokenizer, attention capture."""

import json
import socket

import pytest
import torch
from _helpers import assert_raises_naming

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
open_clip = pytest.importorskip("open_clip")

from weakseg.backbones.attention import LayerCapture  # noqa: E402
from weakseg.backbones.diffusion import StableDiffusionBackbone, parse_prompt_weights  # noqa: E402
from weakseg.backbones.tokenizer import CLIP_VOCAB_SIZE, NUM_MERGES, clip_bpe_files, make_clip_tokenizer  # noqa: E402
from weakseg.core import BACKBONES  # noqa: E402

SELF64 = "up_blocks.3.attentions.1.transformer_blocks.0.attn1"
CROSS = "up_blocks.2.attentions.0.transformer_blocks.0.attn2"
PARITY_STRINGS = ["a photograph of a dining table.", "A Potted-Plant, tv monitor!!", "it's 2024: naïve café",
                  "motorbike; aeroplane & person (with clothes)", "", "  multiple   spaces\tand\nnewlines "]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("clip_bpe"))


@pytest.fixture(scope="module")
def sd21(tok_dir):
    return StableDiffusionBackbone.tiny(seed=0, layout="sd21", tokenizer_dir=tok_dir)


@pytest.fixture(scope="module")
def sd15(tok_dir):
    return StableDiffusionBackbone.tiny(seed=0, layout="sd15", tokenizer_dir=tok_dir)


def _inputs(sd, B=2, side=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(B, 4, side, side, generator=g)
    e, _ = sd.encode_prompt(["a photograph of a cat and a dog", "a potted plant"][:B] + ["x"] * max(0, B - 2))
    return z, e


# ---------------------------------------------------------------------------------------------- tokenizer
def test_tokenizer_files_and_parity_with_open_clip(tok_dir):
    vocab_path, merges_path = clip_bpe_files(tok_dir)
    vocab = json.loads(vocab_path.read_text())
    assert len(vocab) == CLIP_VOCAB_SIZE == 49408
    assert vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407
    lines = merges_path.read_text().strip().split("\n")
    assert lines[0].startswith("#version") and len(lines) == 1 + NUM_MERGES
    mtime = vocab_path.stat().st_mtime_ns
    clip_bpe_files(tok_dir)  # written once, reused
    assert vocab_path.stat().st_mtime_ns == mtime

    ref = open_clip.get_tokenizer("ViT-B-32")
    tok = make_clip_tokenizer(tok_dir)  # SD v1.5 style: pad = end-of-text
    for s in PARITY_STRINGS:
        ours = tok(s, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids[0]
        theirs = ref(s)[0]
        n = int((theirs != 0).sum())  # open_clip pads with 0 after end-of-text
        assert torch.equal(ours[:n], theirs[:n]), s
        assert (ours[n:] == 49407).all()
    # multi-word class names: every word its own token(s), same ids as open_clip
    ids = tok("potted plant tv monitor", add_special_tokens=False).input_ids
    assert ids == ref("potted plant tv monitor")[0][1:1 + len(ids)].tolist()
    # SD 2.x pads with "!" (id 0), which is also a special token: parity holds on strings without "!"
    tok2 = make_clip_tokenizer(tok_dir, pad_token="!")
    assert tok2.pad_token_id == 0
    s = "a photograph of a dining table, and sky."
    assert torch.equal(tok2(s, padding="max_length", max_length=77, return_tensors="pt").input_ids[0], ref(s)[0])


# ---------------------------------------------------------------------------------------------- layouts
@pytest.mark.parametrize("layout", ["sd21", "sd15"])
def test_layouts_build_and_run(layout, request):
    sd = request.getfixturevalue(layout)
    assert BACKBONES.get("stable-diffusion") is StableDiffusionBackbone
    layers = sd.attention_layers()
    assert len(layers) == 32  # (2 down x 3 levels + 3 up x 3 levels + 1 mid) x (attn1, attn2)
    assert layers[SELF64] == ("self", 1 if layout == "sd21" else 2)
    assert layers[CROSS][0] == "cross"
    heads = {n.split(".attentions")[0]: h for n, (k, h) in layers.items()}
    if layout == "sd21":  # per-block head counts, as 5/10/20/20; constant head width
        assert [heads[f"down_blocks.{i}"] for i in range(3)] == [1, 2, 2] and heads["mid_block"] == 4
        assert sd.unet_model.config.use_linear_projection is True
        assert sd.tokenizer.pad_token == "!"
    else:  # one head count everywhere, as SD 1.5's 8
        assert set(heads.values()) == {2}
        assert not sd.unet_model.config.use_linear_projection
        assert sd.tokenizer.pad_token == "<|endoftext|>"
    assert sd.device == torch.device("cpu") and sd.dtype == torch.float32
    z, e = _inputs(sd)
    assert e.shape == (2, 77, 32) and e.dtype == torch.float32
    out = sd.unet(z, 100, e)
    assert out.shape == z.shape and out.dtype == torch.float32 and torch.isfinite(out).all()
    # a (1, 77, D) embedding broadcasts over the batch; per-item timesteps
    out1 = sd.unet(z, torch.tensor([100, 100]), e[:1])
    torch.testing.assert_close(out1[0], out[0], atol=1e-5, rtol=1e-5)


def test_tiny_is_deterministic_per_seed(tok_dir, sd21):
    a = StableDiffusionBackbone.tiny(seed=0, tokenizer_dir=tok_dir)
    b = StableDiffusionBackbone.tiny(seed=1, tokenizer_dir=tok_dir)
    pa = dict(a.unet_model.named_parameters())
    for n, p in sd21.unet_model.named_parameters():
        assert torch.equal(p, pa[n])
    assert not torch.equal(next(b.unet_model.parameters()), next(a.unet_model.parameters()))


# ---------------------------------------------------------------------------------------------- VAE, noise
def test_encode_images_mean_and_sample(sd21):
    g = torch.Generator().manual_seed(0)
    imgs = [torch.randint(0, 256, (3, 40, 56), generator=g, dtype=torch.uint8),
            torch.randint(0, 256, (3, 64, 64), generator=g, dtype=torch.uint8)]
    z = sd21.encode_images(imgs, size=64)
    assert z.shape == (2, 4, 8, 8) and z.dtype == torch.float32
    torch.testing.assert_close(sd21.encode_images(imgs, size=64), z)  # the mean is deterministic
    # the second image is already 64x64: no resize, so it equals encoding it alone
    torch.testing.assert_close(sd21.encode_images(imgs[1][None], size=64)[0], z[1], atol=1e-5, rtol=1e-5)
    # (h, w) sizes and the other resamplers
    assert sd21.encode_images(imgs, size=(32, 48), resample="bilinear").shape == (2, 4, 4, 6)
    assert sd21.encode_images(imgs, size=32, resample="lanczos").shape == (2, 4, 4, 4)

    s1 = sd21.encode_images(imgs, size=64, sample=True, generator=torch.Generator().manual_seed(3))
    s2 = sd21.encode_images(imgs, size=64, sample=True, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(s1, s2)
    assert not torch.allclose(s1, z)
    # sample = (mean + std * eps) * scaling_factor, with eps drawn from the same generator
    x = torch.stack([torch.nn.functional.interpolate(imgs[0][None].float() / 255, size=(64, 64))[0],
                     imgs[1].float() / 255]) * 2 - 1
    dist = sd21.vae.encode(x).latent_dist
    eps = torch.randn(dist.mean.shape, generator=torch.Generator().manual_seed(3))
    sf = sd21.vae.config.scaling_factor
    torch.testing.assert_close(s1, (dist.mean + dist.std * eps).detach() * sf, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(z, dist.mean.detach() * sf, atol=1e-5, rtol=1e-5)

    assert_raises_naming(lambda: sd21.encode_images(imgs, size=60), ValueError, ["size", "8"])
    assert_raises_naming(lambda: sd21.encode_images(imgs[0].float()), TypeError, ["uint8"])
    assert_raises_naming(lambda: sd21.encode_images(imgs, size=64, resample="cubic"), ValueError, ["resample"])


def test_add_noise_matches_scheduler_formula(sd21):
    z = torch.randn(3, 4, 8, 8)
    noisy, noise = sd21.add_noise(z, 100, generator=torch.Generator().manual_seed(1))
    assert noisy.shape == z.shape and noise.shape == z.shape
    ac = sd21.scheduler.alphas_cumprod[100]
    torch.testing.assert_close(noisy, ac.sqrt() * z + (1 - ac).sqrt() * noise)
    assert abs(float(ac) - 0.894) < 1e-3  # SD's scaled-linear betas (spec: alpha_bar_100 ~ 0.894)
    torch.testing.assert_close(noise, torch.randn(z.shape, generator=torch.Generator().manual_seed(1)))
    t = torch.tensor([0, 500, 999])
    n2 = torch.randn_like(z)
    noisy2, back = sd21.add_noise(z, t, noise=n2)
    assert back is n2
    ac = sd21.scheduler.alphas_cumprod[t].view(3, 1, 1, 1)
    torch.testing.assert_close(noisy2, ac.sqrt() * z + (1 - ac).sqrt() * n2)
    assert_raises_naming(lambda: sd21.add_noise(z, 1000), ValueError, ["timestep", "1000"])
    assert_raises_naming(lambda: sd21.add_noise(z, [1, 2]), ValueError, ["timestep", "3"])
    assert sd21.timestep(50, 45) == 101  # DiCLIP: PNDM, 50 steps, timesteps[45]


# ---------------------------------------------------------------------------------------------- prompts
def test_token_indices_multi_word(sd21):
    p = "a photograph of a potted plant and a tv monitor and other object"
    ids = sd21.tokenizer(p).input_ids
    assert ids[0] == 49406
    for phrase in ["potted plant", "tv monitor", "a", "other object"]:
        idx = sd21.token_indices(p, phrase)
        want = sd21.tokenizer(phrase, add_special_tokens=False).input_ids
        assert [ids[i] for i in idx] == want and idx == list(range(idx[0], idx[0] + len(want)))
    assert sd21.token_indices(p, "potted plant") == [5, 6]
    assert sd21.token_indices("cat", "cat") == [1]  # after the start-of-text token
    assert sd21.token_indices(p, "a", occurrence=2) == [8]
    # a rare word splits into several BPE tokens; all of them are returned
    long = sd21.token_indices("a photo of a xylophonist", "xylophonist")
    assert len(long) > 1 and long[0] == 5
    # weight syntax is removed first, so indices match the encoded prompt
    assert sd21.token_indices("a photograph of cat++ sitting", "cat") == [4]
    assert_raises_naming(lambda: sd21.token_indices(p, "cats"), ValueError, ["'cats'", "a photograph of"])
    assert_raises_naming(lambda: sd21.token_indices("a photograph of cats", "cat"), ValueError, ["'cat'"])
    assert_raises_naming(lambda: sd21.token_indices(p, "tv monitor", occurrence=1), ValueError, ["occurrence 1"])
    far = "x " * 90 + "zebra"
    assert_raises_naming(lambda: sd21.token_indices(far, "zebra"), ValueError, ["77-token", "zebra"])


def test_reweight_scales_exactly_the_chosen_rows(sd21):
    e, _ = sd21.encode_prompt(["a photograph of a cat", "a dog"])
    before = e.clone()
    out = sd21.reweight(e, [4, 5], 1.6)
    assert torch.equal(e, before)  # a new tensor; input untouched
    rows = torch.zeros(77, dtype=torch.bool)
    rows[[4, 5]] = True
    torch.testing.assert_close(out[:, rows], 1.6 * e[:, rows])
    assert torch.equal(out[:, ~rows], e[:, ~rows])
    per = sd21.reweight(e, [[1], [2, 3]], 2.0)
    torch.testing.assert_close(per[0, 1], 2 * e[0, 1])
    assert torch.equal(per[0, 2], e[0, 2])
    torch.testing.assert_close(per[1, 2:4], 2 * e[1, 2:4])
    assert_raises_naming(lambda: sd21.reweight(e, [77], 1.6), IndexError, ["77"])
    assert_raises_naming(lambda: sd21.reweight(e, [[1]], 1.6), ValueError, ["batch of 2"])


def test_word_plus_plus_weighting_is_compel_formula(sd15):
    plain, ids = sd15.encode_prompt("a photograph of cat sitting on grass")
    w, wids = sd15.encode_prompt("a photograph of cat++ sitting on grass")
    assert torch.equal(ids, wids)
    empty, _ = sd15.encode_prompt("")
    i = sd15.token_indices("a photograph of cat++ sitting on grass", "cat")
    assert i == [4]
    torch.testing.assert_close(w[0, 4], empty[0, 4] + 1.1 ** 2 * (plain[0, 4] - empty[0, 4]))
    others = torch.ones(77, dtype=torch.bool)
    others[4] = False
    assert torch.equal(w[0, others], plain[0, others])
    # a parenthesised multi-word phrase with an explicit weight
    w2, _ = sd15.encode_prompt("a (potted plant)1.5 on a table")
    plain2, _ = sd15.encode_prompt("a potted plant on a table")
    j = sd15.token_indices("a potted plant on a table", "potted plant")
    torch.testing.assert_close(w2[0, j], empty[0, j] + 1.5 * (plain2[0, j] - empty[0, j]))
    assert torch.equal(w2[0, 1], plain2[0, 1])
    assert parse_prompt_weights("a cat+++ and (a dog)++.")[1] == [(2, 5, pytest.approx(1.331)),
                                                                  (10, 15, pytest.approx(1.21))]
    assert parse_prompt_weights("a well-known C. and 3+4")[1] == []
    assert_raises_naming(lambda: sd15.encode_prompt("a cat-- sitting"), ValueError, ["cat--", "down-weighting"])
    assert_raises_naming(lambda: sd15.encode_prompt("a (cat)0.5"), ValueError, ["0.5"])


# ---------------------------------------------------------------------------------------------- capture
def test_capture_probs_rows_sum_to_one_and_output_unchanged(sd21):
    z, e = _inputs(sd21)
    ref = sd21.unet(z, 100, e)
    original = {k: type(v) for k, v in sd21.unet_model.attn_processors.items()}
    with sd21.capture({SELF64: {"store": "probs"}, "up_blocks.2.attentions.*.attn2": {"store": "probs"}}) as cap:
        out = sd21.unet(z, 100, e)
        inside = {k: type(v).__name__ for k, v in sd21.unet_model.attn_processors.items()}
    # only the chosen layers carried the capture processor; every other layer kept its own
    assert sum(v == "CaptureProcessor" for v in inside.values()) == 4
    assert {k: type(v) for k, v in sd21.unet_model.attn_processors.items()} == original
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    s = cap.probs(SELF64)
    assert s.shape == (2, 1, 64, 64) and s.dtype == torch.float32 and cap.grid(SELF64) == (8, 8)
    torch.testing.assert_close(s.sum(-1), torch.ones(2, 1, 64))
    c = cap.probs(CROSS)
    assert c.shape == (2, 2, 16, 77) and cap.grid(CROSS) == (4, 4)
    torch.testing.assert_close(c.sum(-1), torch.ones(2, 2, 16))
    assert (c >= 0).all() and (s >= 0).all()
    assert set(cap.layers) == {SELF64} | {f"up_blocks.2.attentions.{i}.transformer_blocks.0.attn2" for i in range(3)}
    # processors come back also when the block raises
    with pytest.raises(RuntimeError, match="boom"):
        with sd21.capture(SELF64):
            raise RuntimeError("boom")
    assert {k: type(v) for k, v in sd21.unet_model.attn_processors.items()} == original


def test_capture_heads_qk_and_means(sd15):
    z, e = _inputs(sd15)
    layer64 = [n for n in sd15.attention_layers("self") if n.startswith(("down_blocks.0", "up_blocks.3"))]
    assert len(layer64) == 5
    with sd15.capture(LayerCapture(tuple(layer64), store="probs"), LayerCapture("*attn2", store="probs")) as full:
        ref = sd15.unet(z, 100, e)
    specs = [LayerCapture(SELF64, store="probs", heads=(1,)),
             LayerCapture(layer64[0], store="qk"),
             LayerCapture(layer64[1], store="mean"),
             LayerCapture((layer64[2], layer64[4]), store="mean", group="resolution"),
             LayerCapture("re:.*attn2", store="mean", group="resolution")]
    out, cap = sd15.unet(z, 100, e, capture=specs)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    # head subset = the same heads of an all-heads capture
    torch.testing.assert_close(cap.probs(SELF64), full.probs(SELF64)[:, [1]])
    # q/k reproduce the probabilities
    q, k = cap.qk(layer64[0])
    assert q.shape == k.shape == (2, 2, 64, 8) and q.dtype == torch.float32
    assert cap.scale(layer64[0]) == pytest.approx(8 ** -0.5)
    torch.testing.assert_close(torch.softmax(q @ k.transpose(-1, -2) * cap.scale(layer64[0]), -1),
                               full.probs(layer64[0]), atol=1e-6, rtol=1e-5)
    # per-layer mean over heads; per-resolution mean over layers x heads
    torch.testing.assert_close(cap.mean(layer64[1]), full.probs(layer64[1]).mean(1), atol=1e-6, rtol=1e-5)
    want = torch.cat([full.probs(n) for n in (layer64[2], layer64[4])], 1).mean(1)
    torch.testing.assert_close(cap.resolution_mean("self", 8), want, atol=1e-6, rtol=1e-5)
    assert cap.count(("self", 8)) == 4
    cross = [n for n in sd15.attention_layers("cross")]
    for r in (8, 4, 2, 1):
        names = [n for n in cross if full.grid(n) == (r, r)]
        want = torch.cat([full.probs(n) for n in names], 1).mean(1)
        torch.testing.assert_close(cap.resolution_mean("cross", r), want, atol=1e-6, rtol=1e-5)
        assert cap.count(("cross", (r, r))) == 2 * len(names)
    assert cap.resolutions("cross") == [(8, 8), (4, 4), (2, 2), (1, 1)]
    torch.testing.assert_close(cap.resolution_mean("cross", 8).sum(-1), torch.ones(2, 64))


def test_capture_cond_only_running_mean_and_errors(sd21):
    z, e = _inputs(sd21)
    with sd21.capture(LayerCapture(SELF64, store="probs")) as full:
        sd21.unet(z, 100, e)
    with sd21.capture(LayerCapture(SELF64, store="probs", cond_only=True),
                      LayerCapture(CROSS, store="mean", cond_only=True)) as cap:
        sd21.unet(z, 100, e)
        assert cap.probs(SELF64).shape == (1, 1, 64, 64)
        torch.testing.assert_close(cap.probs(SELF64), full.probs(SELF64)[1:])
        m1 = cap.mean(CROSS).clone()
        sd21.unet(z, 500, e)  # the mean runs over repeated calls
        assert cap.count(CROSS) == 4
    with sd21.capture(LayerCapture(CROSS, store="probs")) as c2:
        sd21.unet(z, 500, e)
    torch.testing.assert_close(cap.mean(CROSS), (m1 + c2.probs(CROSS)[1:].mean(1)) / 2, atol=1e-6, rtol=1e-5)
    cap.reset()
    assert cap.stored_bytes() == 0

    assert_raises_naming(lambda: sd21.capture("up_blocks.9.*").__enter__(), ValueError, ["up_blocks.9.*"])
    assert_raises_naming(lambda: sd21.capture({SELF64: {"heads": [1]}}).__enter__(), ValueError,
                         ["heads", SELF64, "1 heads"])
    assert_raises_naming(lambda: LayerCapture(SELF64, store="maps"), ValueError, ["store", "maps"])
    assert_raises_naming(lambda: LayerCapture(SELF64, store="qk", group="resolution"), ValueError, ["group"])
    with sd21.capture(SELF64) as c3:
        assert_raises_naming(lambda: sd21.capture(CROSS).__enter__(), RuntimeError, ["nest"])
        assert_raises_naming(lambda: c3.probs(SELF64), KeyError, ["nothing yet"])
        assert_raises_naming(lambda: c3.mean(SELF64), ValueError, ["store='probs'"])
        assert_raises_naming(lambda: c3.probs(CROSS), KeyError, ["not captured"])
    with sd21.capture(LayerCapture(SELF64, store="probs", cond_only=True)):
        assert_raises_naming(lambda: sd21.unet(z[:1], 100, e[:1]), ValueError, ["cond_only", "even"])


def test_capture_memory_one_buffer_at_64x64(tok_dir):
    """512x512 image -> 64x64 latent: capture keeps one 4096x4096 map, not DiffSegmenter's 40."""
    sd = StableDiffusionBackbone.tiny(seed=0, layout="sd15", unet_channels=(8, 16, 16, 16), text_width=16,
                                      tokenizer_dir=tok_dir)
    P = 64 * 64
    z = torch.randn(1, 4, 64, 64, generator=torch.Generator().manual_seed(0))
    e, _ = sd.encode_prompt("a photograph of a cat")
    self64 = [n for n in sd.attention_layers("self") if n.startswith(("down_blocks.0", "up_blocks.3"))]
    others = [n for n in self64 if n != SELF64]
    # one 64x64 layer averaged over heads, plus the q/k of another (what refine_propagate_qk reads)
    _, cap = sd.unet(z, 100, e, capture=[LayerCapture(SELF64, store="mean"), LayerCapture(others[0], store="qk")])
    q, k = cap.qk(others[0])
    assert cap.mean(SELF64).shape == (1, P, P) and q.shape == k.shape == (1, 2, P, 4)
    assert cap.stored_bytes() == P * P * 4 + q.nbytes + k.nbytes
    torch.testing.assert_close(cap.mean(SELF64).sum(-1), torch.ones(1, P))
    # DiffSegmenter's per-resolution self-attention mean over every 64x64 layer and head: one buffer
    _, cap = sd.unet(z, 100, e, capture=LayerCapture(tuple(self64), store="mean", group="resolution"))
    assert cap.count(("self", 64)) == 5 * 2
    assert cap.stored_bytes() == P * P * 4
    assert cap.resolution_mean("self", 64).shape == (1, P, P)


# ---------------------------------------------------------------------------------------------- persistence
def test_save_load_round_trip_offline(sd21, tmp_path, monkeypatch):
    sd21.save_pretrained(tmp_path / "sd")
    for sub in ("vae", "unet", "text_encoder", "tokenizer", "scheduler"):
        assert (tmp_path / "sd" / sub).is_dir()
    assert not list((tmp_path / "sd").rglob("*.bin")) and list((tmp_path / "sd").rglob("*.safetensors"))

    def no_network(*a, **k):
        raise AssertionError("network access during a local load")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    loaded = StableDiffusionBackbone.from_pretrained(str(tmp_path / "sd"))
    assert type(loaded.scheduler) is type(sd21.scheduler) and loaded.tokenizer.pad_token == "!"
    p = "a photograph of a potted plant"
    e0, i0 = sd21.encode_prompt(p)
    e1, i1 = loaded.encode_prompt(p)
    assert torch.equal(i0, i1) and torch.equal(e0, e1)
    # every saved tensor comes back bit for bit ...
    for part in ("unet_model", "vae", "text_encoder"):
        a, b = getattr(sd21, part).state_dict(), getattr(loaded, part).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part
    # ... and the models compute the same function; not bitwise: a loader may place the weights at
    # another alignment, and the CPU GEMM's rounding depends on it
    z = torch.randn(1, 4, 8, 8)
    torch.testing.assert_close(sd21.unet(z, 100, e0), loaded.unet(z, 100, e1), rtol=1e-5, atol=1e-5)
    img = torch.randint(0, 256, (1, 3, 64, 64), dtype=torch.uint8)
    torch.testing.assert_close(sd21.encode_images(img, size=64), loaded.encode_images(img, size=64),
                               rtol=1e-5, atol=1e-5)


def test_wrong_paths_give_clear_errors(tmp_path):
    missing = str(tmp_path / "nope")
    assert_raises_naming(lambda: StableDiffusionBackbone.from_pretrained(missing), FileNotFoundError,
                         [missing, "does not exist", "vae"])
    (tmp_path / "partial" / "vae").mkdir(parents=True)
    assert_raises_naming(lambda: StableDiffusionBackbone.from_pretrained(str(tmp_path / "partial")),
                         FileNotFoundError, [str(tmp_path / "partial"), "unet", "text_encoder"])
    (tmp_path / "file.txt").write_text("x")
    assert_raises_naming(lambda: StableDiffusionBackbone.from_pretrained(str(tmp_path / "file.txt")),
                         FileNotFoundError, ["file.txt", "not a directory"])
    assert_raises_naming(lambda: StableDiffusionBackbone.from_pretrained("./no/such/dir"), FileNotFoundError,
                         ["./no/such/dir"])


# ---------------------------------------------------------------------------------------------- generation
def test_generate_two_steps(sd15):
    ts = None if sd15.scheduler.timesteps is None else sd15.scheduler.timesteps.clone()
    a = sd15.generate(["a cat", "a dog"], num_inference_steps=2, guidance_scale=7.5, generator=0, height=32, width=48)
    assert a.shape == (2, 3, 32, 48) and a.dtype == torch.uint8
    b = sd15.generate(["a cat", "a dog"], num_inference_steps=2, guidance_scale=7.5, generator=0, height=32, width=48)
    assert torch.equal(a, b)
    c = sd15.generate("a cat", num_inference_steps=1, generator=torch.Generator().manual_seed(1))
    assert c.shape == (1, 3, 64, 64)  # default: UNet sample size x 8
    after = sd15.scheduler.timesteps
    assert (ts is None and after is None) or torch.equal(ts, after)  # self.scheduler untouched
    assert_raises_naming(lambda: sd15.generate("a cat", 2, height=30), ValueError, ["height", "8"])


# ---------------------------------------------------------------------------------------------- devices
def test_half_precision_capture(device, tok_dir):
    """Reduced precision (fp16 on CUDA, bf16 on the CPU): q/k keep the model dtype, probabilities and
    means are float32, and the capture still leaves the UNet output bit-identical."""
    dtype = torch.float16 if device == "cuda" else torch.bfloat16
    sd = StableDiffusionBackbone.tiny(seed=0, layout="sd21", tokenizer_dir=tok_dir).to(device, dtype)
    assert sd.device.type == device and sd.dtype == dtype
    img = torch.randint(0, 256, (1, 3, 64, 64), dtype=torch.uint8)
    z = sd.encode_images(img, size=64)
    assert z.dtype == dtype and z.device.type == device
    zn, _ = sd.add_noise(z, 100, generator=torch.Generator(device=device).manual_seed(0))
    e, _ = sd.encode_prompt("a photograph of a cat++")
    assert e.dtype == dtype
    e = sd.reweight(e, sd.token_indices("a photograph of a cat++", "cat"), 1.6)
    ref = sd.unet(zn, 100, e)
    specs = [LayerCapture(SELF64, store="qk"), LayerCapture(CROSS, store="probs"),
             LayerCapture("down_blocks.0.*attn1", store="mean")]
    out, cap = sd.unet(zn, 100, e, capture=specs)
    assert torch.equal(out, ref)
    q, k = cap.qk(SELF64)
    assert q.dtype == dtype and q.device.type == device
    p = cap.probs(CROSS)
    assert p.dtype == torch.float32
    torch.testing.assert_close(p.sum(-1), torch.ones_like(p[..., 0]))
    m = cap.mean("down_blocks.0.attentions.0.transformer_blocks.0.attn1")
    assert m.dtype == torch.float32 and m.shape == (1, 64, 64)


def test_running_mean_in_row_blocks_equals_one_block(sd15, monkeypatch):
    """store="mean" forms every head after the first in row blocks (one full map held: the mean); any block
    size gives the same mean, counts and reused outputs as whole maps."""
    from weakseg.backbones.attention import AttentionStore

    z, e = _inputs(sd15)
    specs = [LayerCapture("re:.*attn1", store="mean", group="resolution", reuse=True),
             LayerCapture("re:.*attn2", store="mean", group="resolution")]
    out_whole, whole = sd15.unet(z, 100, e, capture=specs)
    for block_rows in (1, 3, 16):  # 64 rows at the finest self-attention grid: uneven and one-row blocks
        monkeypatch.setattr(AttentionStore, "MEAN_BLOCK_BYTES", 4 * 2 * 64 * block_rows)
        out_rows, rows = sd15.unet(z, 100, e, capture=specs)
        torch.testing.assert_close(out_rows, out_whole, atol=1e-6, rtol=1e-5)
        for kind in ("self", "cross"):
            assert rows.resolutions(kind) == whole.resolutions(kind)
            for r in whole.resolutions(kind):
                torch.testing.assert_close(rows.resolution_mean(kind, r), whole.resolution_mean(kind, r),
                                           atol=1e-6, rtol=1e-5)
                assert rows.count((kind, r)) == whole.count((kind, r))
