"""Every CUDA kernel of weakseg executed on the CPU, against the ops' references.

``weakseg._C_emu`` is the CUDA source itself (csrc/ops/cuda/*.cu and the kernels/*.cuh
bodies they launch) compiled by g++ against the emulator of csrc/emu/ (see README,
"CUDA kernels on the CPU"): CUDA threads run as fibers (or OS threads), blocks one at a
time in a shuffled order, with barriers and warp shuffles as rendezvous that report
divergence. Its ops, ``torch.ops.weakseg_emu.<op>``, take and return CPU tensors. The
cases are those of tests/test_<op>.py (their strategies and helpers, imported), at sizes
that keep this file to a couple of minutes.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_erode import _blocky_labels, _random_mask, shapes
from test_kl_kmeans import _data, _trajectory_gap
from test_knn_vote import _unambiguous
from test_masked_area_pool import _masks
from test_refine_propagate import _assert_as_accurate_as_eager_fp32, _attention

import weakseg
from weakseg.ops import extension as _ext
from weakseg.ops import (
    erode_labels_reference,
    erode_reference,
    head_mean_attention,
    kl_kmeans_reference,
    knn_vote_reference,
    masked_area_pool_reference,
    refine_propagate_reference,
)

try:
    from weakseg import _C_emu  # noqa: F401

    HAS_EMU, _EMU_ERROR = True, None
except ImportError as e:  # a wheel, or a build with WEAKSEG_BUILD_EMU=OFF
    HAS_EMU, _EMU_ERROR = False, str(e)

_CHECKOUT = Path(weakseg.__file__).resolve().parent == Path(__file__).resolve().parents[1] / "pysrc" / "weakseg"


def test_emulator_is_built_in_a_checkout():
    """A checkout built by `make build` (editable) has the emulator: these tests must not skip there."""
    if not (_CHECKOUT and _ext.HAS_EXT) or os.environ.get("WEAKSEG_BUILD_EMU", "").upper() == "OFF":
        pytest.skip("not an editable build of this checkout")
    assert HAS_EMU, f"weakseg._C_emu is missing from the build: {_EMU_ERROR}"


needs_emu = pytest.mark.skipif(not HAS_EMU, reason=f"weakseg._C_emu not built ({_EMU_ERROR})")
pytestmark = needs_emu
E = torch.ops.weakseg_emu if HAS_EMU else None


@pytest.fixture(autouse=True)
def _emulator():
    """Fibers (fast), a fixed seed for the block / thread orders; one thread of torch for the GEMMs."""
    if HAS_EMU:
        E.configure("fibers", 1234)
        E.reset_stats()
    yield


def _ran(min_launches=1):
    launches, blocks, threads, _, _ = E.stats()
    assert launches >= min_launches and blocks >= launches and threads >= blocks
    return launches


# ---- the emulator itself ---------------------------------------------------------------------


def test_selftest_shuffles_shared_memory_atomics():
    (out,) = E.selftest("shuffle")
    lanes = torch.arange(64) % 32
    assert torch.equal(out[:64], torch.full((64,), 496))  # butterfly sum of 0..31 in every lane
    assert torch.equal(out[64:], torch.where(lanes < 31, lanes + 1, lanes))  # shfl_down past the warp: own value
    sums, total, count = E.selftest("shared_sum")
    want = torch.arange(1024, dtype=torch.float32).view(4, 256).sum(1)
    assert torch.equal(sums, want) and total.item() == want.sum().item() and count.item() == 1024
    (out,) = E.selftest("dynamic_smem")
    assert (out[:64] == -1).all()  # dynamic shared memory starts as 0xFF bytes
    assert torch.equal(out[64:], torch.arange(63, -1, -1, dtype=torch.int32))


@pytest.mark.parametrize("mode", ["fibers", "threads"])
@pytest.mark.parametrize("case, words", [
    ("divergent_barrier", ["different __syncthreads", "selftest.cpp"]),
    ("exit_at_barrier", ["returned while", "wait at __syncthreads"]),
    ("lane_exit_shuffle", ["returned while", "shuffle"]),
    ("partial_warp_shuffle", ["full warps"]),
    ("smem_limit", ["48 KiB"]),
    ("block_too_large", ["invalid block"]),
])
def test_selftest_reports_divergence_and_limits(mode, case, words):
    E.configure(mode, 7)
    with pytest.raises(RuntimeError) as e:
        E.selftest(case)
    for w in words:
        assert w in str(e.value), str(e.value)
    E.selftest("shuffle")  # and the emulator still works afterwards


def test_nothing_registered_in_the_weakseg_namespace():
    """Loading weakseg._C_emu adds no kernel to the real ops: weakseg::<op> has no CUDA kernel
    on a build without CUDA, and its CPU kernel is still the one of weakseg._C."""
    from weakseg.ops import OPS

    for op in OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"weakseg_emu::{op}", "CPU")
        if not _ext.built_with_cuda():
            assert not torch._C._dispatch_has_kernel_for_dispatch_key(f"weakseg::{op}", "CUDA")


# ---- erode / erode_labels ----------------------------------------------------------------------


@given(shape=shapes, kh=st.sampled_from([1, 3, 5, 7, 9]), kw=st.sampled_from([1, 3, 5, 11]),
       iterations=st.integers(0, 4), dtype=st.sampled_from([torch.bool, torch.uint8]),
       density=st.floats(0.3, 0.99), seed=st.integers(0, 2**31 - 1))
@settings(max_examples=30)
def test_erode_cuda_kernels_match_reference(shape, kh, kw, iterations, dtype, density, seed):
    lead, H, W = shape
    g = torch.Generator().manual_seed(seed)
    mask = _random_mask(g, (*lead, H, W), dtype, density)
    out = E.erode(mask, [kh, kw], iterations)
    assert out.dtype == mask.dtype and out.shape == mask.shape
    assert torch.equal(out, erode_reference(mask, (kh, kw), iterations))


def test_erode_cuda_kernels_borders_windows_empty():
    g = torch.Generator().manual_seed(0)
    for shape in [(1, 1), (1, 37), (29, 1), (3, 64, 48)]:
        for k, it in [(3, 1), (3, 20), (41, 1), ((5, 9), 2), (1, 3)]:
            mask = torch.rand(shape, generator=g) < 0.9
            ks = [k, k] if isinstance(k, int) else list(k)
            assert torch.equal(E.erode(mask, ks, it), erode_reference(mask, k, it)), (shape, k, it)
    _ran(2)
    mask = torch.ones(7, 9, dtype=torch.bool)
    mask[3, 4] = False
    assert E.erode(mask, [5, 5], 1).sum().item() == 63 - 25
    for shape in [(0, 5, 5), (3, 0, 4), (2, 4, 0)]:
        e = torch.zeros(shape, dtype=torch.bool)
        assert E.erode(e, [3, 3], 1).shape == e.shape
    t = (torch.rand(40, 30, generator=g) < 0.9).t()
    assert torch.equal(E.erode(t, [5, 5], 1), erode_reference(t.contiguous(), 5))


@given(shape=shapes, k=st.sampled_from([1, 3, 5, 9]), iterations=st.integers(0, 3),
       dtype=st.sampled_from([torch.int64, torch.int32, torch.uint8]), nlab=st.integers(1, 5),
       ignore=st.sampled_from([255, -1]), seed=st.integers(0, 2**31 - 1))
@settings(max_examples=30)
def test_erode_labels_cuda_kernels_match_reference(shape, k, iterations, dtype, nlab, ignore, seed):
    lead, H, W = shape
    if dtype == torch.uint8:
        ignore = 255
    lab = _blocky_labels(lead, H, W, nlab, dtype, torch.Generator().manual_seed(seed))
    out = E.erode_labels(lab, [k, k], iterations, ignore)
    assert out.dtype == lab.dtype
    assert torch.equal(out, erode_labels_reference(lab, k, iterations, ignore))


# ---- masked_area_pool --------------------------------------------------------------------------


@given(B=st.integers(0, 2), M=st.integers(0, 4), C=st.integers(1, 9), h=st.integers(1, 7), w=st.integers(1, 7),
       H=st.integers(1, 40), W=st.integers(1, 40), kind=st.sampled_from(["bool", "uint8", "float", "zeros"]),
       normalize=st.booleans(), seed=st.integers(0, 2**31 - 1))
@settings(max_examples=40)
def test_masked_area_pool_cuda_kernel_matches_reference(B, M, C, h, w, H, W, kind, normalize, seed):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(B, C, h, w, generator=g)
    masks = _masks(g, B, M, H, W, kind)
    pooled, area = E.masked_area_pool(feats, masks, normalize)
    rp, ra = masked_area_pool_reference(feats, masks, normalize)
    assert pooled.shape == (B, M, C) and area.shape == (B, M)
    torch.testing.assert_close(area, ra, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pooled, rp, rtol=1e-4, atol=1e-5)


def test_masked_area_pool_cuda_kernel_dtypes_and_exact_fractions():
    g = torch.Generator().manual_seed(0)
    for kind in ["bool", "uint8", "float"]:
        feats = torch.randn(1, 8, 7, 9, generator=g)
        masks = _masks(g, 1, 3, 50, 61, kind)
        for m in ([masks, masks.double()] if kind == "float" else [masks]):
            pooled, area = E.masked_area_pool(feats, m, True)
            rp, ra = masked_area_pool_reference(feats, m)
            torch.testing.assert_close(pooled, rp, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(area, ra, rtol=1e-5, atol=1e-6)
    masks = torch.zeros(1, 1, 32, 48, dtype=torch.bool)
    masks[0, 0, :16, :16] = True
    masks[0, 0, 16:20, 16:32] = True
    _, area = E.masked_area_pool(torch.zeros(1, 3, 2, 3), masks, False)
    assert area.item() == pytest.approx(1.25)


# ---- knn_vote ----------------------------------------------------------------------------------


def _knn_check(queries, bank, bank_labels, k, C):
    labels, conf, votes = E.knn_vote(queries, bank, bank_labels, k, C)
    rl, rc, rv = knn_vote_reference(queries, bank, bank_labels, k, C)
    assert labels.dtype == torch.int64 and votes.shape == (queries.shape[0], C)
    assert (votes.sum(1) == min(k, bank.shape[0])).all() and torch.isfinite(conf).all()
    ok = _unambiguous(queries, bank, bank_labels, k, C)
    assert torch.equal(labels[ok], rl[ok]) and torch.equal(votes[ok], rv[ok])
    torch.testing.assert_close(conf[ok], rc[ok], rtol=1e-5, atol=1e-5)
    return ok


@given(Q=st.integers(0, 20), N=st.integers(0, 60), D=st.integers(1, 16), k=st.integers(1, 70),
       C=st.integers(1, 6), seed=st.integers(0, 2**31 - 1))
@settings(max_examples=40)
def test_knn_vote_cuda_kernels_match_reference(Q, N, D, k, C, seed):
    g = torch.Generator().manual_seed(seed)
    queries = torch.randn(Q, D, generator=g)
    bank = torch.randn(N, D, generator=g)
    bank_labels = torch.randint(0, C, (N,), generator=g)
    _knn_check(queries, bank, bank_labels, k, C)


def test_knn_vote_cuda_kernels_several_segments():
    """N > 1024: the bank row is swept in several segments, each merged by a bitonic sort."""
    g = torch.Generator().manual_seed(0)
    for Q, N, D, k, C in [(3, 2500, 16, 25, 7), (2, 1100, 8, 300, 4)]:
        queries = torch.randn(Q, D, generator=g)
        bank = torch.randn(N, D, generator=g) * torch.rand(N, 1, generator=g) * 10
        ok = _knn_check(queries, bank, torch.randint(0, C, (N,), generator=g), k, C)
        assert ok.float().mean() > 0.5
    assert E.stats()[3] > 100  # barriers actually executed


def test_knn_vote_cuda_kernels_tie_rules_and_empty():
    bank = torch.tensor([[1.0, 0], [1.0, 0], [0, 1.0], [1.0, 0], [0, 1.0], [0, 1.0]])
    lab = torch.tensor([2, 1, 0, 1, 0, 0])
    q = torch.tensor([[1.0, 0]])
    labels, conf, votes = E.knn_vote(q, bank, lab, 2, 3)  # equal similarities: smaller bank index first
    assert votes.tolist() == [[0, 1, 1]] and labels.item() == 1 and conf.item() == 1.0  # then smaller class id
    labels, conf, votes = E.knn_vote(q, bank, lab, 3, 3)
    assert labels.item() == 1 and votes.tolist() == [[0, 2, 1]]
    bank2 = torch.tensor([[1.0, 0], [0.6, 0.8], [0.8, 0.6], [0.0, 1.0]])
    labels, conf, votes = E.knn_vote(q, bank2, torch.tensor([1, 0, 0, 1]), 4, 2)  # larger sum wins the vote tie
    assert labels.item() == 0 and votes.tolist() == [[2, 2]] and conf.item() == pytest.approx(0.7)
    # all similarities 0: every bank row ties, the smallest indices are the voters
    labels, conf, votes = E.knn_vote(torch.zeros(2, 4), torch.randn(6, 4), torch.arange(6) % 3, 3, 3)
    assert (labels == 0).all() and votes.tolist() == [[1, 1, 1]] * 2
    labels, conf, votes = E.knn_vote(torch.randn(4, 8), torch.zeros(0, 8), torch.zeros(0, dtype=torch.long), 25, 3)
    assert labels.tolist() == [-1] * 4 and votes.sum().item() == 0
    labels, conf, votes = E.knn_vote(torch.zeros(0, 8), torch.randn(5, 8), torch.zeros(5, dtype=torch.long), 3, 2)
    assert labels.shape == (0,) and votes.shape == (0, 2)


# ---- refine_propagate / refine_propagate_qk ----------------------------------------------------


@given(B=st.integers(0, 2), P=st.integers(0, 40), K=st.integers(1, 4), steps=st.integers(0, 5),
       ent=st.floats(0, 0.2), kind=st.sampled_from(["softmax", "uniform", "sparse", "onehot"]),
       seed=st.integers(0, 2**31 - 1))
@settings(max_examples=20)
def test_refine_propagate_cuda_kernels_match_reference(B, P, K, steps, ent, kind, seed):
    g = torch.Generator().manual_seed(seed)
    attn = _attention(kind, B, P, g)
    maps = torch.randn(B, P, K, generator=g)
    out = E.refine_propagate(attn, maps, ent, steps)
    _assert_as_accurate_as_eager_fp32(out, attn, maps, ent, steps)
    out64 = E.refine_propagate(attn.double(), maps.double(), ent, steps)
    assert out64.dtype == torch.float64
    torch.testing.assert_close(out64, refine_propagate_reference(attn.double(), maps.double(), ent, steps),
                               rtol=1e-7, atol=1e-10)


def test_refine_propagate_cuda_kernels_several_tiles_and_dtypes():
    """P > 256 and > 32: several column tiles (partial row sums) and row blocks; fp16 / bf16 attention."""
    g = torch.Generator().manual_seed(1)
    attn = _attention("sparse", 1, 300, g)
    maps = torch.rand(1, 300, 2, generator=g)
    out = E.refine_propagate(attn, maps, 0.015, 2)
    _assert_as_accurate_as_eager_fp32(out, attn, maps, 0.015, 2)
    a = _attention("softmax", 1, 40, g)
    m = torch.rand(1, 40, 3, generator=g)
    for dt in (torch.float16, torch.bfloat16):
        out = E.refine_propagate(a.to(dt), m, 0.015, 3)
        assert out.dtype == torch.float32
        _assert_as_accurate_as_eager_fp32(out, a.to(dt).float(), m, 0.015, 3)
    # hand-computed: T = [[1, .25], [.5, 1]], Pm = [[.8, .2], [1/3, 2/3]]
    attn = torch.tensor([[[0.8, 0.125], [0.4, 0.5]]])
    maps2 = torch.tensor([[[0.3, 2.0], [0.9, -1.0]]])
    t = torch.tensor([[1.0, 0.25], [0.5, 1.0]], dtype=torch.float64)
    t = (t + 0.1 * torch.log10(math.e * t)).clamp_min(0)
    pm = t / t.sum(1, keepdim=True)
    c = maps2[0].double()
    c = (c - c.min(0).values) / (c - c.min(0).values).sum(0)
    for _ in range(3):
        c = pm @ c
        c = (c - c.min(0).values) / (c - c.min(0).values).sum(0)
    torch.testing.assert_close(E.refine_propagate(attn, maps2, 0.1, 3)[0].double(), c, rtol=1e-5, atol=1e-6)
    # degenerate: P = 1, zero attention, a constant column
    assert (E.refine_propagate(torch.ones(2, 1, 1), torch.rand(2, 1, 3, generator=g), 0.1, 5) == 0).all()
    assert (E.refine_propagate(torch.zeros(1, 8, 8), torch.rand(1, 8, 2, generator=g), 0.015, 1) == 0).all()
    for B, P, K in [(0, 5, 3), (2, 0, 3), (2, 5, 0)]:
        assert E.refine_propagate(torch.rand(B, P, P), torch.rand(B, P, K), 0.015, 3).shape == (B, P, K)
        assert E.refine_propagate_qk(torch.rand(B, 2, P, 4), torch.rand(B, 2, P, 4), torch.rand(B, P, K), 0.015, 3,
                                     0.5).shape == (B, P, K)


def _qk_check(q, k, maps, ent, steps, scale):
    out = E.refine_propagate_qk(q, k, maps, ent, steps, scale)
    assert out.dtype == torch.float32 and out.shape == maps.shape
    want = refine_propagate_reference(head_mean_attention(q.double(), k.double(), scale=scale), maps.double(), ent,
                                      steps)
    # T' is held in bf16 on the CUDA path: relative rounding 2^-9 per entry
    torch.testing.assert_close(out.double(), want, rtol=0, atol=2e-2 * want.abs().max().item() + 1e-7)
    return out, want


@given(B=st.integers(1, 2), H=st.integers(1, 3), P=st.integers(1, 33), d=st.integers(1, 16), K=st.integers(1, 3),
       steps=st.integers(0, 3), ent=st.floats(0, 0.2), seed=st.integers(0, 2**31 - 1))
@settings(max_examples=8)
def test_refine_propagate_qk_cuda_kernels_match_reference(B, H, P, d, K, steps, ent, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, P, d, generator=g)
    k = torch.randn(B, H, P, d, generator=g)
    _qk_check(q, k, torch.rand(B, P, K, generator=g), ent, steps, 1.0 / math.sqrt(d))


# Not covered here: the recomputation of the logits in several row blocks (R < P needs
# H * P^2 > 2^21, minutes on the emulator); the row-block kernels themselves run above.


# ---- kl_kmeans ---------------------------------------------------------------------------------


def _kl_compare(x, seeds, iterations, gap_tol=1e-3):
    labels, cents = E.kl_kmeans(x, seeds, iterations)
    B, N, D = x.shape
    assert labels.shape == (B, N) and cents.shape == (B, seeds.shape[0], D)
    rl, rc = kl_kmeans_reference(x.double(), seeds, iterations)
    if torch.equal(labels, rl):
        tol = 1e-10 if x.dtype == torch.float64 else 2e-5
        torch.testing.assert_close(cents.double(), rc, rtol=tol, atol=tol)
        return True
    assert _trajectory_gap(x, seeds, iterations) < gap_tol, "labels differ although the nearest anchor was clear"
    return False


@given(B=st.integers(0, 3), N=st.integers(0, 100), D=st.integers(1, 40), S=st.integers(1, 20),
       iterations=st.integers(1, 8), kind=st.sampled_from(["softmax", "sparse", "uniform"]),
       dtype=st.sampled_from([torch.float32, torch.float64]), seed=st.integers(0, 2**31 - 1))
@settings(max_examples=30)
def test_kl_kmeans_cuda_kernel_matches_reference(B, N, D, S, iterations, kind, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = _data(kind, B, N, D, g).to(dtype)
    seeds = torch.randint(0, max(N, 1), (S,), generator=g) if N else torch.randint(0, 5, (S,), generator=g)
    _kl_compare(x, seeds, iterations)


def test_kl_kmeans_cuda_kernel_exact_cases():
    x = torch.tensor([[[0.9, 0.1], [0.8, 0.2], [0.1, 0.9], [0.2, 0.8]]])
    labels, cents = E.kl_kmeans(x, torch.tensor([0, 0, 2]), 2)  # a duplicate seed dies
    assert labels.tolist() == [[0, 0, 1, 1]]
    torch.testing.assert_close(cents, torch.tensor([[[0.85, 0.15], [0.15, 0.85], [0.0, 0.0]]]))
    # a cluster that empties midway (tests/test_kl_kmeans.py, D = 1)
    x = torch.tensor([7.0, 1.0, 6.0, 2.0, 6.0, 2.0, 3.0]).view(1, 7, 1)
    labels, cents = E.kl_kmeans(x, torch.tensor([0, 2, 1]), 1)
    assert labels.tolist() == [[0, 2, 1, 2, 1, 2, 1]]
    labels, cents = E.kl_kmeans(x, torch.tensor([0, 2, 1]), 3)
    assert labels.tolist() == [[0, 1, 0, 1, 0, 1, 1]]
    torch.testing.assert_close(cents.view(-1), torch.tensor([19.0 / 3, 2.0, 0.0]))
    # clustered data, two images: exact agreement
    g = torch.Generator().manual_seed(11)
    centers = torch.softmax(torch.randn(4, 12, generator=g) * 4, -1)
    which = torch.randint(0, 4, (60,), generator=g).expand(2, 60)
    x = torch.softmax(centers[which].log() + 0.1 * torch.randn(2, 60, 12, generator=g), -1)
    first = [int((which[0] == c).nonzero()[0]) for c in range(4)]
    assert _kl_compare(x, torch.tensor(first + [first[1]]), 4)
    assert E.stats()[4] > 0  # warp shuffles actually executed
    labels, cents = E.kl_kmeans(torch.rand(2, 0, 5), torch.tensor([0, 3]), 4)
    assert labels.shape == (2, 0) and cents.shape == (2, 2, 5) and (cents == 0).all()


# ---- OS threads (the mode the sanitizers use) -------------------------------------------------


def test_every_kernel_in_os_thread_mode():
    """One small case per op with every CUDA thread an OS thread (real concurrency)."""
    E.configure("threads", 5)
    g = torch.Generator().manual_seed(5)
    mask = torch.rand(2, 21, 13, generator=g) < 0.9
    assert torch.equal(E.erode(mask, [3, 5], 2), erode_reference(mask, (3, 5), 2))
    lab = torch.randint(0, 3, (17, 19), generator=g).repeat_interleave(2, 0)
    assert torch.equal(E.erode_labels(lab, [3, 3], 1, 255), erode_labels_reference(lab, 3, 1))
    feats, masks = torch.randn(1, 4, 3, 5, generator=g), torch.rand(1, 2, 11, 17, generator=g)
    torch.testing.assert_close(E.masked_area_pool(feats, masks, True), masked_area_pool_reference(feats, masks),
                               rtol=1e-4, atol=1e-5)
    _knn_check(torch.randn(3, 8, generator=g), torch.randn(40, 8, generator=g), torch.randint(0, 3, (40,)), 5, 3)
    attn, maps = _attention("softmax", 1, 20, g), torch.rand(1, 20, 2, generator=g)
    _assert_as_accurate_as_eager_fp32(E.refine_propagate(attn, maps, 0.015, 2), attn, maps, 0.015, 2)
    _qk_check(torch.randn(1, 2, 20, 4, generator=g), torch.randn(1, 2, 20, 4, generator=g), maps, 0.015, 2, 0.5)
    x = _data("softmax", 1, 20, 6, g)
    _kl_compare(x, torch.tensor([0, 7, 14]), 2)
    launches, blocks, threads, barriers, shuffles = E.stats()
    assert launches >= 10 and barriers > 0 and shuffles > 0
