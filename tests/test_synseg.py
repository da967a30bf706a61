"""SynSeg: FSS, the MCCL losses, the decoder, inference, export parity, training/resume, data, CLI.

Everything runs on the tiny random CLIP (``preset="tiny"``) on one thread.
"""

import io
import json
import math
import tarfile

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from weakseg.methods.synseg import (SynSeg, SynSegConfig, bounded_cos, fss_pool, mccl_losses, split_views,
                                    stitch_views)
from weakseg.train.synseg import SynSegTrainConfig, lr_at, random_resized_crop, train_synseg


@pytest.fixture(scope="module")
def clip():
    from weakseg.backbones.clip import CLIPBackbone

    torch.set_num_threads(1)
    return CLIPBackbone.tiny(seed=0)


def make(clip, **kw):
    return SynSeg(SynSegConfig.from_dict({"preset": "tiny", **kw}), clip=clip)


# ------------------------------------------------------------------------------------------- losses

def _np_hat(u, v, eps=1e-4):
    s = float(np.dot(u, v) / (np.linalg.norm(u) * np.linalg.norm(v)))
    return eps + (1 - 2 * eps) * (min(max(s, -1), 1) + 1) / 2, s


def test_bounded_cos_range_and_monotone():
    u = torch.tensor([[1.0, 0.0]] * 5)
    ang = torch.linspace(0, math.pi, 5)
    v = torch.stack([ang.cos(), ang.sin()], 1)
    hat, raw = bounded_cos(u, v, eps=1e-3)
    assert torch.allclose(raw, ang.cos(), atol=1e-6)
    assert hat[0] == pytest.approx(1 - 1e-3) and hat[-1] == pytest.approx(1e-3)
    assert bool((hat[1:] < hat[:-1]).all())
    c, _ = bounded_cos(u, v, mode="clamp")
    assert float(c.min()) == pytest.approx(5e-4) and float(c.max()) == pytest.approx(0.9995)


def test_losses_by_hand():
    fg = np.array([[1.0, 0.0, 0.0], [0.6, 0.8, 0.0], [0.0, 0.0, 2.0]])
    bg = np.array([[1.0, 1.0, 0.0], [0.0, 1.0, 0.0], [0.0, 1.0, 0.0]])
    tx = np.array([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0], [1.0, 0.0, 1.0]])
    K = 3
    ft = np.mean([-math.log(_np_hat(fg[c], tx[c])[0]) for c in range(K)])
    fb = 0.0
    for c in range(K):
        h, s = _np_hat(fg[c], bg[c])
        fb += (s > 0.1) * -math.log(1 - h)
    fb /= K
    pairs = [(a, b) for a in range(K) for b in range(K) if a != b]
    bb = np.mean([-math.log(_np_hat(bg[a], bg[b])[0]) for a, b in pairs])
    ff = np.mean([-math.log(1 - _np_hat(fg[a], fg[b])[0]) for a, b in pairs])
    t = lambda x: torch.tensor(x, dtype=torch.float64)[None]
    out = mccl_losses(t(fg), t(bg), t(tx), weights=(1.0, 2.0, 3.0, 4.0))
    for name, want in zip(("ft", "fb", "bb", "ff"), (ft, fb, bb, ff)):
        assert float(out[name]) == pytest.approx(want, rel=1e-9), name
    assert float(out["loss"]) == pytest.approx(ft + 2 * fb + 3 * bb + 4 * ff, rel=1e-9)
    # fg[2] is orthogonal to bg[2] (cos 0 < 0.1): that pair is gated out, fg[0]/bg[0] (cos .707) is not
    assert _np_hat(fg[2], bg[2])[1] == 0.0 and fb > 0


def test_gate_excludes_separated_pairs_without_gradient():
    fg = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]], requires_grad=True)
    bg = torch.tensor([[[math.cos(0.5), math.sin(0.5)], [math.cos(1.5), math.sin(1.5)]]])  # cos .88 and .07
    tx = torch.ones(1, 2, 2)
    out = mccl_losses(fg, bg, tx, weights=(0, 1, 0, 0))
    h = 1e-4 + (1 - 2e-4) * (math.cos(0.5) + 1) / 2
    assert float(out["fb"].detach()) == pytest.approx(-math.log(1 - h) / 2, rel=1e-6)
    ungated = mccl_losses(fg, bg, tx, weights=(0, 1, 0, 0), gate=None)
    assert float(ungated["fb"].detach()) > float(out["fb"].detach())
    out["loss"].backward()
    assert fg.grad[0, 1].abs().sum() == 0 and fg.grad[0, 0].abs().sum() > 0


