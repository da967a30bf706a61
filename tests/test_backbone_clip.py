"""CLIPBackbone (weakseg.backbones.clip): open_clip parity, dense features, attention, surgery + bias,
text embeddings, save/load. Tiny random-weight models only; no network."""

import copy
import json
import socket

import open_clip
import pytest
import torch
import torch.nn.functional as F
from _helpers import assert_raises_naming

from weakseg.backbones import text as T
from weakseg.backbones.clip import CLIPBackbone, CLIPOutput, ClassEmbeddings, interpolate_pos_embed
from weakseg.core import BACKBONES


@pytest.fixture(scope="module")
def bb():
    return CLIPBackbone.tiny(seed=0)


@pytest.fixture(scope="module")
def bb_ls():
    # Layer scale and QuickGELU on, a non-square native grid (6x8 patches of 8).
    return CLIPBackbone.tiny(seed=1, image_size=(48, 64), ls_init_value=0.1, quick_gelu=True, layers=2)


def _images(b=2, h=64, w=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, 3, h, w), dtype=torch.uint8, generator=g)


# ----------------------------------------------------------------------------- float64 oracle
def _ln64(mod, x):
    return F.layer_norm(x, mod.normalized_shape, mod.weight.double(), mod.bias.double(), mod.eps)


def _embed(bb, images):
    """The tokens entering block 0, computed with open_clip's modules at the native size."""
    vis = bb.model.visual
    with torch.no_grad():
        t = vis.conv1(bb.preprocess(images)).flatten(2).transpose(1, 2)
        t = torch.cat([vis.class_embedding.expand(t.shape[0], 1, -1), t], 1) + vis.positional_embedding
        return vis.ln_pre(t)


def _surgery_reference(bb, images, layers_plain, n_surgery, bias=None):
    """Float64 recomputation of the surgery path from the original-path block outputs, head by head
    with explicit loops: returns the dense features (B, hw, D)."""
    vis = bb.model.visual
    blocks = vis.transformer.resblocks
    L = len(blocks)
    first = L - n_surgery
    x_in = [_embed(bb, images)] + [t for t in layers_plain]  # x_in[i] = input of block i
    x_in = [t.double() for t in x_in]
    x_new = x_in[first].clone()
    for i in range(first, L):
        blk = blocks[i]
        h = _ln64(blk.ln_1, x_in[i])
        E = h.shape[-1]
        Wq, Wk, Wv = blk.attn.in_proj_weight.double().split(E)
        bq, bk, bv = blk.attn.in_proj_bias.double().split(E)
        q, k, v = h @ Wq.T + bq, h @ Wk.T + bk, h @ Wv.T + bv
        H = blk.attn.num_heads
        d = E // H
        s = d ** -0.5
        B, N, _ = h.shape
        M = torch.zeros(B, N, N, dtype=torch.float64)
        for hd in range(H):
            qh, kh = q[..., hd * d:(hd + 1) * d], k[..., hd * d:(hd + 1) * d]
            S = torch.softmax(s * qh @ qh.transpose(1, 2), -1) + 2 * torch.softmax(s * kh @ kh.transpose(1, 2), -1)
            if bias is not None:
                S[:, 1:, 1:] = S[:, 1:, 1:] + bias.double()
            M += S
        heads_out = [M @ v[..., hd * d:(hd + 1) * d] for hd in range(H)]
        o = torch.cat(heads_out, -1) @ blk.attn.out_proj.weight.double().T + blk.attn.out_proj.bias.double()
        gamma = blk.ls_1.gamma.double() if hasattr(blk.ls_1, "gamma") else 1.0
        x_new = x_new + gamma * o
    return _ln64(vis.ln_post, x_new[:, 1:]) @ vis.proj.double()


# ----------------------------------------------------------------------------- basics
def test_registered_and_properties(bb):
    assert BACKBONES.get("clip") is CLIPBackbone
    assert bb.device == torch.device("cpu") and bb.dtype == torch.float32
    assert bb.patch_size == (8, 8) and bb.native_grid == (8, 8)
    assert (bb.embed_dim, bb.width, bb.num_layers, bb.num_heads) == (32, 64, 3, 4)


