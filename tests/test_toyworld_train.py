"""Training of the toy world's models (weakseg.toy): each stage learns on tiny settings, resume is bit
for bit, the CLIP text tower converts to transformers exactly, the loaders read what training wrote (offline),
the signal checks run; and, once committed, the real toy CLIP classifies held-out scenes."""

import socket
from pathlib import Path

import numpy as np
import pytest
import torch

from _helpers import assert_raises_naming

pytest.importorskip("open_clip")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from weakseg.toy import TRAIN_COMMAND, load_toy_clip, load_toy_sd, toy_weights_available  # noqa: E402
from weakseg.toy import train as T  # noqa: E402
from weakseg.toy.models import (assemble_sd, build_clip, build_unet, build_vae,  # noqa: E402
                                     text_tower_to_hf)
from weakseg.toy.world import CLASSES, ToyWorld  # noqa: E402
from weakseg.toy.signal import best_threshold_iou, binding_figures, clip_zero_shot_accuracy, sd_attention_iou  # noqa: E402

TINY = {
    "clip": {"width": 32, "layers": 1, "heads": 2, "embed_dim": 32, "text_width": 32, "text_layers": 1,
             "conv_stem": [8, 8, 8]},
    "text": {"width": 32, "layers": 1, "heads": 2, "embed_dim": 32, "text_width": 32, "text_layers": 1},
    "vae": {"block_out_channels": [8, 8, 16], "norm_num_groups": 8},
    "unet": {"block_out_channels": [32, 32, 32, 32], "attention_head_dim": [1, 1, 1, 1]},
}
N_SCENES = 8


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models train faster on one thread than on contended cores; restored afterwards."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("toywork")


@pytest.fixture(scope="module")
def cache(work):
    return T.load_scene_cache(work, num_scenes=N_SCENES, workers=1, progress=False)


def _settings(steps, batch=N_SCENES, lr=3e-3, ckpt_every=100):
    return T.StageSettings(steps=steps, batch=batch, lr=lr, warmup=1, weight_decay=0.0, ckpt_every=ckpt_every)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The whole pipeline (clip -> text -> vae -> unet) on tiny models, written to out/."""
    root = tmp_path_factory.mktemp("toyall")
    summary = T.train("all", out_dir=root / "out", work_dir=root / "work",
                      steps={"clip": 4, "crops": 2, "text": 3, "vae": 3, "unet": 3},
                      batch={"clip": 8, "crops": 8, "text": 8, "vae": 4, "unet": 4},
                      num_scenes=N_SCENES, progress=False, overrides=TINY,
                      log=lambda m: None)
    return root, summary


# ------------------------------------------------------------------ data

def test_scene_cache_is_generated_once_and_matches_the_world(work, cache):
    from weakseg.toy.world import ToyWorld

    assert cache.images.shape == (N_SCENES, 3, 64, 64) and cache.images.dtype == torch.uint8
    assert cache.tokens.shape == (N_SCENES, 77)
    s = ToyWorld(64, "train", num_scenes=N_SCENES).scene(5)
    assert torch.equal(cache.images[5], s.image) and cache.captions[5] == s.caption
    again = T.load_scene_cache(work, num_scenes=N_SCENES, workers=1, progress=False)  # read back from the file
    assert torch.equal(again.images, cache.images) and again.captions == cache.captions
    assert torch.equal(again.tokens, cache.tokens)


def test_caption_variants_keep_the_objects_and_are_seeded():
    cap = "a photo of an orange star, a red circle and a blue ring on sand"
    outs = {T.caption_variant(cap, np.random.default_rng([0, i])) for i in range(60)}
    assert cap in outs and "a photo of a star, a circle and a ring." in outs
    for o in outs:
        assert all(w in o for w in ("star", "circle", "ring"))
    assert T.caption_variant(cap, np.random.default_rng(3)) == T.caption_variant(cap, np.random.default_rng(3))


def test_shape_negatives_differ_from_the_caption_in_one_shape_word_only():
    cap = "a photo of an orange star, a red circle and a blue ring on sand"
    for i in range(40):
        neg = T.shape_negative(cap, np.random.default_rng(i))
        a, b = cap.split(), neg.split()
        diff = [(x, y) for x, y in zip(a, b) if x != y]
        assert len(a) == len(b) and len(diff) == 1, neg
        old, new = diff[0][0].strip(","), diff[0][1].strip(",")
        assert old in ("star", "circle", "ring") and new in ("square", "triangle")  # a shape not named
    # every shape named: the replacement is still another shape
    full = "a photo of a star, a circle, a ring, a square and a triangle"
    neg = T.shape_negative(full, np.random.default_rng(0))
    assert neg != full and sorted(neg.split()) != sorted(full.split())
    with pytest.raises(ValueError, match="no shape word"):
        T.shape_negative("a photo of grass", np.random.default_rng(0))


def test_hard_negatives_enter_only_the_image_to_text_side(cache):
    """With negatives that are far from every image, the loss barely moves; with negatives equal to the
    positives' text, the image->text side gets harder, so the loss grows."""
    from open_clip import SimpleTokenizer

    tok = SimpleTokenizer()
    clip = build_clip(0, TINY["clip"]).eval()
    caps = list(cache.captions)
    with torch.no_grad():
        plain = float(T.clip_batch_loss(clip, cache.images, caps, tok))
        same = float(T.clip_batch_loss(clip, cache.images, caps, tok, negatives=caps))
    assert same > plain


