import math

import pytest
import torch
from _helpers import assert_raises_naming, torch_threads
from hypothesis import given, settings
from hypothesis import strategies as st

from weakseg.ops import (
    head_mean_attention,
    refine_propagate,
    refine_propagate_qk,
    refine_propagate_qk_reference,
    refine_propagate_reference,
)


def _attention(kind: str, B: int, P: int, g: torch.Generator, temp: float = 3.0) -> torch.Tensor:
    """Attention-like (B, P, P) non-negative matrices of several kinds."""
    if kind == "softmax":
        return (torch.randn(B, P, P, generator=g) * temp).softmax(-1)
    if kind == "uniform":
        return torch.rand(B, P, P, generator=g)
    if kind == "sparse":  # exact zeros, some all-zero columns and rows
        a = torch.rand(B, P, P, generator=g) * (torch.rand(B, P, P, generator=g) < 0.3)
        a[:, :, torch.rand(P, generator=g) < 0.2] = 0
        a[:, torch.rand(P, generator=g) < 0.1, :] = 0
        return a
    if kind == "onehot":  # every query attends to one random key
        if P == 0:
            return torch.zeros(B, 0, 0)
        idx = torch.randint(0, P, (B, P), generator=g)
        return torch.nn.functional.one_hot(idx, P).float()
    if kind.startswith("rows"):  # sparse softmax rows with a fraction of dense rows mixed in
        frac = float(kind[4:])
        a = (torch.randn(B, P, P, generator=g) * 6).softmax(-1)
        dense = torch.rand(B, P, generator=g) < frac
        return torch.where(dense[..., None], torch.rand(B, P, P, generator=g), a)
    raise ValueError(kind)


def _assert_as_accurate_as_eager_fp32(out, attn, maps, ent, steps, factor=50.0):
    """The op's float32 result is as close to the float64 reference as the eager
    float32 reference sequence is (the normalisation can amplify rounding when a
    column becomes nearly constant, so the bound is relative to what fp32 allows)."""
    ref64 = refine_propagate_reference(attn.double(), maps.double(), ent, steps)
    ref32 = refine_propagate_reference(attn.float(), maps.float(), ent, steps)
    assert out.shape == ref64.shape and out.dtype == torch.float32
    err = (out.double().cpu() - ref64).abs().max().item() if out.numel() else 0.0
    err32 = (ref32.double() - ref64).abs().max().item() if out.numel() else 0.0
    scale = ref64.abs().max().item() if out.numel() else 0.0
    assert err <= factor * err32 + 1e-5 * scale + 1e-12, (err, err32, scale)


@given(B=st.integers(0, 3), P=st.integers(0, 48), K=st.integers(1, 8), steps=st.integers(0, 20),
       ent=st.floats(0, 0.2), kind=st.sampled_from(["softmax", "uniform", "sparse", "onehot"]),
       seed=st.integers(0, 2**31 - 1))