def test_tiny_is_deterministic_and_leaves_global_rng():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a = CLIPBackbone.tiny(seed=5, layers=1, text_layers=1)
    after = torch.rand(3)
    assert torch.equal(after, expected)
    b = CLIPBackbone.tiny(seed=5, layers=1, text_layers=1)
    c = CLIPBackbone.tiny(seed=6, layers=1, text_layers=1)
    sa, sb, sc = a.model.state_dict(), b.model.state_dict(), c.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["visual.proj"], sc["visual.proj"])


def test_output_shapes_and_dtypes(bb):
    im = _images(2)
    o = bb(im, return_attn=True, return_layers=True)
    assert isinstance(o, CLIPOutput)
    assert o.cls.shape == (2, 32) and o.cls.dtype == torch.float32
    assert o.patch.shape == (2, 8, 8, 32) and o.patch.dtype == torch.float32
    assert o.grid == (8, 8)
    assert len(o.attn) == 3 and all(a.shape == (2, 4, 65, 65) and a.dtype == torch.float32 for a in o.attn)
    assert len(o.layers) == 3 and all(t.shape == (2, 65, 64) and t.dtype == torch.float32 for t in o.layers)
    assert o.surgery_attn is None
    plain = bb(im)
    assert plain.attn is None and plain.layers is None and plain.surgery_attn is None
    torch.testing.assert_close(plain.patch, o.patch, rtol=1e-5, atol=1e-5)  # SDPA vs explicit softmax
    s = bb(im, surgery_layers=2, return_attn=True)
    assert len(s.surgery_attn) == 2 and all(m.shape == (2, 65, 65) for m in s.surgery_attn)
    # A list of (3, H, W) images is accepted too.
    torch.testing.assert_close(bb(list(im)).cls, plain.cls)


def test_attention_rows_sum_to_one(bb):
    o = bb(_images(2), return_attn=True, surgery_layers=1)
    for a in o.attn:
        assert (a >= 0).all()
        torch.testing.assert_close(a.sum(-1), torch.ones(a.shape[:-1]), rtol=0, atol=1e-5)
    # Surgery matrix without bias: each head contributes 1 + 2 per row.
    torch.testing.assert_close(o.surgery_attn[0].sum(-1), torch.full((2, 65), 12.0), rtol=0, atol=1e-4)


@pytest.mark.parametrize("which", ["bb", "bb_ls"])
def test_plain_forward_matches_open_clip(which, request):
    b = request.getfixturevalue(which)
    H, W = b.model.visual.image_size
    im = _images(2, H, W, seed=3)
    o = b(im, return_layers=True)
    x = b.preprocess(im)
    vis = b.model.visual
    with torch.no_grad():
        torch.testing.assert_close(o.cls, b.model.encode_image(x), rtol=0, atol=1e-5)
        # open_clip's own token output (ln_post applied, not projected) and per-block outputs.
        captured = []
        hooks = [blk.register_forward_hook(lambda m, i, out: captured.append(out)) for blk in vis.transformer.resblocks]
        vis.output_tokens = True
        try:
            pooled, tokens = vis(x)
        finally:
            vis.output_tokens = False
            for hk in hooks:
                hk.remove()
    gh, gw = vis.grid_size
    torch.testing.assert_close(o.patch, (tokens @ vis.proj).reshape(2, gh, gw, -1), rtol=0, atol=1e-5)
    assert len(captured) == len(o.layers)
    for mine, theirs in zip(o.layers, captured):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- resolution / position embedding