def test_single_category_and_padding():
    g = torch.Generator().manual_seed(0)
    fg, bg, tx = (torch.randn(2, 3, 4, generator=g, dtype=torch.float64) for _ in range(3))
    valid = torch.tensor([[True, False, False], [True, True, False]])
    out = mccl_losses(fg, bg, tx, valid)
    one = mccl_losses(fg[:1, :1], bg[:1, :1], tx[:1, :1])
    assert float(one["bb"]) == 0 and float(one["ff"]) == 0
    two = mccl_losses(fg[1:, :2], bg[1:, :2], tx[1:, :2])
    for k in ("ft", "fb"):
        assert float(out[k]) == pytest.approx((float(one[k]) + float(two[k])) / 2, rel=1e-9)
    for k in ("bb", "ff"):  # image 0 contributes 0, the mean is over both images
        assert float(out[k]) == pytest.approx(float(two[k]) / 2, rel=1e-9)
    with pytest.raises(ValueError, match="valid"):
        mccl_losses(fg, bg, tx, valid[:, :2])


# ------------------------------------------------------------------------------------------- FSS

@settings(max_examples=15)
@given(R=st.integers(1, 4), g=st.integers(1, 4), D=st.integers(1, 5), p=st.sampled_from([1, 2, 4]),
       seed=st.integers(0, 100))
def test_fss_shapes_and_fg_plus_bg_is_total(R, g, D, p, seed):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(R, g * p, g * p, generator=gen, dtype=torch.float64)
    tokens = torch.randn(R, g * g, D, generator=gen, dtype=torch.float64)
    pair = fss_pool(logits, tokens, (g, g), norm="hw")
    assert pair.shape == (R, 2, D)
    assert torch.allclose(pair.sum(1) * g * g, tokens.sum(1), atol=1e-9)
    mean = fss_pool(logits, tokens, (g, g), norm="mean", eps=0.0)
    m = torch.sigmoid(logits).reshape(R, g, p, g, p).mean((2, 4)).reshape(R, -1)
    want = (m[..., None] * tokens).sum(1) / m.sum(1, keepdim=True)
    assert torch.allclose(mean[:, 0], want, atol=1e-9)


def test_fss_permutation_equivariant_and_gradcheck():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 4, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    tokens = torch.randn(3, 4, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    perm = torch.tensor([2, 0, 1])
    assert torch.allclose(fss_pool(logits[perm], tokens[perm], (2, 2)), fss_pool(logits, tokens, (2, 2))[perm])
    text = torch.randn(1, 3, 3, generator=gen, dtype=torch.float64)

    def f(lg, tk):
        pair = fss_pool(lg, tk, (2, 2))
        return mccl_losses(pair[None, :, 0], pair[None, :, 1], text, gate=None)["loss"]

    assert torch.autograd.gradcheck(f, (logits, tokens))


# ------------------------------------------------------------------------------------------- model / inference

def test_decoder_batched_classes_match_one_by_one(clip):
    m = make(clip)
    x = clip.preprocess(torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8))
    text = m.text_embeddings(["cat", "dog", "red ball"])
    with torch.no_grad():
        acts = clip.encode_layers(x, m.config.extract_layers)
        logits, tokens = m.head.decode(acts, text)
        assert logits.shape == (2, 3, 64, 64) and tokens.shape == (6, 64, 8)
        for k in range(3):
            one, _ = m.head.decode(acts, text[k:k + 1])
            assert torch.allclose(one[:, 0], logits[:, k], atol=1e-5)
        _, fg, bg = m.head(acts, text[None].expand(2, 3, -1))
        assert fg.shape == bg.shape == (2, 3, clip.embed_dim)