# ------------------------------------------------------------------ stages learn

def test_clip_stage_reduces_the_loss_on_a_fixed_batch(work, cache):
    """The training objective (InfoNCE with shape-swapped negatives + the class-prompt loss) on the fixed
    batch of the 8 scenes falls after 20 steps."""
    from open_clip import SimpleTokenizer

    tok = SimpleTokenizer()
    caps = list(cache.captions)
    negs = [T.shape_negative(c, np.random.default_rng(i)) for i, c in enumerate(caps)]
    targets = T.shape_targets(caps)

    def objective(clip):
        with torch.no_grad():
            return float(T.clip_batch_loss(clip, cache.images, caps, tok, negs, targets))

    l0 = objective(build_clip(0, TINY["clip"]).train())
    clip, rec = T.train_clip(cache, work / "c", _settings(20), overrides=TINY["clip"], progress=False)
    l1 = objective(clip)
    assert len(rec["losses"]) == 20 and l1 < 0.85 * l0, (l0, l1)


def test_prompt_loss_is_zero_weighted_for_captions_without_shapes_and_prefers_the_named_shape():
    from open_clip import SimpleTokenizer

    tok = SimpleTokenizer()
    clip = build_clip(0, TINY["clip"]).eval()
    imgs = torch.zeros(2, 3, 64, 64, dtype=torch.uint8)
    caps = ["a photo of a circle", "a photo of a star"]
    with torch.no_grad():
        base = float(T.clip_batch_loss(clip, imgs, caps, tok))
        none = float(T.clip_batch_loss(clip, imgs, caps, tok, prompt_targets=torch.zeros(2, 5)))
        some = float(T.clip_batch_loss(clip, imgs, caps, tok, prompt_targets=T.shape_targets(caps)))
    assert none == pytest.approx(base) and some > base  # the prompt term adds a positive cross-entropy