def test_interpolate_pos_embed():
    pos = torch.randn(1 + 16, 6)
    assert interpolate_pos_embed(pos, (4, 4)) is pos
    out = interpolate_pos_embed(pos, (3, 5), mode="bilinear")
    assert out.shape == (16, 6)
    assert torch.equal(out[0], pos[0])
    manual = F.interpolate(pos[1:].reshape(1, 4, 4, 6).permute(0, 3, 1, 2), size=(3, 5), mode="bilinear",
                           align_corners=False).permute(0, 2, 3, 1).reshape(15, 6)
    torch.testing.assert_close(out[1:], manual)
    const = torch.cat([pos[:1], torch.full((16, 6), 0.25)])
    for mode in ("bicubic", "bilinear", "nearest"):
        torch.testing.assert_close(interpolate_pos_embed(const, (7, 3), mode=mode)[1:], torch.full((21, 6), 0.25))
    assert not torch.allclose(interpolate_pos_embed(pos, (6, 6), mode="bicubic"),
                              interpolate_pos_embed(pos, (6, 6), mode="bilinear"))
    # Non-square source grid.
    pos2 = torch.randn(1 + 6, 2)
    assert interpolate_pos_embed(pos2, (4, 6), src_grid=(2, 3)).shape == (25, 2)
    assert_raises_naming(lambda: interpolate_pos_embed(pos2, (4, 4)), ValueError, ["src_grid"])
    assert_raises_naming(lambda: interpolate_pos_embed(pos, (4, 4), mode="area"), ValueError, ["mode", "area"])
    assert_raises_naming(lambda: interpolate_pos_embed(pos[0], (4, 4)), ValueError, ["pos"])


@pytest.mark.parametrize("mode", ["bicubic", "bilinear"])
def test_non_square_non_native_size(bb, mode):
    im = _images(2, 48, 80, seed=4)
    o = bb(im, return_layers=True, pos_interp=mode)
    assert o.grid == (6, 10) and o.patch.shape == (2, 6, 10, 32)
    assert o.layers[0].shape == (2, 61, 64)
    # open_clip's own forward with the position embedding replaced by the interpolated one.
    ref = copy.deepcopy(bb.model)
    vis = ref.visual
    vis.positional_embedding = torch.nn.Parameter(
        interpolate_pos_embed(vis.positional_embedding.data, (6, 10), mode=mode, src_grid=(8, 8)))
    vis.output_tokens = True
    with torch.no_grad():
        pooled, tokens = vis(bb.preprocess(im))
    torch.testing.assert_close(o.cls, pooled, rtol=0, atol=1e-5)
    torch.testing.assert_close(o.patch, (tokens @ vis.proj).reshape(2, 6, 10, -1), rtol=0, atol=1e-5)


def test_pos_interp_default_and_option(bb):
    im = _images(1, 48, 80)
    default = bb(im)
    assert bb.pos_interp == "bicubic"
    torch.testing.assert_close(default.patch, bb(im, pos_interp="bicubic").patch, rtol=0, atol=0)
    assert not torch.allclose(default.patch, bb(im, pos_interp="bilinear").patch)
    # At the native grid the option has no effect.
    nat = _images(1)
    torch.testing.assert_close(bb(nat, pos_interp="bilinear").patch, bb(nat).patch, rtol=0, atol=0)


def test_resize_with_size(bb):
    im = _images(1, 50, 70)
    o = bb(im, size=(48, 80))
    assert o.grid == (6, 10)
    o2 = bb(im, size=64)
    assert o2.grid == (8, 8)
    # Images of different sizes in a list need size=.
    mixed = [_images(1, 40, 40)[0], _images(1, 56, 72)[0]]
    assert bb(mixed, size=64).patch.shape == (2, 8, 8, 32)
    assert_raises_naming(lambda: bb(mixed), ValueError, ["size"])


# ----------------------------------------------------------------------------- surgery and bias
def test_surgery_changes_only_patch_features(bb):
    im = _images(2, seed=7)
    plain = bb(im, return_attn=True, return_layers=True)
    for n in (1, 2, 3):
        s = bb(im, surgery_layers=n, return_attn=True, return_layers=True)
        torch.testing.assert_close(s.cls, plain.cls, rtol=0, atol=0)
        for a, b in zip(s.attn, plain.attn):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        for a, b in zip(s.layers, plain.layers):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        assert (s.patch - plain.patch).abs().max() > 1e-3


@pytest.mark.parametrize("which,n", [("bb", 1), ("bb", 3), ("bb_ls", 1), ("bb_ls", 2)])
def test_surgery_matches_float64_recomputation(which, n, request):
    b = request.getfixturevalue(which)
    H, W = b.model.visual.image_size
    im = _images(2, H, W, seed=8)
    plain = b(im, return_layers=True)
    s = b(im, surgery_layers=n)
    ref = _surgery_reference(b, im, plain.layers, n)
    torch.testing.assert_close(s.patch.reshape(2, -1, s.patch.shape[-1]).double(), ref, rtol=1e-4, atol=1e-4)