def test_views_split_and_stitch():
    im = torch.arange(3 * 7 * 9, dtype=torch.uint8).reshape(3, 7, 9)
    views, boxes = split_views(im)
    assert [tuple(v.shape[-2:]) for v in views] == [(7, 9), (3, 4), (3, 5), (4, 4), (4, 5)]
    assert boxes[3] == (3, 7, 4, 9)
    probs = torch.full((5, 2, 8, 8), 0.3)
    assert torch.allclose(stitch_views(probs, boxes, (7, 9)), torch.full((2, 7, 9), 0.3))
    probs[4] = 0.9  # the bottom-right quadrant alone: only its box changes
    out = stitch_views(probs, boxes, (7, 9))
    assert torch.allclose(out[:, 3:, 4:], torch.full((2, 4, 5), 0.6)) and torch.allclose(out[:, :3], torch.tensor(0.3))
    assert torch.allclose(stitch_views(probs, boxes, (7, 9), "max")[:, 3:, 4:], torch.tensor(0.9))


def test_segment_background_rule_views_and_errors(clip):
    m = make(clip, views=1)
    img = torch.randint(0, 256, (1, 3, 48, 80), dtype=torch.uint8)
    out = m.segment(img, ["background", "cat", "dog"])
    assert out.scores.shape == (1, 3, 48, 80) and torch.all(out.scores[:, 0] == 0.5)
    fg_max = out.scores[:, 1:].max(1).values
    assert torch.equal(out.labels == 0, fg_max <= 0.5)
    m.config.bg_threshold = 1.0  # every pixel below τ -> background
    assert int(m.segment(img, ["background", "cat"]).labels.max()) == 0
    no_bg = m.segment(img, ["cat", "dog"])
    assert torch.equal(no_bg.labels, no_bg.scores.argmax(1))
    five = make(clip, views=5).segment(img, ["background", "cat"])
    assert five.scores.shape == (1, 2, 48, 80) and not torch.allclose(five.scores, out.scores[:, :2])
    for bad in ([], ["background"], "cat"):
        with pytest.raises(ValueError, match="class_names"):
            m.segment(img, bad)
    with pytest.raises(ValueError, match="images"):
        m.segment(torch.zeros(1, 1, 8, 8, dtype=torch.uint8), ["cat"])
    with pytest.raises(TypeError, match="images"):
        m.segment(torch.zeros(1, 3, 8, 8), ["cat"])
    with pytest.raises(ValueError, match="images"):
        make(clip, views=5).segment(torch.zeros(1, 3, 1, 8, dtype=torch.uint8), ["cat"])
    with pytest.raises(ValueError, match="image_labels"):
        m.segment(img, ["background", "cat"], torch.ones(1, 3, dtype=torch.bool))


def test_segment_with_pamr_refines_the_fused_maps(clip):
    """pamr_iterations > 0: the fused class maps go through PAMR on the image before the background rule."""
    from weakseg.methods.common import PAMR

    img = torch.randint(0, 256, (2, 3, 40, 56), dtype=torch.uint8)
    names = ["background", "cat", "dog"]
    raw = make(clip, views=1).segment(img, names)
    out = make(clip, views=1, pamr_iterations=3, pamr_dilations=(1, 2)).segment(img, names)
    want = PAMR(3, (1, 2))(img.float() / 255, raw.scores[:, 1:])
    torch.testing.assert_close(out.scores[:, 1:], want, rtol=1e-5, atol=1e-6)
    assert torch.all(out.scores[:, 0] == 0.5) and torch.equal(out.labels == 0, want.max(1).values <= 0.5)


def test_config_errors(clip):
    with pytest.raises(ValueError, match="views"):
        SynSegConfig(views=3)
    with pytest.raises(ValueError, match="loss_weights"):
        SynSegConfig(loss_weights=(1, 1))
    with pytest.raises(ValueError, match="extract_layers"):
        make(clip, extract_layers=(0, 1, 7))
    with pytest.raises(ValueError, match="preset"):
        SynSegConfig.from_dict({"preset": "nope"})
    for bad in (-1, 2.5, True):
        with pytest.raises(ValueError, match="pamr_iterations"):
            SynSegConfig(pamr_iterations=bad)
    for bad in ((), (0, 1), (1.5,)):
        with pytest.raises(ValueError, match="pamr_dilations"):
            SynSegConfig(pamr_dilations=bad)
    with pytest.raises(FileNotFoundError, match="checkpoint"):
        make(clip, checkpoint="/nonexistent/model.safetensors")