def test_matches_float64_reference_cpu(B, P, K, steps, ent, kind, seed):
    g = torch.Generator().manual_seed(seed)
    attn = _attention(kind, B, P, g)
    maps = torch.randn(B, P, K, generator=g)
    out = refine_propagate(attn, maps, ent, steps)
    _assert_as_accurate_as_eager_fp32(out, attn, maps, ent, steps)
    # float64 in, float64 out, as exact as the float64 reference
    out64 = refine_propagate(attn.double(), maps.double(), ent, steps)
    assert out64.dtype == torch.float64
    ref64 = refine_propagate_reference(attn.double(), maps.double(), ent, steps)
    torch.testing.assert_close(out64, ref64, rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("P,K,steps,ent", [(1024, 20, 10, 0.015), (4096, 20, 10, 0.015), (2000, 32, 20, 0.2),
                                           (1600, 3, 5, 0.02)])
def test_large_shapes(device, P, K, steps, ent):
    g = torch.Generator().manual_seed(P + K)
    attn = _attention("softmax", 1, P, g, temp=4.0)
    maps = torch.rand(1, P, K, generator=g)
    out = refine_propagate(attn.to(device), maps.to(device), ent, steps)
    _assert_as_accurate_as_eager_fp32(out, attn, maps, ent, steps)


@pytest.mark.parametrize("kind", ["rows0.0", "rows0.1", "rows0.5", "rows1.0", "sparse", "onehot"])
@pytest.mark.parametrize("P", [64, 200, 513])
def test_sparse_and_dense_row_mixes(device, kind, P):
    """The CPU kernel packs rows with few non-zeros and picks a sparse or a dense
    product by the mix: every mix gives the reference result."""
    g = torch.Generator().manual_seed(P)
    attn = _attention(kind, 2, P, g)
    maps = torch.randn(2, P, 5, generator=g)
    for ent, steps in [(0.015, 10), (0.2, 3), (0.0, 1)]:
        out = refine_propagate(attn.to(device), maps.to(device), ent, steps)
        _assert_as_accurate_as_eager_fp32(out, attn, maps, ent, steps)
        out64 = refine_propagate(attn.double().to(device), maps.double().to(device), ent, steps).cpu()
        ref64 = refine_propagate_reference(attn.double(), maps.double(), ent, steps)
        torch.testing.assert_close(out64, ref64, rtol=1e-7, atol=1e-10)


def test_half_and_bfloat16_attention_read_as_float32(device):
    g = torch.Generator().manual_seed(1)
    attn = _attention("softmax", 2, 100, g)
    maps = torch.rand(2, 100, 4, generator=g)
    for dt in (torch.float16, torch.bfloat16):
        a = attn.to(dt)
        out = refine_propagate(a.to(device), maps.to(device), 0.015, 10)
        assert out.dtype == torch.float32
        _assert_as_accurate_as_eager_fp32(out, a.float(), maps, 0.015, 10)


def test_non_contiguous_inputs(device):
    g = torch.Generator().manual_seed(2)
    attn = _attention("softmax", 2, 50, g)
    maps = torch.rand(2, 6, 50, generator=g)
    a = attn.to(device)
    m = maps.to(device)
    out = refine_propagate(a.transpose(1, 2), m.transpose(1, 2), 0.1, 7)
    ref = refine_propagate(a.transpose(1, 2).contiguous(), m.transpose(1, 2).contiguous(), 0.1, 7)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_hand_computed_two_pixels(device):
    # attn columns: max 0.8 and 0.5 -> T = [[1, 0.25], [0.5, 1]]; ent = 0 leaves it;
    # Pm = [[0.8, 0.2], [1/3, 2/3]]. maps column (0, 1) is already normalised: C0 = (0, 1).
    attn = torch.tensor([[[0.8, 0.125], [0.4, 0.5]]], device=device)
    maps = torch.tensor([[[0.0], [1.0]]], device=device)
    c0 = refine_propagate(attn, maps, 0.0, 0)
    torch.testing.assert_close(c0.cpu(), torch.tensor([[[0.0], [1.0]]]))
    # one step: Pm C0 = (0.2, 2/3) -> minus 0.2 -> (0, 7/15) -> / (7/15) -> (0, 1)
    c1 = refine_propagate(attn, maps, 0.0, 1)
    torch.testing.assert_close(c1.cpu(), torch.tensor([[[0.0], [1.0]]]))
    # ent > 0: T' = T + ent*log10(e*T) = [[1 + ent*log10(e), ...]]; check against closed form
    ent = 0.1
    t = torch.tensor([[1.0, 0.25], [0.5, 1.0]], dtype=torch.float64)
    t = (t + ent * torch.log10(math.e * t)).clamp_min(0)
    pm = t / t.sum(1, keepdim=True)
    maps2 = torch.tensor([[[0.3, 2.0], [0.9, -1.0]]], device=device)
    c = maps2[0].double().cpu()
    c = c - c.min(0).values
    c = c / c.sum(0)
    for _ in range(3):
        c = pm @ c
        c = c - c.min(0).values
        c = c / c.sum(0)
    out = refine_propagate(attn, maps2, ent, 3)
    torch.testing.assert_close(out[0].double().cpu(), c, rtol=1e-5, atol=1e-6)


def test_degenerate_inputs(device):
    g = torch.Generator().manual_seed(3)
    # P = 1: every column is constant, so everything is 0
    out = refine_propagate(torch.ones(2, 1, 1, device=device), torch.rand(2, 1, 3, generator=g).to(device), 0.1, 5)
    assert out.shape == (2, 1, 3) and (out == 0).all()
    # identity attention: Pm = I, the maps only get normalised
    maps = torch.rand(1, 20, 4, generator=g).to(device)
    eye = torch.eye(20, device=device)[None]
    out = refine_propagate(eye, maps, 0.015, 10)
    norm = maps - maps.amin(1, keepdim=True)
    norm = norm / norm.sum(1, keepdim=True)
    torch.testing.assert_close(out, norm, rtol=1e-5, atol=1e-7)
    # all-zero attention: Pm = 0, so after one step every column is 0
    out = refine_propagate(torch.zeros(1, 8, 8, device=device), maps[:, :8], 0.015, 1)
    assert (out == 0).all()
    # a constant map column stays 0, the others are normalised
    m = torch.rand(1, 30, 2, generator=g)
    m[..., 0] = 0.7
    a = _attention("softmax", 1, 30, g)
    out = refine_propagate(a.to(device), m.to(device), 0.015, 4).cpu()
    assert (out[..., 0] == 0).all()
    torch.testing.assert_close(out[..., 1].sum(), torch.tensor(1.0))
    assert out[..., 1].min() == 0
    # zero columns of attn contribute nothing: same as removing those keys' mass
    a = _attention("softmax", 1, 30, g)
    a[:, :, :5] = 0
    out = refine_propagate(a.to(device), m.to(device), 0.015, 4)
    assert torch.isfinite(out).all()
    _assert_as_accurate_as_eager_fp32(out, a, m, 0.015, 4)


def test_empty_inputs(device):
    for B, P, K in [(0, 5, 3), (2, 0, 3), (2, 5, 0)]:
        out = refine_propagate(torch.rand(B, P, P, device=device), torch.rand(B, P, K, device=device), 0.015, 3)
        assert out.shape == (B, P, K) and out.dtype == torch.float32
        out = refine_propagate_qk(torch.rand(B, 2, P, 4, device=device), torch.rand(B, 2, P, 4, device=device),
                                  torch.rand(B, P, K, device=device), 0.015, 3)
        assert out.shape == (B, P, K)


def test_output_equals_normalised_power_of_pm():
    """The identity of the spec: per-step normalisation commutes with the row-stochastic
    Pm, so the result is the column-normalised Pm^N C0 (float64)."""
    g = torch.Generator().manual_seed(4)
    P, K, N, ent = 64, 5, 6, 0.05
    attn = _attention("softmax", 1, P, g, temp=1.0).double()
    maps = torch.rand(1, P, K, generator=g, dtype=torch.float64)
    out = refine_propagate(attn, maps, ent, N)[0]
    t = attn[0] / attn[0].amax(0, keepdim=True)
    t = torch.where(t > 0, t + ent * torch.log10(math.e * t), t).clamp_min(0)
    pm = t / t.sum(1, keepdim=True)
    c = torch.linalg.matrix_power(pm, N) @ maps[0]
    c = c - c.amin(0)
    c = c / c.sum(0)
    torch.testing.assert_close(out, c, rtol=1e-9, atol=1e-12)


def test_entropy_reduction_cuts_weak_links():
    """ent acts as a soft threshold on T = attn / colmax: a large ent removes the
    weak cross-links between two blocks, so the maps stop mixing across them."""
    P = 40
    attn = torch.zeros(1, P, P, dtype=torch.float64)
    attn[0, :20, :20] = 1.0
    attn[0, 20:, 20:] = 1.0
    attn[0, 20:, :20] = torch.linspace(0.001, 0.003, 20, dtype=torch.float64)[:, None]  # weak, uneven links
    maps = torch.zeros(1, P, 1, dtype=torch.float64)
    maps[0, :20] = 1.0
    mixed = refine_propagate(attn, maps, 0.0, 10)[0, :, 0]
    cut = refine_propagate(attn, maps, 0.2, 10)[0, :, 0]
    assert mixed[20:].max() > 5e-5  # ent = 0 keeps the links: mass leaks into the second block
    assert (cut[20:] == 0).all() and torch.allclose(cut[:20], torch.full((20,), 1 / 20, dtype=torch.float64))


# --------------------------------------------------------------------------------------------
# refine_propagate_qk


@given(B=st.integers(1, 2), H=st.integers(1, 3), P=st.integers(1, 40), d=st.integers(1, 16), K=st.integers(1, 6),
       steps=st.integers(0, 20), ent=st.floats(0, 0.2), seed=st.integers(0, 2**31 - 1))
@settings(max_examples=30)
def test_qk_matches_reference_cpu(B, H, P, d, K, steps, ent, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, P, d, generator=g)
    k = torch.randn(B, H, P, d, generator=g)
    maps = torch.rand(B, P, K, generator=g)
    out = refine_propagate_qk(q, k, maps, ent, steps)
    attn = head_mean_attention(q.double(), k.double())
    _assert_as_accurate_as_eager_fp32(out, attn, maps, ent, steps)


def test_qk_default_scale_and_explicit_scale(device):
    g = torch.Generator().manual_seed(5)
    q = torch.randn(1, 2, 64, 16, generator=g)
    k = torch.randn(1, 2, 64, 16, generator=g)
    maps = torch.rand(1, 64, 3, generator=g)
    ref = refine_propagate_qk_reference(q.double(), k.double(), maps.double(), 0.015, 5)
    out = refine_propagate_qk(q.to(device), k.to(device), maps.to(device), 0.015, 5)
    tol = 1e-5 if device == "cpu" else 3e-3
    torch.testing.assert_close(out.double().cpu(), ref, rtol=0, atol=tol * ref.abs().max().item())
    ref2 = refine_propagate_qk_reference(q.double(), k.double(), maps.double(), 0.015, 5, scale=0.5)
    out2 = refine_propagate_qk(q.to(device), k.to(device), maps.to(device), 0.015, 5, scale=0.5)
    torch.testing.assert_close(out2.double().cpu(), ref2, rtol=0, atol=tol * ref2.abs().max().item())
    assert (out2.cpu() - out.cpu()).abs().max() > 10 * tol * ref.abs().max()


@pytest.mark.parametrize("P,H,d,K", [(4096, 2, 64, 20), (1000, 5, 64, 7), (257, 1, 8, 33)])
def test_qk_equals_refine_on_head_mean_attention(device, P, H, d, K):
    g = torch.Generator().manual_seed(P)
    q = torch.randn(1, H, P, d, generator=g, dtype=torch.float16)
    k = torch.randn(1, H, P, d, generator=g, dtype=torch.float16)
    maps = torch.rand(1, P, K, generator=g)
    out = refine_propagate_qk(q.to(device), k.to(device), maps.to(device), 0.015, 10).cpu()
    assert out.dtype == torch.float32
    attn = head_mean_attention(q.double(), k.double())
    if device == "cpu":
        _assert_as_accurate_as_eager_fp32(out, attn, maps, 0.015, 10)
    else:  # T' in bf16: relative rounding 2^-9 per entry, averaged over the rows
        want = refine_propagate_reference(attn, maps.double(), 0.015, 10)
        torch.testing.assert_close(out.double(), want, rtol=0, atol=2e-2 * want.abs().max().item())
        agree = (out.argmax(-1) == want.argmax(-1)).float().mean().item()
        assert agree > 0.99


@pytest.mark.cuda
def test_qk_memory_on_cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    P, H, d, K = 4096, 2, 64, 20
    q = torch.randn(1, H, P, d, device="cuda", dtype=torch.float16)
    k = torch.randn(1, H, P, d, device="cuda", dtype=torch.float16)
    maps = torch.rand(1, P, K, device="cuda")
    refine_propagate_qk(q, k, maps, 0.015, 10)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    refine_propagate_qk(q, k, maps, 0.015, 10)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra < 64 * 2**20, f"peak extra memory {extra / 2**20:.1f} MiB"
    # and the dense path keeps one P x P float32 buffer beyond its input
    attn = head_mean_attention(q, k).float()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    refine_propagate(attn, maps, 0.015, 10)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra < P * P * 4 + 8 * 2**20, f"peak extra memory {extra / 2**20:.1f} MiB"


# --------------------------------------------------------------------------------------------
# checks


def test_opcheck(device):
    g = torch.Generator().manual_seed(6)
    attn = _attention("softmax", 2, 17, g).to(device)
    maps = torch.rand(2, 17, 3, generator=g).to(device)
    torch.library.opcheck(torch.ops.weakseg.refine_propagate.default, (attn, maps, 0.015, 4))
    q = torch.randn(2, 2, 17, 8, generator=g).to(device)
    k = torch.randn(2, 2, 17, 8, generator=g).to(device)
    torch.library.opcheck(torch.ops.weakseg.refine_propagate_qk.default, (q, k, maps, 0.015, 4, 0.35))


def test_input_errors():
    a = torch.rand(1, 4, 4)
    m = torch.rand(1, 4, 2)
    for call, exc, words in [
        (lambda: refine_propagate(a[0], m, 0.1, 1), ValueError, ["attn", "(B, P, P)"]),
        (lambda: refine_propagate(torch.rand(1, 4, 5), m, 0.1, 1), ValueError, ["attn", "(B, P, P)"]),
        (lambda: refine_propagate(a.long(), m, 0.1, 1), TypeError, ["attn", "floating"]),
        (lambda: refine_propagate(a, m[0], 0.1, 1), ValueError, ["maps", "(B, P, K)"]),
        (lambda: refine_propagate(a, torch.rand(1, 3, 2), 0.1, 1), ValueError, ["maps", "(1, 4, K)"]),
        (lambda: refine_propagate(a, torch.rand(2, 4, 2), 0.1, 1), ValueError, ["maps", "(1, 4, K)"]),
        (lambda: refine_propagate(a, m.int(), 0.1, 1), TypeError, ["maps", "floating"]),
        (lambda: refine_propagate(a, m, -0.1, 1), ValueError, ["ent", ">= 0"]),
        (lambda: refine_propagate(a, m, float("nan"), 1), ValueError, ["ent", "finite"]),
        (lambda: refine_propagate(a, m, 0.1, -1), ValueError, ["steps", ">= 0"]),
        (lambda: refine_propagate(a, m, 0.1, 2.5), ValueError, ["steps", "int"]),
        (lambda: refine_propagate("attn", m, 0.1, 1), TypeError, ["attn", "tensor"]),
        (lambda: refine_propagate_qk(torch.rand(1, 4, 3), torch.rand(1, 4, 3), m), ValueError, ["q", "(B, heads, P, d)"]),
        (lambda: refine_propagate_qk(torch.rand(1, 2, 4, 3), torch.rand(1, 2, 4, 5), m), ValueError, ["k", "same shape"]),
        (lambda: refine_propagate_qk(torch.rand(1, 2, 4, 3), torch.rand(1, 2, 4, 3), torch.rand(1, 5, 2)), ValueError,
         ["maps", "(1, 4, K)"]),
        (lambda: refine_propagate_qk(torch.rand(1, 0, 4, 3), torch.rand(1, 0, 4, 3), m), ValueError, ["head"]),
        # d = 0 with the default scale (d ** -0.5) was a ZeroDivisionError; the reference says the same
        (lambda: refine_propagate_qk(torch.rand(1, 2, 4, 0), torch.rand(1, 2, 4, 0), m), ValueError,
         ["q and k", "head dimension d >= 1", "(1, 2, 4, 0)"]),
        (lambda: refine_propagate_qk_reference(torch.rand(1, 2, 4, 0), torch.rand(1, 2, 4, 0), m, 0.1, 1), ValueError,
         ["q and k", "head dimension d >= 1"]),
        (lambda: head_mean_attention(torch.rand(1, 2, 4, 0), torch.rand(1, 2, 4, 0)), ValueError,
         ["head_mean_attention", "d >= 1"]),
        (lambda: refine_propagate_qk(torch.rand(1, 2, 4, 3), torch.rand(1, 2, 4, 3), m, scale=float("inf")),
         ValueError, ["scale", "finite"]),
        (lambda: refine_propagate_qk(torch.ones(1, 2, 4, 3, dtype=torch.long), torch.ones(1, 2, 4, 3, dtype=torch.long),
                                     m, scale=1.0), TypeError, ["q", "floating"]),
    ]:
        assert_raises_naming(call, exc, words)


def test_compiled_op_errors_name_the_argument():
    """The C++ checks (reached by calling the library op directly) name the argument too."""
    op = torch.ops.weakseg.refine_propagate.default
    for args, words in [((torch.rand(1, 4, 5), torch.rand(1, 4, 2), 0.1, 1), ["attn", "(B, P, P)"]),
                        ((torch.rand(1, 4, 4), torch.rand(1, 3, 2), 0.1, 1), ["maps", "(1, 4, K)"]),
                        ((torch.rand(1, 4, 4), torch.rand(1, 4, 2), -1.0, 1), ["ent"]),
                        ((torch.rand(1, 4, 4), torch.rand(1, 4, 2), 0.1, -2), ["steps"])]:
        assert_raises_naming(lambda: op(*args), RuntimeError, ["weakseg.refine_propagate"] + words)
    op = torch.ops.weakseg.refine_propagate_qk.default
    assert_raises_naming(lambda: op(torch.rand(1, 2, 4, 3), torch.rand(1, 2, 4, 2), torch.rand(1, 4, 2), 0.1, 1, 1.0),
                         RuntimeError, ["weakseg.refine_propagate_qk", "k"])


# ---- the CPU kernel's paths (issue 20) -----------------------------------------------------------


@given(P=st.integers(1, 70), ent=st.floats(0, 0.3), spread=st.floats(0, 60), zeros=st.floats(0, 0.5),
       seed=st.integers(0, 2**31 - 1))
def test_entropy_reduced_rows_match_float64(P, ent, spread, zeros, seed):
    """T' entry by entry (the vectorised logarithm of the float32 path, its 16-lane tails, the cut
    below t_lo): one step from the identity maps gives Pm's columns, normalised; attention values
    spread over e^-60 .. 1 (subnormal ratios included) with exact zeros."""
    g = torch.Generator().manual_seed(seed)
    attn = torch.exp(-spread * torch.rand(1, P, P, generator=g))
    attn = attn * (torch.rand(1, P, P, generator=g) >= zeros)
    maps = torch.eye(P)[None]
    out = refine_propagate(attn, maps, ent, 1)
    _assert_as_accurate_as_eager_fp32(out, attn, maps, ent, 1)


@pytest.mark.parametrize("kind", ["softmax", "uniform", "rows0.1", "onehot"])
@pytest.mark.parametrize("P,K", [(256, 8), (1030, 1), (1100, 20)])
def test_threads_and_sizes(kind, P, K):
    """As accurate on one and two threads, on both sides of the size below which the kernel
    stays on the calling thread."""
    g = torch.Generator().manual_seed(P + K)
    attn = _attention(kind, 1, P, g)
    maps = torch.rand(1, P, K, generator=g)
    outs = []
    for threads in (1, 2):
        with torch_threads(threads):
            outs.append(refine_propagate(attn, maps, 0.015, 10))
    for out in outs:  # (the GEMM's blocking, hence its rounding, depends on the thread count)
        _assert_as_accurate_as_eager_fp32(out, attn, maps, 0.015, 10)