def test_bias_changes_exactly_the_surgery_path(bb):
    im = _images(2, seed=9)
    n = 64
    s0 = bb(im, surgery_layers=2, return_attn=True)
    zero = bb(im, surgery_layers=2, attn_bias=torch.zeros(2, n, n), return_attn=True)
    torch.testing.assert_close(zero.patch, s0.patch, rtol=0, atol=0)
    torch.testing.assert_close(zero.cls, s0.cls, rtol=0, atol=0)
    g = torch.Generator().manual_seed(0)
    bias = torch.rand(2, n, n, generator=g) / n
    sb = bb(im, surgery_layers=2, attn_bias=bias, return_attn=True)
    torch.testing.assert_close(sb.cls, s0.cls, rtol=0, atol=0)
    for a, b in zip(sb.attn, s0.attn):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert (sb.patch - s0.patch).abs().max() > 1e-3
    # The surgery matrix moves by heads * bias on the patch-patch block only (linear in the bias).
    for mb, m0 in zip(sb.surgery_attn, s0.surgery_attn):
        d = mb - m0
        torch.testing.assert_close(d[:, 1:, 1:], 4 * bias, rtol=0, atol=1e-5)
        assert d[:, 0].abs().max() == 0 and d[:, :, 0].abs().max() == 0
    # (B, 1, hw, hw) is the same bias.
    torch.testing.assert_close(bb(im, surgery_layers=2, attn_bias=bias[:, None], return_attn=True).patch, sb.patch,
                               rtol=0, atol=0)


@pytest.mark.parametrize("n", [1, 3])
def test_bias_matches_float64_recomputation_and_is_linear(bb, n):
    im = _images(2, seed=10)
    plain = bb(im, return_layers=True)
    g = torch.Generator().manual_seed(1)
    bias = torch.randn(2, 64, 64, generator=g) * 0.05
    s = bb(im, surgery_layers=n, attn_bias=bias)
    ref = _surgery_reference(bb, im, plain.layers, n, bias=bias)
    torch.testing.assert_close(s.patch.reshape(2, 64, -1).double(), ref, rtol=1e-4, atol=1e-4)

    # Before ln_post the new path moves by the sum over surgery blocks of
    # out_proj.weight @ (heads * [0 0; 0 bias] @ v_h): linear in the bias, with v from the original path.
    # Read the pre-LN tokens off a copy whose ln_post is the identity and whose projection is I.
    lin = copy.deepcopy(bb).double()
    lin.model.visual.ln_post = torch.nn.Identity()
    lin.model.visual.proj = torch.nn.Parameter(torch.eye(64, dtype=torch.float64))
    b64 = bias.double()
    p0 = lin(im, surgery_layers=n).patch
    p1 = lin(im, surgery_layers=n, attn_bias=b64).patch - p0
    p2 = lin(im, surgery_layers=n, attn_bias=2 * b64).patch - p0
    torch.testing.assert_close(p2, 2 * p1, rtol=1e-9, atol=1e-10)
    layers = lin(im, return_layers=True).layers
    blocks = lin.model.visual.transformer.resblocks
    expected = torch.zeros(2, 65, 64, dtype=torch.float64)
    for i in range(len(blocks) - n, len(blocks)):
        blk = blocks[i]
        h = _ln64(blk.ln_1, layers[i - 1] if i else _embed(lin, im))
        v = h @ blk.attn.in_proj_weight[128:].T + blk.attn.in_proj_bias[128:]
        mixed = blk.attn.num_heads * F.pad(b64, (1, 0, 1, 0)) @ v  # every head: bias @ v_h, heads summed
        expected += mixed @ blk.attn.out_proj.weight.T
    torch.testing.assert_close(p1.reshape(2, 64, 64), expected[:, 1:], rtol=1e-9, atol=1e-10)