def test_export_graphs_parity(clip):
    m = make(clip, views=1, templates="a photo of a {}.")
    g = m.export_graphs()
    names = ["cat", "dog", "red ball"]
    imgs = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    x = (imgs.float() / 255 - torch.tensor(g.mean).view(1, 3, 1, 1)) / torch.tensor(g.std).view(1, 3, 1, 1)
    text = g.text_embeddings(names)
    assert text.shape == (3, g.embed_dim) and torch.allclose(text, m.text_embeddings(names), atol=1e-6)
    with torch.no_grad():
        logits = g.image_model(x, text)
        one = g.image_model(x[:1], text[:1])
    assert logits.shape == (2, 3, 64, 64) and torch.allclose(one[0, 0], logits[0, 0], atol=1e-5)
    out = m.segment(imgs, ["background"] + names)
    assert torch.allclose(logits, out.scores[:, 1:], atol=1e-5)
    from weakseg.export import labels_from_logits

    lab = labels_from_logits(logits, g.background)
    assert (lab == out.labels).float().mean() > 0.999


# ------------------------------------------------------------------------------------------- training

def _toy(n):
    from weakseg.toy.world import ToyCaptions

    return ToyCaptions(num_scenes=n)


def test_training_loss_falls_and_the_model_loads(clip, tmp_path):
    from weakseg.toy.world import ToyWorld
    from weakseg.eval.metrics import ConfusionMatrix

    cfg = SynSegTrainConfig(iterations=40, batch_size=6, lr=3e-3, save_every=40, log_every=20, seed=0)
    m = make(clip)
    r = train_synseg(m, _toy(32), tmp_path, cfg, progress=False)
    first = np.mean([x["loss"] for x in r["losses"][:5]])
    last = np.mean([x["loss"] for x in r["losses"][-5:]])
    assert last < 0.8 * first, (first, last)
    assert r["model"] and (tmp_path / "log.jsonl").exists()
    trained = make(clip, checkpoint=r["model"], views=1)
    assert trained.trained_steps == 40
    w = ToyWorld(split="test", num_scenes=6)
    cm = ConfusionMatrix(len(w.class_names))
    for i in range(6):
        sc = w[i]
        lab = torch.zeros(1, len(w.class_names), dtype=torch.bool)
        lab[0, sc.image_labels] = True
        cm.update(trained.segment([sc.image], w.class_names, lab).labels[0], sc.label)
    assert 0 <= cm.miou("all") <= 1


def test_resume_equals_uninterrupted(clip, tmp_path):
    cfg = SynSegTrainConfig(iterations=6, batch_size=3, save_every=100, log_every=100, seed=3)
    full = train_synseg(make(clip), _toy(10), tmp_path / "a", cfg, progress=False)
    part = train_synseg(make(clip), _toy(10), tmp_path / "b", cfg, progress=False, stop_after=4)
    assert part["step"] == 4 and part["model"] is None
    rest = train_synseg(make(clip), _toy(10), tmp_path / "b", cfg, progress=False)
    assert rest["step"] == 6
    got = [x["loss"] for x in part["losses"] + rest["losses"]]
    want = [x["loss"] for x in full["losses"]]
    assert got == want  # bit-exact (tests/test_train_resume.py: a kill after a checkpoint)
    from weakseg.methods.synseg import read_head_file

    wa, _ = read_head_file(full["model"])
    wb, _ = read_head_file(rest["model"])
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    with pytest.raises(ValueError, match="architecture"):
        train_synseg(make(clip, reduce_dim=4), _toy(10), tmp_path / "b", SynSegTrainConfig(iterations=8),
                     progress=False)


def _head_file(clip, path, tamper=None):
    """A SynSeg head file for the tiny preset (a fresh head, as training writes it), ``tamper``ed."""
    from weakseg.io import save_safetensors
    from weakseg.methods.synseg import MODEL_FORMAT

    m = make(clip)
    tensors = {k: v.clone() for k, v in m.head.state_dict().items()}
    if tamper:
        tamper(tensors)
    save_safetensors(tensors, path, metadata={"format": MODEL_FORMAT, "arch": json.dumps(m.arch), "step": "3"})
    return path


