import pytest
import torch
from _helpers import assert_raises_naming
from hypothesis import given
from hypothesis import strategies as st

from weakseg.ops import masked_area_pool, masked_area_pool_reference


def _masks(g, B, M, H, W, kind):
    if kind == "bool":
        return torch.rand(B, M, H, W, generator=g) < torch.rand(B, M, 1, 1, generator=g)
    if kind == "uint8":
        return (torch.rand(B, M, H, W, generator=g) < 0.4).to(torch.uint8) * torch.randint(1, 256, (), generator=g).to(torch.uint8)
    if kind == "zeros":
        return torch.zeros(B, M, H, W, dtype=torch.bool)
    return torch.rand(B, M, H, W, generator=g, dtype=torch.float32)


@given(B=st.integers(0, 2), M=st.integers(0, 4), C=st.integers(1, 9), h=st.integers(1, 7), w=st.integers(1, 7),
       H=st.integers(1, 40), W=st.integers(1, 40), kind=st.sampled_from(["bool", "uint8", "float", "zeros"]),
       normalize=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_matches_reference_cpu(B, M, C, h, w, H, W, kind, normalize, seed):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(B, C, h, w, generator=g)
    masks = _masks(g, B, M, H, W, kind)
    pooled, area = masked_area_pool(feats, masks, normalize)
    rp, ra = masked_area_pool_reference(feats, masks, normalize)
    assert pooled.shape == (B, M, C) and area.shape == (B, M)
    assert pooled.dtype == feats.dtype
    assert torch.isfinite(pooled).all() and (area >= 0).all()
    torch.testing.assert_close(area, ra, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pooled, rp, rtol=1e-4, atol=1e-5)
    if kind == "zeros":
        assert (pooled == 0).all() and (area == 0).all()


def test_device_and_dtypes(device):
    g = torch.Generator().manual_seed(0)
    for (B, M, C, h, w, H, W) in [(2, 5, 64, 14, 14, 224, 224), (1, 3, 8, 7, 9, 50, 61), (1, 1, 4, 5, 5, 3, 4),
                                  (3, 0, 8, 4, 4, 16, 16), (1, 2, 16, 1, 1, 1, 1)]:
        for kind in ["bool", "uint8", "float"]:
            feats = torch.randn(B, C, h, w, generator=g)
            masks = _masks(g, B, M, H, W, kind)
            for fdt in [torch.float32, torch.float64, torch.bfloat16]:
                f = feats.to(fdt)
                pooled, area = masked_area_pool(f.to(device), masks.to(device))
                rp, ra = masked_area_pool_reference(f, masks)
                tol = dict(rtol=2e-2, atol=2e-2) if fdt == torch.bfloat16 else dict(rtol=1e-4, atol=1e-5)
                torch.testing.assert_close(pooled.cpu(), rp, **tol)
                torch.testing.assert_close(area.cpu(), ra, rtol=1e-5, atol=1e-6)


def test_exact_patch_fractions():
    """At an exact factor the weight of a patch is the covered pixel count / patch area (ModuSeg SMFA)."""
    masks = torch.zeros(1, 1, 32, 48, dtype=torch.bool)
    masks[0, 0, :16, :16] = True          # patch (0,0) fully covered
    masks[0, 0, 16:20, 16:32] = True      # patch (1,1) covered by 64 / 256
    feats = torch.zeros(1, 3, 2, 3)
    feats[0, :, 0, 0] = torch.tensor([1.0, 0, 0])
    feats[0, :, 1, 1] = torch.tensor([0, 1.0, 0])
    pooled, area = masked_area_pool(feats, masks, normalize=False)
    assert area.item() == pytest.approx(1.25)
    torch.testing.assert_close(pooled[0, 0], torch.tensor([1 / 1.25, 0.25 / 1.25, 0]))
    unit, _ = masked_area_pool(feats, masks)
    assert unit.norm().item() == pytest.approx(1.0, abs=1e-6)


def test_nonbinary_uint8_counts_as_foreground():
    feats = torch.randn(1, 4, 2, 2)
    a = torch.zeros(1, 1, 8, 8, dtype=torch.uint8)
    a[..., :4, :] = 255
    b = (a > 0)
    torch.testing.assert_close(masked_area_pool(feats, a), masked_area_pool(feats, b))


@pytest.mark.parametrize("normalize", [True, False])
def test_gradcheck_features(normalize):
    g = torch.Generator().manual_seed(5)
    feats = torch.randn(2, 3, 3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    masks = torch.rand(2, 3, 10, 13, generator=g, dtype=torch.float64)
    masks[1, 2] = 0  # an empty mask: its row is zero and carries no gradient
    assert torch.autograd.gradcheck(lambda f: masked_area_pool(f, masks, normalize)[0], (feats,))


def test_gradient_matches_reference_autograd():
    g = torch.Generator().manual_seed(6)
    feats = torch.randn(1, 5, 4, 4, generator=g, requires_grad=True)
    masks = torch.rand(1, 2, 16, 16, generator=g) < 0.5
    w = torch.randn(1, 2, 5, generator=g)
    (masked_area_pool(feats, masks)[0] * w).sum().backward()
    got = feats.grad.clone()
    feats.grad = None
    (masked_area_pool_reference(feats, masks)[0] * w).sum().backward()
    torch.testing.assert_close(got, feats.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("bad, exc, words", [
    (lambda: masked_area_pool(torch.randn(1, 2, 3), torch.ones(1, 1, 4, 4)), ValueError, ["features", "(B, C, h, w)"]),
    (lambda: masked_area_pool(torch.randn(1, 2, 3, 3), torch.ones(1, 4, 4)), ValueError, ["masks", "(B, M, H, W)"]),
    (lambda: masked_area_pool(torch.randn(2, 2, 3, 3), torch.ones(1, 1, 4, 4)), ValueError, ["batch size"]),
    (lambda: masked_area_pool(torch.ones(1, 2, 3, 3, dtype=torch.long), torch.ones(1, 1, 4, 4)), TypeError, ["features"]),
    (lambda: masked_area_pool(torch.randn(1, 2, 3, 3), torch.ones(1, 1, 4, 4, dtype=torch.int32)), TypeError, ["masks"]),
    (lambda: masked_area_pool(torch.randn(1, 2, 3, 3), torch.ones(1, 1, 0, 4)), ValueError, ["masks", "H x W"]),
])
def test_errors(bad, exc, words):
    assert_raises_naming(bad, exc, words)


def test_compiled_op_checks_inputs():
    with pytest.raises(RuntimeError, match="weakseg.masked_area_pool: features and masks must have the same batch"):
        torch.ops.weakseg.masked_area_pool(torch.randn(2, 2, 3, 3), torch.ones(1, 1, 4, 4), True)


def test_opcheck(device):
    feats = torch.randn(2, 6, 4, 5, device=device, requires_grad=True)
    masks = torch.rand(2, 3, 19, 23, device=device) < 0.5
    torch.library.opcheck(torch.ops.weakseg.masked_area_pool.default, (feats, masks, True))
    torch.library.opcheck(torch.ops.weakseg.masked_area_pool.default, (feats, masks.float(), False))