def test_bias_and_surgery_errors(bb):
    im = _images(2)
    assert_raises_naming(lambda: bb(im, attn_bias=torch.zeros(2, 64, 64)), ValueError, ["attn_bias", "surgery_layers"])
    assert_raises_naming(lambda: bb(im, surgery_layers=1, attn_bias=torch.zeros(2, 63, 63)), ValueError,
                         ["attn_bias", "(2, 64, 64)", "(2, 63, 63)"])
    assert_raises_naming(lambda: bb(im, surgery_layers=1, attn_bias=torch.zeros(1, 64, 64)), ValueError, ["attn_bias"])
    assert_raises_naming(lambda: bb(im, surgery_layers=1, attn_bias=torch.zeros(2, 64, 64, dtype=torch.long)),
                         TypeError, ["attn_bias"])
    assert_raises_naming(lambda: bb(im, surgery_layers=4), ValueError, ["surgery_layers", "[0, 3]"])
    assert_raises_naming(lambda: bb(im, surgery_layers=-1), ValueError, ["surgery_layers"])


# ----------------------------------------------------------------------------- bad images
def test_bad_images(bb):
    assert_raises_naming(lambda: bb(torch.rand(1, 3, 64, 64)), TypeError, ["uint8", "float32"])
    assert_raises_naming(lambda: bb(torch.zeros(1, 1, 64, 64, dtype=torch.uint8)), ValueError, ["(3, H, W)", "(1, 64, 64)"])
    assert_raises_naming(lambda: bb(torch.zeros(64, 64, dtype=torch.uint8)), ValueError, ["(3, H, W)"])
    assert_raises_naming(lambda: bb(_images(1, 50, 64)), ValueError, ["50x64", "patch size 8x8"])
    assert_raises_naming(lambda: bb(_images(1, 64, 64), size=(60, 64)), ValueError, ["60x64", "8x8"])
    assert_raises_naming(lambda: bb(_images(1), size=(0, 64)), ValueError, ["size"])
    assert_raises_naming(lambda: bb(_images(1), pos_interp="area"), ValueError, ["mode", "area"])