@pytest.mark.parametrize("tamper, words", [
    (lambda t: t["film.mul.weight"].view(-1)[5].fill_(float("nan")), ["'film.mul.weight'", "NaN or Inf"]),
    (lambda t: t["blocks.0.linear1.bias"].fill_(float("inf")), ["'blocks.0.linear1.bias'", "NaN or Inf"]),
    (lambda t: t.update({"projector.weight": t["projector.weight"].double()}), ["'projector.weight'", "float64"]),
    (lambda t: t.update({"reduces.1.bias": t["reduces.1.bias"].to(torch.int64)}), ["'reduces.1.bias'", "int64"]),
    (lambda t: t.update({"reduces.0.weight": t["reduces.0.weight"][:, :-1].contiguous()}),
     ["'reduces.0.weight'", "shape"]),
    (lambda t: t.update({"film.mul.w": t.pop("film.mul.weight")}), ["lacks tensor(s) film.mul.weight", "film.mul.w"]),
    (lambda t: t.pop("upsample.bias"), ["lacks tensor(s) upsample.bias"]),
    (lambda t: t.update({"extra": torch.zeros(2)}), ["unexpected tensor(s) extra"]),
])
def test_corrupt_head_file_refused_naming_the_file(clip, tmp_path, tamper, words):
    from weakseg.core import WeightsFileError

    good = _head_file(clip, tmp_path / "good.safetensors")
    assert make(clip, checkpoint=str(good)).trained_steps == 3
    bad = _head_file(clip, tmp_path / "bad.safetensors", tamper)
    with pytest.raises(WeightsFileError) as e:
        make(clip, checkpoint=str(bad))
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"SynSegConfig.checkpoint: {str(bad)!r}")
    for w in words:
        assert w in msg, (w, msg)