def test_vae_stage_reduces_the_loss_and_sets_the_scaling_factor(work, cache):
    eps = torch.randn((N_SCENES, 4, 16, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        l0 = float(T.vae_batch_loss(build_vae(0, TINY["vae"]), cache.images, eps))
    vae, rec = T.train_vae(cache, work / "v", _settings(10), overrides=TINY["vae"], progress=False)
    with torch.no_grad():
        l1 = float(T.vae_batch_loss(vae, cache.images, eps))
        z = vae.encode(cache.images.float().div(127.5).sub(1)).latent_dist.mean
    assert l1 < 0.8 * l0, (l0, l1)
    assert vae.config.scaling_factor == pytest.approx(1 / rec["latent_std"])
    assert float((z * vae.config.scaling_factor).std()) == pytest.approx(1.0, rel=0.05)


def test_unet_stage_reduces_the_loss_on_a_fixed_batch(work, cache):
    clip = build_clip(0, TINY["clip"])
    te = text_tower_to_hf(clip.model)
    vae = build_vae(0, TINY["vae"])
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        z = vae.encode(cache.images.float().div(127.5).sub(1)).latent_dist.mean
        cond = te(cache.tokens)[0]
    noise = torch.randn(z.shape, generator=g)
    t = torch.randint(0, 1000, (N_SCENES,), generator=g)
    sched = T._noise_scheduler()
    with torch.no_grad():
        l0 = float(T.unet_batch_loss(build_unet(0, TINY["unet"]), sched, z, cond, noise, t))
    unet, te1, rec = T.train_unet(cache, work / "u", _settings(8), vae, te, overrides=TINY["unet"], progress=False,
                                  log=lambda m: None)
    with torch.no_grad():
        l1 = float(T.unet_batch_loss(unet, sched, z, te1(cache.tokens)[0], noise, t))
    assert len(rec["losses"]) == 8 and l1 < 0.9 * l0, (l0, l1)
    # the text encoder was trained with the UNet (a copy: the caller's encoder is untouched)
    assert te1 is not te and not torch.equal(te1(cache.tokens)[0], cond)
    with torch.no_grad():
        assert torch.equal(te(cache.tokens)[0], cond)
    # frozen text encoder: returned unchanged
    unet2, te2, _ = T.train_unet(cache, work / "u2", _settings(2), vae, te, overrides=TINY["unet"], progress=False,
                                 log=lambda m: None, train_text=False)
    with torch.no_grad():
        assert torch.equal(te2(cache.tokens)[0], cond)


# ------------------------------------------------------------------ resume

@pytest.mark.parametrize("stage", ["clip", "crops", "unet"])
def test_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path, cache, stage):
    def run(work, stop_at=None, resume=False):
        st = _settings(4, batch=4, ckpt_every=2)
        if stage == "clip":
            m, rec = T.train_clip(cache, work, st, overrides=TINY["clip"], progress=False, stop_at=stop_at,
                                  resume=resume)
            return m.model, rec
        if stage == "crops":
            m, rec = T.train_crops(cache, work, st, build_clip(0, TINY["clip"]), progress=False, stop_at=stop_at,
                                   resume=resume, log=lambda m: None)
            return m.model, rec
        clip = build_clip(0, TINY["clip"])
        unet, te, rec = T.train_unet(cache, work, st, build_vae(0, TINY["vae"]), text_tower_to_hf(clip.model),
                                     overrides=TINY["unet"], progress=False, stop_at=stop_at, resume=resume,
                                     log=lambda m: None)
        return T._UNetWithText(unet, te), rec

    full, _ = run(tmp_path / "a")
    part, rec = run(tmp_path / "b", stop_at=3)
    assert rec["end_step"] == 3
    resumed, rec2 = run(tmp_path / "b", resume=True)
    assert rec2["start_step"] == 3 and rec2["end_step"] == 4
    a, b = full.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # sanity of the set-up: the interrupted run's model at step 3 differs from the final one
    assert any(not torch.equal(part.state_dict()[k], a[k]) for k in a)


def test_unet_seed_trials_pick_the_best_and_the_winner_continues_as_an_uninterrupted_run(tmp_path, cache,
                                                                                         monkeypatch):
    """pick_unet_seed: every seed runs the first trial_steps steps, the best score wins (its checkpoint becomes
    the stage's), train_unet(resume=True) with the winner's seed then ends bit for bit where an uninterrupted
    run of that seed ends; stop_at pauses the trials and a resume reads finished trials and the pick back."""
    import weakseg.toy.signal as S

    st = _settings(4, batch=4, ckpt_every=2)
    clip = build_clip(0, TINY["clip"])
    vae, te = build_vae(0, TINY["vae"]), text_tower_to_hf(clip.model)
    quiet = dict(overrides=TINY["unet"], progress=False, log=lambda m: None)
    # the real score first: the signal's raw cross-attention IoU of each trial's SD on val scenes
    real = T.pick_unet_seed(cache, tmp_path / "real", st, vae, te, seed=5, trials=2, trial_steps=2, pick_scenes=2,
                            **quiet)
    assert set(real["scores"]) == {"5", "6"} and all(0.0 <= v <= 1.0 for v in real["scores"].values())
    assert real["seed"] == max((5, 6), key=lambda s: (real["scores"][str(s)], -s))
    # then known scores (seed 1 best) to follow the winner
    calls = []

    def fake_iou(sd, num_scenes):
        calls.append(num_scenes)
        v = [0.2, 0.5, 0.1][len(calls) - 1]
        return {"cross": {"miou": v}, "propagated_1": {"miou": v}}

    monkeypatch.setattr(S, "sd_attention_iou", fake_iou)
    work = tmp_path / "w"
    assert T.pick_unet_seed(cache, work, st, vae, te, trials=3, trial_steps=2, stop_at=1, **quiet) is None
    pick = T.pick_unet_seed(cache, work, st, vae, te, trials=3, trial_steps=2, resume=True, **quiet)
    assert pick["seed"] == 1 and pick["scores"] == {"0": 0.2, "1": 0.5, "2": 0.1} and len(calls) == 3
    assert T.pick_unet_seed(cache, work, st, vae, te, trials=3, trial_steps=2, resume=True, **quiet) == pick
    assert len(calls) == 3  # read back, not re-run
    unet, te1, rec = T.train_unet(cache, work, st, vae, te, 1, resume=True, **quiet)
    assert rec["start_step"] == 2 and rec["end_step"] == 4
    ref_unet, ref_te, _ = T.train_unet(cache, tmp_path / "ref", st, vae, te, 1, **quiet)
    a, b = T._UNetWithText(ref_unet, ref_te).state_dict(), T._UNetWithText(unet, te1).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    other, _, _ = T.train_unet(cache, tmp_path / "other", st, vae, te, 0, **quiet)
    assert any(not torch.equal(other.state_dict()[k], unet.state_dict()[k]) for k in unet.state_dict())
    assert_raises_naming(lambda: T.pick_unet_seed(cache, work, st, vae, te, trial_steps=4, **quiet), ValueError,
                         ["trial_steps", "[1, 4)"])
    assert_raises_naming(lambda: T.train(stage="unet", work_dir=work, unet_trials=0), ValueError, ["unet_trials"])
    with pytest.raises(SystemExit):  # the CLI refuses it before any work (argparse error, rc 2)
        T.main(["--stage", "unet", "--work", str(work), "--unet-trials", "0"])


def test_resume_with_other_settings_is_refused(tmp_path, cache):
    T.train_vae(cache, tmp_path, _settings(4, batch=2), overrides=TINY["vae"], progress=False, stop_at=2)
    assert_raises_naming(lambda: T.train_vae(cache, tmp_path, _settings(5, batch=2), overrides=TINY["vae"],
                                             progress=False, resume=True), ValueError, ["--resume", "steps=4"])


# ------------------------------------------------------------------ text tower conversion

@pytest.mark.parametrize("quick_gelu", [False, True])
def test_text_tower_conversion_gives_the_same_hidden_states(quick_gelu):
    from weakseg.backbones.tokenizer import make_clip_tokenizer

    clip = build_clip(3, dict(TINY["clip"], text_layers=2, quick_gelu=quick_gelu))
    m = clip.model
    hf = text_tower_to_hf(m)
    assert hf.config.hidden_act == ("quick_gelu" if quick_gelu else "gelu")
    caps = ["a photo of a red circle and a blue star on grass", "a photo of a ring.", ""]
    toks = clip.tokenizer(caps)
    # SD 2.x's tokenizer ("!" padding) gives open_clip's ids, so the converted tower sees the same input
    ids = make_clip_tokenizer(pad_token="!")(caps, padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert torch.equal(ids, toks)
    with torch.no_grad():
        x = m.token_embedding(toks) + m.positional_embedding
        ref = m.ln_final(m.transformer(x, attn_mask=m.attn_mask))
        out = hf(toks).last_hidden_state
        # the pooled end-of-text state through the projection is open_clip's text embedding
        pooled = hf(toks).pooler_output @ m.text_projection
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pooled, m.encode_text(toks), rtol=1e-5, atol=1e-5)


def test_text_tower_conversion_rejects_what_clip_text_model_cannot_express():
    clip = build_clip(0, dict(TINY["clip"]))
    m = clip.model
    m.attn_mask = None
    assert_raises_naming(lambda: text_tower_to_hf(m), TypeError, ["causal"])
    assert_raises_naming(lambda: text_tower_to_hf(torch.nn.Linear(2, 2)), TypeError, ["token_embedding"])


# ------------------------------------------------------------------ loaders

def test_loaders_read_what_training_wrote_offline(trained, monkeypatch):
    root, summary = trained
    out = root / "out"
    assert summary["finished"] and set(summary["stages"]) == {"clip", "crops", "text", "vae", "unet"}
    assert summary["weights_bytes"]["clip"] > 0 and summary["weights_bytes"]["sd"] > 0

    def no_network(*a, **k):
        raise AssertionError("the toy loaders must not touch the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    clip = load_toy_clip(out / "clip")
    sd = load_toy_sd(out / "sd")
    assert clip.dtype == torch.float32 and sd.dtype == torch.float32
    # the saved weights are the fp16 rounding of the trained fp32 ones
    ref_clip = T._load_final_clip(root / "work", "cpu", "crops")  # the crops stage's CLIP is the committed one
    for k, v in ref_clip.model.state_dict().items():
        torch.testing.assert_close(clip.model.state_dict()[k], v.half().float(), rtol=0, atol=0)
    from diffusers import UNet2DConditionModel

    ref_unet = UNet2DConditionModel.from_pretrained(str(root / "work" / "final" / "unet"), local_files_only=True)
    for k, v in ref_unet.state_dict().items():
        torch.testing.assert_close(sd.unet_model.state_dict()[k], v.half().float(), rtol=0, atol=0)
    ref_vae = T._load_final_vae(root / "work", "cpu")
    assert sd.vae.config.scaling_factor == pytest.approx(ref_vae.config.scaling_factor)
    # SD's text encoder is the one trained with the UNet (initialised from the text stage's CLIP)
    from transformers import CLIPTextModel

    ref_te = CLIPTextModel.from_pretrained(str(root / "work" / "final" / "text_encoder"), local_files_only=True)
    for k, v in ref_te.state_dict().items():
        torch.testing.assert_close(sd.text_encoder.state_dict()[k], v.half().float(), rtol=0, atol=0)
    toks = clip.tokenizer(["a photo of a star"])
    with torch.no_grad():
        assert not torch.allclose(sd.text_encoder(toks)[0], text_tower_to_hf(clip.model)(toks)[0])
    assert sd.vae_scale_factor == 4 and sd.tokenizer.pad_token == "!"


class _Captured(Exception):
    pass


def test_unet_stage_starts_from_the_text_stage_clip_with_linear_patchify(trained, monkeypatch):
    root, _ = trained
    work = root / "work"
    text_clip, clip = T._load_final_clip(work, "cpu", "text"), T._load_final_clip(work, "cpu")
    assert text_clip.conv_stem is None and clip.conv_stem == TINY["clip"]["conv_stem"]
    seen = {}

    def capture(cache, work_dir, settings, vae, text_encoder, *args, **kwargs):
        seen["text_encoder"] = text_encoder
        raise _Captured

    monkeypatch.setattr(T, "train_unet", capture)
    with pytest.raises(_Captured):
        T.train("unet", out_dir=root / "out_unused", work_dir=work, num_scenes=N_SCENES, progress=False,
                overrides=TINY, log=lambda m: None)
    got = seen["text_encoder"].state_dict()
    ref = text_tower_to_hf(text_clip.model).state_dict()
    other = text_tower_to_hf(clip.model).state_dict()
    assert got.keys() == ref.keys()
    assert all(torch.equal(got[k], ref[k]) for k in ref)
    assert any(not torch.equal(got[k], other[k]) for k in ref)


def test_text_stage_draws_the_clip_stage_batches(tmp_path, cache):
    """The text stage is the first CLIP recipe under its own name: with the same settings and model it
    trains the very same weights as the clip stage (same random stream), in its own folders."""
    st = _settings(3, batch=4)
    a, _ = T.train_clip(cache, tmp_path, st, overrides=TINY["text"], progress=False)
    b, _ = T.train_clip(cache, tmp_path, st, overrides=TINY["text"], progress=False, stage="text")
    for k, v in a.model.state_dict().items():
        assert torch.equal(v, b.model.state_dict()[k]), k
    assert (tmp_path / "final" / "text").is_dir() and (tmp_path / "ckpt" / "text" / "last.safetensors").is_file()
    assert_raises_naming(lambda: T.train_clip(cache, tmp_path, st, stage="vae"), ValueError, ["stage", "'text'"])
    assert_raises_naming(lambda: T._load_final_clip(tmp_path / "none", "cpu", "text"), FileNotFoundError,
                         ["--stage text"])


def test_snapshot_writes_the_unet_checkpoint_as_loadable_sd_weights(trained, tmp_path):
    root, _ = trained
    where = T.snapshot_sd(root / "work", tmp_path / "snap", overrides=TINY["unet"])
    assert where == tmp_path / "snap" / "sd"
    snap, final = load_toy_sd(where), load_toy_sd(root / "out" / "sd")
    # the checkpoint of the last step holds what the stage finished with: the same UNet and text encoder
    for a, b in ((snap.unet_model, final.unet_model), (snap.text_encoder, final.text_encoder), (snap.vae, final.vae)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert_raises_naming(lambda: T.snapshot_sd(tmp_path / "none", tmp_path / "x"), FileNotFoundError,
                         ["--stage unet", str(tmp_path / "none")])
    with pytest.raises(SystemExit):  # the CLI names the missing checkpoint (argparse error, rc 2)
        T.main(["--snapshot", str(tmp_path / "y"), "--work", str(tmp_path / "none")])


def test_loaders_name_the_missing_path_and_the_training_command(tmp_path):
    assert not toy_weights_available("clip", tmp_path / "none")
    assert_raises_naming(lambda: load_toy_clip(tmp_path / "none"), FileNotFoundError,
                         [str(tmp_path / "none"), TRAIN_COMMAND, "open_clip_config.json"])
    (tmp_path / "sd" / "vae").mkdir(parents=True)
    assert_raises_naming(lambda: load_toy_sd(tmp_path / "sd"), FileNotFoundError,
                         [str(tmp_path / "sd"), TRAIN_COMMAND, "unet"])
    assert_raises_naming(lambda: toy_weights_available("dino"), ValueError, ["which"])


# ------------------------------------------------------------------ signal

def test_signal_runs_on_tiny_models(trained):
    root, _ = trained
    clip = load_toy_clip(root / "out" / "clip")
    zs = clip_zero_shot_accuracy(clip, num_scenes=10)
    assert 0.0 <= zs["accuracy"] <= 1.0 and zs["num_scenes"] == 10 and set(zs["per_class"]) >= {"circle", "ring"}
    sd = load_toy_sd(root / "out" / "sd")
    r = sd_attention_iou(sd, num_scenes=3)
    assert r["resolution"] == [16, 16] and r["num_pairs"] >= 3
    for k in ("cross", "propagated_1", "propagated_10"):
        assert 0.0 <= r[k]["miou"] <= 1.0 and len(r[k]["curve"]) == 19
        assert r[k]["miou"] == max(r[k]["curve"]) or abs(r[k]["miou"] - max(r[k]["curve"])) < 1e-4
    b = r["binding"]
    assert set(b) == {"pairs_with_another_object", "own_over_other", "own_over_other_per_class", "iou_one_object",
                      "iou_several_objects", "iou_vs_all_objects"}
    assert 0 <= b["pairs_with_another_object"] <= r["num_pairs"]


def test_binding_figures_on_known_maps():
    """Two objects: the first class's map sits on its object, the second's on the other one."""
    a = torch.zeros(8, 8, dtype=torch.bool)
    a[0:3, 0:3] = True
    b = torch.zeros(8, 8, dtype=torch.bool)
    b[5:8, 5:8] = True
    lone = torch.zeros(8, 8, dtype=torch.bool)
    lone[2:6, 2:6] = True
    maps = [a.float(), a.float() * 0.9 + b.float() * 0.3, lone.float()]
    r = binding_figures(maps, [a, b, lone], [b, a, torch.zeros_like(a)], [1, 4, 2])
    assert r["pairs_with_another_object"] == 2 and r["own_over_other"] == 0.5
    assert r["own_over_other_per_class"] == {"circle": 1.0, "star": 0.0}
    assert r["iou_one_object"] == pytest.approx(1.0)
    # the second map, thresholded, covers the wrong object only (or both): its IoU with its own is < 1
    assert r["iou_several_objects"] < 1.0
    assert r["iou_vs_all_objects"] > r["iou_several_objects"]
    assert_raises_naming(lambda: binding_figures(maps, [a], [b], [1]), ValueError, ["maps", "others"])


def test_binding_compares_per_pixel_so_a_large_other_object_does_not_win_by_area():
    """A small object whose map is twice as high on it as on a big neighbour binds to it, although the
    neighbour holds more of the map's mass."""
    small = torch.zeros(16, 16, dtype=torch.bool)
    small[0:2, 0:2] = True  # 4 px
    big = torch.zeros(16, 16, dtype=torch.bool)
    big[6:16, 6:16] = True  # 100 px
    m = small.float() * 1.0 + big.float() * 0.5
    assert float(m[big].sum()) > float(m[small].sum())
    r = binding_figures([m, 0.2 * small.float() + big.float()], [small, big], [big, small], [3, 1])
    assert r["own_over_other"] == 1.0 and r["own_over_other_per_class"] == {"circle": 1.0, "triangle": 1.0}
    m2 = small.float() * 0.4 + big.float() * 0.5  # lower on its own object per pixel: wrong
    assert binding_figures([m2], [small], [big], [3])["own_over_other"] == 0.0


def test_best_threshold_iou_on_known_maps():
    mask = torch.zeros(8, 8, dtype=torch.bool)
    mask[2:6, 2:6] = True
    perfect = mask.float()
    half = torch.zeros(8, 8)
    half[2:6, 2:4] = 1.0
    miou, th, curve = best_threshold_iou([perfect, half], [mask, mask])
    assert miou == pytest.approx(0.75) and 0 < th <= 1 and max(curve) == miou
    assert_raises_naming(lambda: best_threshold_iou([], []), ValueError, ["maps"])


# ------------------------------------------------------------------ the committed weights

@pytest.mark.skipif(not toy_weights_available("clip"),
                    reason=f"the toy CLIP weights are not committed yet (run `{TRAIN_COMMAND} --stage clip`)")
def test_committed_toy_clip_classifies_held_out_scenes():
    # measured 99.6% on 500 val scenes and 100% on these 50 (ConvStem recipe; 61.8% on 500 with the linear
    # patchify); chance is 20%. The target is 90%.
    res = clip_zero_shot_accuracy(load_toy_clip(), num_scenes=50)
    assert res["accuracy"] >= 0.9, res


@pytest.mark.skipif(not toy_weights_available("sd"),
                    reason=f"the toy SD weights are not committed yet (run `{TRAIN_COMMAND} --stage unet`)")
def test_committed_toy_sd_attention_localises_and_propagation_helps():
    # measured on 100 val scenes: 16x16 class-token cross-attention IoU 0.466, 0.521 after one propagation
    r = sd_attention_iou(load_toy_sd(), num_scenes=30)
    assert r["cross"]["miou"] >= 0.35, r["cross"]
    assert r["propagated_1"]["miou"] > r["cross"]["miou"], (r["cross"]["miou"], r["propagated_1"]["miou"])


def test_hires_stage_continues_the_unet_on_upsampled_scenes_and_caches_the_latents(trained):
    """Stage 5 starts from the unet stage's UNet (not a fresh one), trains on 32x32 latents of the scenes
    upsampled to 128 px, records the new latent side in the UNet config, reuses the encoded latents on a
    second run, and its snapshot loads as SD weights."""
    root, _ = trained
    work = root / "work"
    unet0, te0 = T._load_final_unet(work, "cpu")
    summary = T.train("hires", out_dir=root / "out_hr", work_dir=work, steps={"hires": 2}, batch={"hires": 4},
                      num_scenes=N_SCENES, progress=False, log=lambda m: None)
    assert summary["finished"] and set(summary["stages"]) == {"hires"}
    unet1, te1 = T._load_final_unet(work, "cpu", "hires")
    assert unet1.config.sample_size == T.HIRES_SIZE // 4 and unet0.config.sample_size == 16
    s0, s1 = unet0.state_dict(), unet1.state_dict()
    assert s0.keys() == s1.keys()
    # continued, not restarted: close to the start, but moved
    assert any(not torch.equal(s0[k], s1[k]) for k in s0)
    assert max(float((s0[k] - s1[k]).abs().max()) for k in s0) < 0.05
    cached = list((work / "cache").glob("latents_s128_*.safetensors"))
    assert len(cached) == 1
    vae = T._load_final_vae(work, "cpu")
    cache = T.load_scene_cache(work, num_scenes=N_SCENES, workers=1, progress=False)
    mean, std = T._cached_latent_moments(work, vae, cache, "cpu", 128, False)
    assert mean.shape == (N_SCENES, 4, 32, 32)
    ref_mean, _ = T._latent_moments(vae, cache.images, "cpu", size=128)
    assert torch.allclose(mean, ref_mean, atol=1e-5)
    where = T.snapshot_sd(work, root / "snap_hr", stage="hires")
    snap = load_toy_sd(where)
    assert snap.unet_model.config.sample_size == 32
    assert_raises_naming(lambda: T.snapshot_sd(work, root / "x", stage="vae"), ValueError, ["stage", "'hires'"])
    assert_raises_naming(lambda: T._load_final_unet(root / "none", "cpu", "hires"), FileNotFoundError,
                         ["--stage hires"])


def test_crop_objects_cuts_the_box_and_resizes_it():
    img = torch.zeros(2, 3, 64, 64, dtype=torch.uint8)
    img[0, 0, 10:20, 30:40] = 200  # a red 10 px square centred at (15, 35)
    img[1, 2, 40:64, 0:8] = 90     # a blue block at the bottom-left corner
    out = T.crop_objects(img, [15.0, 60.0], [35.0, 4.0], [5.0, 8.0], 32)
    assert out.shape == (2, 3, 32, 32) and out.dtype == torch.uint8
    # the box is exactly the square: red inside (bilinear blends the outermost samples with the
    # neighbouring pixels), nothing else
    assert (out[0, 0, 2:-2, 2:-2] == 200).all() and (out[0, 1:] == 0).all() and out[0, 0].float().mean() > 180
    # half outside the image (rows 52-68, columns -4..12): the border pixels continue the block, which ends
    # at column 8, i.e. at output column 24
    assert (out[1, 2, :, :20] == 90).all() and (out[1, 2, :, 25:] == 0).all() and (out[1, :2] == 0).all()
    assert_raises_naming(lambda: T.train_crops(T.SceneCache(img[:0], torch.zeros(0, 77, dtype=torch.long), []),
                                               Path("/nonexistent"), _settings(1), None, num_scenes=0),
                         ValueError, ["num_scenes", ">= 1"])


def test_crops_stage_continues_the_clip_and_its_result_is_the_committed_clip(trained):
    """Stage 1b starts from the clip stage's CLIP (close to it, but moved), caches the scenes' object boxes
    (matching the world's objects; one-object captions), and its CLIP, not the clip stage's, is written to
    out/clip."""
    root, summary = trained
    work = root / "work"
    assert "crops" in summary["stages"] and summary["stages"]["crops"]["settings"]["steps"] == 2
    c0 = T._load_final_clip(work, "cpu", "clip").model.state_dict()
    c1 = T._load_final_clip(work, "cpu", "crops").model.state_dict()
    assert any(not torch.equal(c0[k], c1[k]) for k in c0)
    assert max(float((c0[k] - c1[k]).abs().max()) for k in c0 if c0[k].is_floating_point()) < 0.1
    out = load_toy_clip(root / "out" / "clip").model.state_dict()
    assert all(torch.allclose(out[k].float(), c1[k].float(), atol=2e-3, rtol=2e-3) for k in c1)
    assert any(not torch.allclose(out[k].float(), c0[k].float(), atol=1e-4) for k in c0)
    objs = T.scene_objects(work, N_SCENES, progress=False)
    assert (work / "cache" / f"objects_s64_n{N_SCENES}_seed0.json").is_file()
    world = ToyWorld(64, "train", num_scenes=N_SCENES)
    for i in range(N_SCENES):
        s = world.scene(i)
        lo, hi = int(objs.first[i]), int(objs.first[i + 1])
        assert hi - lo == len(s.shown)
        for o, box, cap in zip([s.objects[n] for n in s.shown], objs.box[lo:hi], objs.caption[lo:hi]):
            assert np.allclose(box, [o.cy, o.cx, o.radius])
            assert cap.count(" and ") == 0 and f"{o.color} {CLASSES[o.cls]}" in cap and cap.endswith(s.stuff)
