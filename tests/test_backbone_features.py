import math
import socket

import pytest
import torch
import torch.nn.functional as F
from _helpers import assert_raises_naming

from weakseg.backbones.features import (IMAGENET_MEAN, IMAGENET_STD, DenseFeatureExtractor, DINOv2Features,
                                        PatchFeatures, pad_to_patch_multiple, padded_size)
from weakseg.core import BACKBONES


@pytest.fixture(scope="module")
def tiny():
    return DINOv2Features.tiny(seed=0)


def _images(B, H, W, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (B, 3, H, W), generator=g, dtype=torch.uint8)


def _direct(model, images, p, pad="zero"):
    """The transformers model called by hand on the bottom/right padded, normalised tensor."""
    x = images.float() / 255
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    H, W = x.shape[-2:]
    ph, pw = (-H) % p, (-W) % p
    if pad == "zero":
        x = (F.pad(x, (0, pw, 0, ph), value=0.0) - mean) / std
    else:
        x = F.pad((x - mean) / std, (0, pw, 0, ph), value=0.0)
    with torch.no_grad():
        return model(pixel_values=x, output_hidden_states=True)


def test_registered_and_protocol(tiny):
    assert BACKBONES.get("dinov2") is DINOv2Features
    assert isinstance(tiny, DenseFeatureExtractor)
    assert tiny.patch_size == 14 and tiny.dim == 32
    assert tiny.device == torch.device("cpu") and tiny.dtype == torch.float32