def test_cli_corrupt_head_one_line(tmp_path, capsys):
    from weakseg.backbones.clip import CLIPBackbone
    from weakseg.cli import main

    bad = _head_file(CLIPBackbone.tiny(seed=0), tmp_path / "head.safetensors",
                     lambda t: t.update({"film.add.w": t.pop("film.add.weight")}))
    rc = main(["eval", "--method", "synseg", "--dataset", "toyworld", "--limit", "1", "--set", "preset=tiny", "views=1",
               f"checkpoint={bad}", "--out", str(tmp_path / "ev"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and str(bad) in err and "film.add.weight" in err, err


def test_train_config_and_data_errors(clip, tmp_path):
    with pytest.raises(ValueError, match="batch_size"):
        SynSegTrainConfig(batch_size=0)
    with pytest.raises(ValueError, match="num_workers: expected an int >= 0, got True"):
        SynSegTrainConfig(num_workers=True)
    with pytest.raises(ValueError, match="unknown"):
        SynSegTrainConfig.from_dict({"lrr": 1})
    with pytest.raises(ValueError, match="noun phrase"):
        train_synseg(make(clip), _toy(2), tmp_path, SynSegTrainConfig(iterations=1, exclusions=str(_excl(tmp_path))),
                     progress=False)
    assert lr_at(0, SynSegTrainConfig(iterations=10)) == pytest.approx(1e-3)
    assert lr_at(10, SynSegTrainConfig(iterations=10)) == pytest.approx(1e-4)
    img = torch.randint(0, 256, (3, 30, 50), dtype=torch.uint8)
    a = random_resized_crop(img, 16, generator=torch.Generator().manual_seed(0))
    b = random_resized_crop(img, 16, generator=torch.Generator().manual_seed(0))
    assert a.shape == (3, 16, 16) and a.dtype == torch.uint8 and torch.equal(a, b)


def _excl(tmp_path):
    p = tmp_path / "excl.txt"
    p.write_text("a\ne\ni\no\nu\n")  # every toy phrase has a vowel
    return p


# ------------------------------------------------------------------------------------------- data

def test_phrase_extractor_fallback_and_exclusions(tmp_path):
    from weakseg.data.phrases import NounPhraseExtractor, read_phrases_file, write_phrases_file

    n = NounPhraseExtractor("simple")
    assert n("a photo of a red circle, a blue star and a ring on grass") == ["red circle", "blue star", "ring",
                                                                             "grass"]
    assert n("Reflection of the mountain in a lake, background blurred") == ["mountain", "lake"]
    assert NounPhraseExtractor("simple", exclusions=())("a photo of a cat") == ["photo", "cat"]
    with pytest.raises(ValueError, match="backend"):
        NounPhraseExtractor("nltk")
    write_phrases_file(tmp_path / "p.jsonl", {"k1": ["cat", "dog"]})
    assert read_phrases_file(tmp_path / "p.jsonl") == {"k1": ["cat", "dog"]}


def _jpeg(seed):
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (20, 30, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def test_webdataset_shards_and_folder(tmp_path):
    from weakseg.data.captions import WebDatasetShards, open_caption_dataset

    shard = tmp_path / "shard-000.tar"
    with tarfile.open(shard, "w") as tf:
        for key, cap in (("s/0001", "a red ball"), ("s/0002", "two dogs"), ("s/0003", None)):
            for ext, data in (("png", _jpeg(len(key))), ("txt", cap.encode() if cap else None)):
                if data is None:
                    continue
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    ds = open_caption_dataset(tmp_path)
    assert isinstance(ds, WebDatasetShards) and len(ds) == 2 and ds.keys == ["s/0001", "s/0002"]
    s = ds[1]
    assert s.caption == "two dogs" and s.image.shape == (3, 20, 30) and s.image.dtype == torch.uint8
    folder = tmp_path / "f"
    folder.mkdir()
    (folder / "a.png").write_bytes(_jpeg(1))
    (folder / "a.txt").write_text("a cat on a sofa")
    (folder / "b.png").write_bytes(_jpeg(2))  # no caption: skipped
    f = open_caption_dataset(folder)
    assert len(f) == 1 and f[0].caption == "a cat on a sofa"
    with pytest.raises(FileNotFoundError, match="data"):
        open_caption_dataset(tmp_path / "missing")


# ------------------------------------------------------------------------------------------- CLI / demo

def test_cli_train_and_eval(tmp_path, capsys):
    from PIL import Image

    from weakseg.cli import main

    data = tmp_path / "pairs"
    data.mkdir()
    for i, cap in enumerate(["a red circle on grass", "a blue square and a green star on sand", "a ring"]):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(data / f"{i}.jpg")
        (data / f"{i}.txt").write_text(cap)
    run = tmp_path / "run"
    rc = main(["train", "synseg", "--data", str(data), "--out", str(run), "--set", "preset=tiny", "--train",
               "iterations=2", "batch_size=2", "--quiet"])
    assert rc == 0 and (run / "model.safetensors").exists()
    rep = json.loads(capsys.readouterr().out)
    assert rep["step"] == 2 and rep["images"] == 3
    ev = tmp_path / "eval"
    rc = main(["eval", "--method", "synseg", "--dataset", "toyworld", "--limit", "2", "--set", "preset=tiny",
               "views=1", f"checkpoint={run / 'model.safetensors'}", "--out", str(ev), "--quiet"])
    assert rc == 0 and json.loads((ev / "metrics.json").read_text())["num_images"] == 2
    capsys.readouterr()
    assert main(["train", "synseg", "--data", str(tmp_path / "none"), "--out", str(run), "--quiet"]) == 2
    assert "data" in capsys.readouterr().err


def test_toy_demo_and_ablation_with_tiny_clip(clip, tmp_path, monkeypatch):
    from weakseg.core import DemoEntry
    from weakseg.toy.synseg import ablation, toy_demo

    opts = dict(preset="tiny", train_options=dict(iterations=2, batch_size=2, save_every=2, log_every=1),
                train_scenes=4, train_crops=2, views=1)
    entry = toy_demo(tmp_path, progress=False, clip=clip, **opts)
    assert isinstance(entry, DemoEntry) and "patch-text" in entry.note
    assert entry.method.trained_steps == 2 and entry.baseline.config.mode == "patch"
    res = ablation(tmp_path / "abl", subsets={"all": (1, 1, 1, 1), "no fb": (1, 0, 1, 1)}, num_scenes=2, clip=clip,
                   preset="tiny", progress=False, train_options=opts["train_options"], train_scenes=4, train_crops=2, views=(1,))
    assert set(res) == {"patch baseline (views=1)", "untrained head (views=1)", "all (views=1)", "no fb (views=1)"}
    assert all(0 <= r["miou"] <= 100 for r in res.values())
    # without the committed toy CLIP the demo names the missing path
    import weakseg.toy as tw

    monkeypatch.setattr(tw, "WEIGHTS_DIR", tmp_path / "no_weights")
    with pytest.raises(FileNotFoundError, match="no_weights"):
        toy_demo(tmp_path / "x", progress=False)