# ----------------------------------------------------------------------------- text
def test_encode_text_matches_open_clip(bb):
    texts = ["a photo of a cat.", "a clean origami person with clothes,people,human.", ""]
    mine = bb.encode_text(texts)
    with torch.no_grad():
        ref = bb.model.encode_text(open_clip.tokenize(texts), normalize=True)
    assert mine.shape == (3, 32)
    torch.testing.assert_close(mine, ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(mine.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(bb.encode_text(texts, batch_size=2), mine, rtol=0, atol=1e-6)
    assert bb.encode_text([]).shape == (0, 32)
    assert_raises_naming(lambda: bb.encode_text("cat"), TypeError, ["list of strings"])


def test_templates_single_and_ensemble(bb):
    ens = T.ensemble_templates()
    assert len(ens) == 80 and all(t.count("{}") == 1 for t in ens)
    assert ens[0] == "a bad photo of a {}."
    names = ["cat", "dog", "potted plant"]
    single = bb.class_embeddings(names, "single")
    ensemble = bb.class_embeddings(names, "ensemble")
    for ce in (single, ensemble):
        assert isinstance(ce, ClassEmbeddings)
        assert ce.embeddings.shape == (3, 32) and ce.names == names
        torch.testing.assert_close(ce.embeddings.norm(dim=-1), torch.ones(3))
        assert ce.num_classes == 3 and ce.num_background == 0 and not ce.is_background.any()
    torch.testing.assert_close(single.embeddings, bb.encode_text([f"a photo of a {n}." for n in names]))
    # The ensemble row: normalise each prompt, average, renormalise.
    e = bb.encode_text([t.replace("{}", "dog") for t in ens])
    torch.testing.assert_close(ensemble.embeddings[1], F.normalize(e.mean(0), dim=0), rtol=0, atol=1e-6)
    # A template string, a list, DiCLIP's "origami".
    torch.testing.assert_close(bb.class_embeddings(["cat"], "a clean origami {}.").embeddings,
                               bb.encode_text(["a clean origami cat."]))
    torch.testing.assert_close(bb.class_embeddings(["cat"], "origami").embeddings,
                               bb.encode_text(["a clean origami cat."]))
    two = bb.class_embeddings(["cat"], ["a {}.", "the {}!"]).embeddings[0]
    torch.testing.assert_close(two, F.normalize(bb.encode_text(["a cat.", "the cat!"]).mean(0), dim=0))


def test_synonyms_and_background_rows(bb):
    tmpl = ["a photo of a {}.", "itap of a {}."]
    ce = bb.class_embeddings(["person with clothes,people,human", ["bird", "avian"], "car"], tmpl,
                             background_words=["sky", "grass , lawn"])
    assert ce.embeddings.shape == (5, 32)
    assert ce.is_background.tolist() == [False, False, False, True, True]
    assert ce.num_classes == 3 and ce.num_background == 2
    assert ce.names == ["person with clothes,people,human", "bird,avian", "car", "sky", "grass , lawn"]
    torch.testing.assert_close(ce.classes, ce.embeddings[:3])
    torch.testing.assert_close(ce.background, ce.embeddings[3:])
    prompts = [t.replace("{}", s) for s in ("person with clothes", "people", "human") for t in tmpl]
    torch.testing.assert_close(ce.embeddings[0], F.normalize(bb.encode_text(prompts).mean(0), dim=0), rtol=0, atol=1e-6)
    prompts = [t.replace("{}", s) for s in ("grass", "lawn") for t in tmpl]
    torch.testing.assert_close(ce.embeddings[4], F.normalize(bb.encode_text(prompts).mean(0), dim=0), rtol=0, atol=1e-6)
    # "bird,avian" as a string equals the list form.
    torch.testing.assert_close(bb.class_embeddings(["bird,avian"], tmpl).embeddings[0], ce.embeddings[1])
    # synonym_sep=None keeps the name verbatim (DiCLIP's reference behaviour).
    verb = bb.class_embeddings(["person with clothes,people,human"], "origami", synonym_sep=None)
    torch.testing.assert_close(verb.embeddings[0], bb.encode_text(["a clean origami person with clothes,people,human."])[0])
    assert not torch.allclose(verb.embeddings[0], bb.class_embeddings(["person with clothes,people,human"],
                                                                       "origami").embeddings[0])


def test_named_sets_and_template_errors(bb):
    from weakseg.data.classnames import VOC_CLASSES
    from weakseg.methods.diclip.prompts import DICLIP_BACKGROUND_WORDS, DICLIP_TEMPLATE, DICLIP_VOC20

    assert len(VOC_CLASSES[1:]) == 20 and len(DICLIP_VOC20) == 20 and len(DICLIP_BACKGROUND_WORDS) == 25
    assert len(set(DICLIP_BACKGROUND_WORDS)) == 25
    assert T.resolve_templates("origami") == [DICLIP_TEMPLATE] == ["a clean origami {}."]
    assert T.resolve_templates("single") == ["a photo of a {}."]
    ce = bb.class_embeddings(DICLIP_VOC20, DICLIP_TEMPLATE, background_words=DICLIP_BACKGROUND_WORDS,
                             synonym_sep=None)
    assert ce.embeddings.shape == (45, 32) and ce.num_classes == 20 and ce.num_background == 25
    assert_raises_naming(lambda: bb.class_embeddings(["cat"], "a photo"), ValueError, ["{}", "a photo"])
    assert_raises_naming(lambda: bb.class_embeddings(["cat"], []), ValueError, ["templates"])
    assert_raises_naming(lambda: bb.class_embeddings(["cat"], 3), TypeError, ["templates"])
    assert_raises_naming(lambda: bb.class_embeddings("cat"), TypeError, ["class_names"])
    assert_raises_naming(lambda: bb.class_embeddings([]), ValueError, ["class_names"])
    assert_raises_naming(lambda: bb.class_embeddings([" , "]), ValueError, ["class_names"])
    assert_raises_naming(lambda: bb.class_embeddings(["cat"], background_words="sky"), TypeError, ["background_words"])
    assert_raises_naming(lambda: bb.class_embeddings([3]), TypeError, ["class_names"])


# ----------------------------------------------------------------------------- save / load
def test_save_load_round_trip_offline(bb_ls, tmp_path, monkeypatch):
    b = CLIPBackbone.tiny(seed=2, layers=2, pos_interp="bilinear")
    b.save_pretrained(tmp_path / "m")
    files = sorted(p.name for p in (tmp_path / "m").iterdir())
    assert files == ["open_clip_config.json", "open_clip_model.safetensors"]
    cfg = json.loads((tmp_path / "m" / "open_clip_config.json").read_text())
    assert cfg["model_cfg"]["vision_cfg"]["patch_size"] == 8 and cfg["weakseg"]["pos_interp"] == "bilinear"

    def no_network(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket.socket, "connect_ex", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    loaded = CLIPBackbone.from_pretrained(str(tmp_path / "m"))
    assert loaded.pos_interp == "bilinear"
    also = CLIPBackbone.from_pretrained(f"local-dir:{tmp_path / 'm'}")
    im = _images(2, 48, 80, seed=11)
    bias = torch.rand(2, 60, 60) * 0.01
    for other in (loaded, also):
        a = b(im, surgery_layers=1, attn_bias=bias, return_attn=True, return_layers=True)
        c = other(im, surgery_layers=1, attn_bias=bias, return_attn=True, return_layers=True)
        assert torch.equal(a.cls, c.cls) and torch.equal(a.patch, c.patch)
        assert all(torch.equal(x, y) for x, y in zip(a.attn + a.layers, c.attn + c.layers))
        names = ["cat", "person,people"]
        assert torch.equal(b.class_embeddings(names).embeddings, other.class_embeddings(names).embeddings)
    # Layer scale, QuickGELU and a non-square native grid survive the round trip.
    bb_ls.save_pretrained(tmp_path / "ls")
    r = CLIPBackbone.from_pretrained(tmp_path / "ls")
    im = _images(1, 48, 64)
    assert torch.equal(r(im, surgery_layers=1).patch, bb_ls(im, surgery_layers=1).patch)
    assert torch.equal(r(im).cls, bb_ls(im).cls)


def test_conv_stem_round_trip_and_matches_open_clip(tmp_path):
    """A ConvStem patchify (the toy CLIP's) keeps every token path: the block-by-block forward equals
    open_clip's encode_image, surgery runs, and save/load restores it exactly."""
    from weakseg.backbones.clip import ConvStem

    b = CLIPBackbone.tiny(seed=3, layers=2, conv_stem=[8, 16, 16])
    assert isinstance(b.model.visual.conv1, ConvStem) and b.conv_stem == [8, 16, 16]
    assert CLIPBackbone.tiny(seed=3, layers=2).conv_stem is None
    im = _images(2, 64, 64, seed=5)
    with torch.no_grad():
        ref = b.model.encode_image(b.preprocess(im))
    out = b(im, surgery_layers=1)
    torch.testing.assert_close(out.cls, ref, rtol=1e-4, atol=1e-5)
    assert out.patch.shape == (2, 8, 8, b.model.visual.proj.shape[1])
    b.save_pretrained(tmp_path / "stem")
    cfg = json.loads((tmp_path / "stem" / "open_clip_config.json").read_text())
    assert cfg["weakseg"]["conv_stem"] == [8, 16, 16] and "conv_stem" not in json.dumps(cfg["model_cfg"])
    r = CLIPBackbone.from_pretrained(tmp_path / "stem")
    assert r.conv_stem == [8, 16, 16]
    assert torch.equal(r(im, surgery_layers=1).patch, out.patch) and torch.equal(r(im).cls, b(im).cls)
    # a stem whose stride is not the patch size, and bad channel lists, are refused
    with pytest.raises(ValueError, match="patch size"):
        CLIPBackbone.tiny(seed=0, layers=1, conv_stem=[8, 8])
    with pytest.raises(ValueError, match="channels"):
        CLIPBackbone.tiny(seed=0, layers=1, conv_stem=[])
    # weights that do not fit the stem config are reported with the folder
    cfg["weakseg"]["conv_stem"] = [8, 16, 32]
    (tmp_path / "stem" / "open_clip_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="does not fit"):
        CLIPBackbone.from_pretrained(tmp_path / "stem")


def test_from_pretrained_dtype_and_device(bb, tmp_path):
    bb.save_pretrained(tmp_path)
    b64 = CLIPBackbone.from_pretrained(str(tmp_path), dtype=torch.float64)
    assert b64.dtype == torch.float64 and b64.device == torch.device("cpu")
    im = _images(1)
    o = b64(im, surgery_layers=1)
    assert o.patch.dtype == torch.float64
    torch.testing.assert_close(o.patch.float(), bb(im, surgery_layers=1).patch, rtol=1e-4, atol=1e-4)
    assert b64.encode_text(["cat"]).dtype == torch.float64


def test_from_pretrained_errors(tmp_path):
    missing = tmp_path / "nowhere"
    assert_raises_naming(lambda: CLIPBackbone.from_pretrained(str(missing)), FileNotFoundError, [str(missing)])
    assert_raises_naming(lambda: CLIPBackbone.from_pretrained(f"local-dir:{missing}"), FileNotFoundError, [str(missing)])
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_raises_naming(lambda: CLIPBackbone.from_pretrained(str(empty)), FileNotFoundError,
                         [str(empty), "open_clip_config.json"])
    (empty / "open_clip_config.json").write_text("{}")
    assert_raises_naming(lambda: CLIPBackbone.from_pretrained(str(empty)), FileNotFoundError,
                         [str(empty), "no weights"])
    (empty / "open_clip_model.safetensors").write_bytes(b"")
    assert_raises_naming(lambda: CLIPBackbone.from_pretrained(str(empty)), ValueError, ["model_cfg"])
    assert_raises_naming(lambda: CLIPBackbone.from_pretrained("ViT-Q-99"), FileNotFoundError,
                         ["ViT-Q-99", "open_clip_config.json"])
    assert_raises_naming(lambda: CLIPBackbone.from_pretrained("ViT-B-16", pretrained="no_such_tag"), ValueError,
                         ["no_such_tag", "openai"])


def test_rejects_unsupported_models():
    cfg = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1,
                                           "head_width": 16, "attentional_pool": True, "attn_pooler_heads": 2,
                                           "attn_pooler_queries": 4},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1}}
    model = open_clip.model.CLIP(**cfg)
    assert_raises_naming(lambda: CLIPBackbone(model), TypeError, ["attentional pooler"])
    assert_raises_naming(lambda: CLIPBackbone(torch.nn.Linear(2, 2)), TypeError, ["VisionTransformer"])
    b = CLIPBackbone(open_clip.model.CLIP(**{**cfg, "vision_cfg": {**cfg["vision_cfg"], "attentional_pool": False}}))
    assert_raises_naming(lambda: b.save_pretrained("/tmp/never_written"), ValueError, ["model_cfg"])


def test_from_pretrained_hub_name_wiring(monkeypatch, tmp_path):
    """A model name + tag goes through open_clip.create_model with the tag's QuickGELU setting and
    cache_dir (open_clip's loader is replaced by a tiny model here: no weights are reachable)."""
    tiny = CLIPBackbone.tiny(seed=3, layers=1, text_layers=1)
    calls = {}

    def fake_create_model(name, **kw):
        calls["create"] = (name, kw)
        return copy.deepcopy(tiny.model)

    def fake_get_tokenizer(name, **kw):
        calls["tokenizer"] = (name, kw)
        return open_clip.SimpleTokenizer()

    monkeypatch.setattr(open_clip, "create_model", fake_create_model)
    monkeypatch.setattr(open_clip, "get_tokenizer", fake_get_tokenizer)
    b = CLIPBackbone.from_pretrained("ViT-B/16", pretrained="openai", cache_dir=str(tmp_path), pos_interp="bilinear")
    name, kw = calls["create"]
    assert name == "ViT-B-16" and kw["pretrained"] == "openai" and kw["cache_dir"] == str(tmp_path)
    assert kw["force_quick_gelu"] is True and b.model_cfg["quick_gelu"] is True
    assert b.model_cfg["vision_cfg"]["patch_size"] == 16 and b.pos_interp == "bilinear"
    assert calls["tokenizer"] == ("ViT-B-16", {"cache_dir": str(tmp_path)})
    CLIPBackbone.from_pretrained("ViT-B-16", pretrained="laion2b_s34b_b88k")
    assert calls["create"][1]["force_quick_gelu"] is False
    CLIPBackbone.from_pretrained("ViT-B-16", pretrained=None)
    assert calls["create"][1]["pretrained"] is None