@pytest.mark.parametrize("H,W", [(37, 50), (14, 14), (56, 56), (15, 29), (1, 1), (70, 13)])
def test_grid_and_padding(tiny, H, W):
    f = tiny(_images(2, H, W))
    h, w = math.ceil(H / 14), math.ceil(W / 14)
    assert f.tokens.shape == (2, 32, h, w)
    assert f.grid_size == (h, w) and f.dim == 32
    assert f.image_size == (H, W)
    assert f.padded_size == (14 * h, 14 * w) == padded_size(H, W, 14)
    assert f.padding == (0, 0, 14 * h - H, 14 * w - W)
    assert f.valid_grid().all()  # bottom/right padding never reaches a whole cell
    cov = f.coverage()
    assert cov[: H // 14, : W // 14].eq(1).all()
    torch.testing.assert_close(cov.sum() * 196, torch.tensor(float(H * W)))


def test_example_from_spec(tiny):
    f = tiny(_images(1, 37, 50))
    assert f.padded_size == (42, 56) and f.grid_size == (3, 4) and f.padding == (0, 0, 5, 6)
    assert padded_size(375, 500, 16) == (384, 512)


@pytest.mark.parametrize("pad", ["zero", "mean"])
def test_equals_transformers_model_on_padded_tensor(tiny, pad):
    model = DINOv2Features(tiny.model, pad=pad)
    images = _images(2, 37, 50, seed=1)
    f = model(images)
    out = _direct(tiny.model, images, 14, pad)
    ref = out.last_hidden_state[:, 1:].transpose(1, 2).reshape(2, 32, 3, 4)
    torch.testing.assert_close(f.tokens, ref, rtol=1e-5, atol=1e-5)
    # raw (not layer-normed) block output and an intermediate layer
    raw = DINOv2Features(tiny.model, pad=pad, layernorm=False)(images)
    torch.testing.assert_close(raw.tokens, out.hidden_states[-1][:, 1:].transpose(1, 2).reshape(2, 32, 3, 4),
                               rtol=1e-5, atol=1e-5)
    mid = DINOv2Features(tiny.model, pad=pad, layer=1)(images)
    ln = tiny.model.layernorm(out.hidden_states[1])
    torch.testing.assert_close(mid.tokens, ln[:, 1:].transpose(1, 2).reshape(2, 32, 3, 4), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(raw.tokens, f.tokens)


def test_pad_modes_differ_and_padding_matters(tiny):
    images = _images(1, 37, 50, seed=2)
    zero = DINOv2Features(tiny.model, pad="zero")(images).tokens
    mean = DINOv2Features(tiny.model, pad="mean")(images).tokens
    assert not torch.allclose(zero, mean)  # padding is seen by attention: documented
    # an image already on the grid is not padded: both modes agree
    on_grid = _images(1, 42, 56, seed=2)
    torch.testing.assert_close(DINOv2Features(tiny.model, pad="zero")(on_grid).tokens,
                               DINOv2Features(tiny.model, pad="mean")(on_grid).tokens)


def test_registers_are_dropped():
    m = DINOv2Features.tiny(seed=3, registers=4)
    assert type(m.model).__name__ == "Dinov2WithRegistersModel" and m.num_register_tokens == 4
    images = _images(1, 30, 45, seed=3)
    f = m(images)
    assert f.tokens.shape == (1, 32, 3, 4)
    out = _direct(m.model, images, 14)
    assert out.last_hidden_state.shape[1] == 1 + 4 + 12
    torch.testing.assert_close(f.tokens, out.last_hidden_state[:, 5:].transpose(1, 2).reshape(1, 32, 3, 4),
                               rtol=1e-5, atol=1e-5)


def test_list_input_and_batch_consistency(tiny):
    a, b, c = _images(1, 37, 50, 4)[0], _images(1, 20, 33, 5)[0], _images(1, 37, 50, 6)[0]
    both = tiny([a, c])
    assert both.tokens.shape == (2, 32, 3, 4)
    torch.testing.assert_close(both.tokens[0:1], tiny(a.unsqueeze(0)).tokens, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(both.tokens[1:2], tiny([c]).tokens, rtol=1e-5, atol=1e-5)
    assert_raises_naming(lambda: tiny([a, b]), ValueError, ["one size", "extract_list"])
    feats = tiny.extract_list([a, b, c])
    assert [f.image_size for f in feats] == [(37, 50), (20, 33), (37, 50)]
    assert [f.grid_size for f in feats] == [(3, 4), (2, 3), (3, 4)]
    assert feats[1].padding == (0, 0, 8, 9)
    torch.testing.assert_close(feats[1].tokens, tiny(b.unsqueeze(0)).tokens, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(feats[2].tokens, both.tokens[1:2], rtol=1e-5, atol=1e-5)


def test_bad_images(tiny):
    assert_raises_naming(lambda: tiny(torch.zeros(1, 3, 20, 20)), TypeError, ["uint8"])
    assert_raises_naming(lambda: tiny(torch.zeros(1, 4, 20, 20, dtype=torch.uint8)), ValueError, ["(3, H, W)"])
    assert_raises_naming(lambda: tiny([]), ValueError, ["at least one image"])
    assert_raises_naming(lambda: tiny(torch.zeros(1, 3, 0, 5, dtype=torch.uint8)), ValueError, ["0x5"])


def test_bad_options(tiny):
    assert_raises_naming(lambda: DINOv2Features(tiny.model, pad="reflect"), ValueError, ["pad", "reflect"])
    assert_raises_naming(lambda: DINOv2Features(tiny.model, layer=7), ValueError, ["layer", "7"])
    assert_raises_naming(lambda: DINOv2Features(torch.nn.Linear(2, 2)), TypeError, ["Dinov2Model", "Linear"])


def test_patch_features_helpers():
    tokens = torch.arange(2 * 3 * 4, dtype=torch.float32).view(1, 2, 3, 4)
    f = PatchFeatures(tokens, 4, (10, 13), (12, 16), (0, 0, 2, 3))
    px = f.to_pixels()
    assert px.shape == (1, 2, 10, 13)
    assert px[0, 0, 0, 0] == tokens[0, 0, 0, 0] and px[0, 0, 9, 12] == tokens[0, 0, 2, 3]
    assert px[0, 1, 4, 8] == tokens[0, 1, 1, 2]
    assert f.to_pixels("bilinear").shape == (1, 2, 10, 13)
    torch.testing.assert_close(f.flatten()[0, 5], tokens[0, :, 1, 1])
    cov = f.coverage()
    torch.testing.assert_close(cov[2], torch.tensor([0.5, 0.5, 0.5, 0.125]))
    valid = PatchFeatures(torch.zeros(1, 1, 3, 3), 4, (5, 5), (12, 12), (0, 0, 7, 7)).valid_grid()
    assert valid.tolist() == [[True, True, False], [True, True, False], [False, False, False]]
    assert_raises_naming(lambda: PatchFeatures(tokens, 4, (10, 13), (12, 12), (0, 0, 2, 3)), ValueError,
                         ["padded_size", "patch_size"])
    assert_raises_naming(lambda: PatchFeatures(tokens, 4, (10, 13), (12, 16), (0, 0, 1, 3)), ValueError,
                         ["padding", "image_size"])
    assert_raises_naming(lambda: f.to_pixels("cubic"), ValueError, ["mode"])
    x, padding = pad_to_patch_multiple(torch.ones(1, 3, 5, 9), 4, value=-1.0)
    assert x.shape == (1, 3, 8, 12) and padding == (0, 0, 3, 3)
    assert x[..., 5:, :].eq(-1).all() and x[..., :5, 9:].eq(-1).all() and x[..., :5, :9].eq(1).all()


def test_save_load_round_trip_offline(tiny, tmp_path, monkeypatch):
    tiny.save_pretrained(tmp_path / "dino")
    images = _images(1, 33, 47, seed=7)
    ref = tiny(images).tokens

    def no_network(*args, **kwargs):
        raise OSError("network access during a local load")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    loaded = DINOv2Features.from_pretrained(str(tmp_path / "dino"))
    assert isinstance(loaded, DINOv2Features) and loaded.patch_size == 14 and loaded.dim == 32
    torch.testing.assert_close(loaded(images).tokens, ref)
    reg = DINOv2Features.tiny(seed=1, registers=2)
    reg.save_pretrained(tmp_path / "reg")
    assert DINOv2Features.from_pretrained(tmp_path / "reg").num_register_tokens == 2
    assert not any(p.suffix in (".bin", ".pt", ".pth") for p in (tmp_path / "dino").iterdir())


def test_wrong_paths(tiny, tmp_path):
    missing = tmp_path / "nope"
    assert_raises_naming(lambda: DINOv2Features.from_pretrained(str(missing)), FileNotFoundError,
                         [str(missing), "does not exist"])
    (tmp_path / "empty").mkdir()
    assert_raises_naming(lambda: DINOv2Features.from_pretrained(str(tmp_path / "empty")), FileNotFoundError,
                         [str(tmp_path / "empty"), "config.json"])
    (tmp_path / "file.bin").write_bytes(b"x")
    assert_raises_naming(lambda: DINOv2Features.from_pretrained(str(tmp_path / "file.bin")), NotADirectoryError,
                         ["file.bin", "directory"])
    from transformers import ViTConfig, ViTModel
    ViTModel(ViTConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8,
                       image_size=16, patch_size=8)).save_pretrained(tmp_path / "vit")
    assert_raises_naming(lambda: DINOv2Features.from_pretrained(str(tmp_path / "vit")), ValueError,
                         ["'vit'", "dinov2"])


def test_tiny_is_deterministic():
    a, b = DINOv2Features.tiny(seed=5), DINOv2Features.tiny(seed=5)
    c = DINOv2Features.tiny(seed=6)
    images = _images(1, 28, 28)
    torch.testing.assert_close(a(images).tokens, b(images).tokens)
    assert not torch.allclose(a(images).tokens, c(images).tokens)


def test_clip_dense_features_pad_and_match_the_clip_forward():
    from weakseg.backbones.features import CLIPDenseFeatures

    ext = CLIPDenseFeatures.tiny(seed=0)
    img = torch.randint(0, 256, (2, 3, 37, 50), dtype=torch.uint8)
    feats = ext(img)
    p = ext.patch_size
    assert feats.grid_size == ((37 + p - 1) // p, (50 + p - 1) // p)
    assert feats.padding == (0, 0, feats.padded_size[0] - 37, feats.padded_size[1] - 50)
    assert feats.tokens.shape == (2, ext.dim) + feats.grid_size
    padded = torch.zeros(2, 3, *feats.padded_size, dtype=torch.uint8)
    padded[..., :37, :50] = img
    want = ext.clip(padded).patch.permute(0, 3, 1, 2)
    torch.testing.assert_close(feats.tokens, want)
    surg = CLIPDenseFeatures(ext.clip, surgery_layers=1)(img)
    assert not torch.allclose(surg.tokens, feats.tokens)
    with pytest.raises(ValueError, match="one size"):
        ext([img[0], img[1, :, :30]])
