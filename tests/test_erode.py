import pytest
import torch
from _helpers import assert_raises_naming, torch_threads
from hypothesis import given
from hypothesis import strategies as st

from weakseg.ops import erode, erode_labels, erode_labels_reference, erode_reference


def _random_mask(g, shape, dtype, density):
    m = torch.rand(shape, generator=g) < density
    if dtype == torch.uint8:
        # binary 0/255 masks and general grey values both follow min-filter semantics
        return (m.to(torch.uint8) * 255) if density > 0.5 else torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
    return m


shapes = st.tuples(st.lists(st.integers(0, 3), max_size=2), st.integers(1, 40), st.integers(1, 40))


@given(shape=shapes, kh=st.sampled_from([1, 3, 5, 7, 9]), kw=st.sampled_from([1, 3, 5, 11]),
       iterations=st.integers(0, 4), dtype=st.sampled_from([torch.bool, torch.uint8]),
       density=st.floats(0.3, 0.99), seed=st.integers(0, 2**31 - 1))
def test_erode_matches_reference_cpu(shape, kh, kw, iterations, dtype, density, seed):
    lead, H, W = shape
    g = torch.Generator().manual_seed(seed)
    mask = _random_mask(g, (*lead, H, W), dtype, density)
    out = erode(mask, (kh, kw), iterations)
    ref = erode_reference(mask, (kh, kw), iterations)
    assert out.dtype == mask.dtype and out.shape == mask.shape
    assert torch.equal(out, ref)


def test_erode_device(device):
    g = torch.Generator().manual_seed(0)
    for shape in [(1, 1), (1, 37), (29, 1), (3, 64, 48), (2, 2, 200, 131)]:
        for k, it in [(3, 1), (3, 20), (41, 1), ((5, 9), 2), (1, 3)]:
            mask = torch.rand(shape, generator=g) < 0.9
            out = erode(mask.to(device), k, it).cpu()
            assert torch.equal(out, erode_reference(mask, k, it)), (shape, k, it)


def test_iterations_equal_one_large_window():
    g = torch.Generator().manual_seed(1)
    mask = torch.rand(3, 90, 70, generator=g) < 0.97
    assert torch.equal(erode(mask, 3, 20), erode(mask, 41, 1))
    assert torch.equal(erode(mask, (3, 5), 4), erode(mask, (9, 17), 1))


def test_borders_never_erode():
    mask = torch.ones(7, 9, dtype=torch.bool)
    assert torch.equal(erode(mask, 41), mask)
    mask[3, 4] = False  # one hole erodes its 5x5 neighbourhood only
    out = erode(mask, 5)
    assert out.sum().item() == 63 - 25
    assert not out[1:6, 2:7].any() and out[0].all()


def test_iterations_zero_is_identity():
    mask = torch.rand(10, 10) < 0.5
    assert torch.equal(erode(mask, 3, 0), mask)


def test_huge_windows_saturate(device):
    """A window wider than the image covers all of it, however large kernel_size or iterations are:
    (k // 2) * iterations overflowed int64 in the compiled op (3 // 2 * 2**62 ... = 2**63) and gave garbage."""
    mask = torch.ones(3, 7, 9, dtype=torch.bool)
    mask[0, 6, 2] = mask[1, 0, 5] = mask[1, 1, 8] = False  # plane 2 has no hole
    # radius (3 // 2) * 4 = 4 down the rows, the whole row across: rows 0-1 of plane 0 and row 6
    # of plane 1 are more than 4 rows from every hole
    whole_rows = torch.zeros_like(mask)
    whole_rows[0, :2] = whole_rows[1, 6:] = whole_rows[2] = True
    whole_plane = torch.zeros_like(mask)
    whole_plane[2] = True
    assert torch.equal(erode_reference(mask, (9, 19)), whole_rows)
    m = mask.to(device)
    for kernel, it, expect in [((3, 2**62 + 1), 4, whole_rows), ((3, 2**63 - 1), 4, whole_rows),
                               ((3, 10**30 + 1), 4, whole_rows), (3, 2**62, whole_plane), (3, 2**63 - 1, whole_plane),
                               ((2**61 + 1, 2**61 + 1), 2**40, whole_plane)]:
        assert torch.equal(erode(m, kernel, it).cpu(), expect), (kernel, it)
        assert torch.equal(erode_reference(mask, kernel, it), expect), (kernel, it)
        if max(pair_of(kernel)) < 2**63 and it < 2**63:  # what fits the op's int64 arguments
            assert torch.equal(torch.ops.weakseg.erode(m, pair_of(kernel), it).cpu(), expect), (kernel, it)
    # labels keep their value iff the (vertically widened) whole row agrees: the survivors of the mask
    labels = mask.long() * 3
    expect_labels = torch.where(whole_rows, labels, torch.full_like(labels, 255))
    for out in (erode_labels(labels.to(device), (3, 2**62 + 1), 4).cpu(),
                torch.ops.weakseg.erode_labels(labels.to(device), [3, 2**62 + 1], 4, 255).cpu(),
                erode_labels_reference(labels, (3, 2**62 + 1), 4)):
        assert torch.equal(out, expect_labels)


def pair_of(kernel):
    return [kernel, kernel] if isinstance(kernel, int) else list(kernel)


def test_matches_opencv():
    cv2 = pytest.importorskip("cv2")
    import numpy as np

    rng = np.random.default_rng(0)
    img = (rng.random((123, 157)) < 0.95).astype(np.uint8) * 255
    for k, it in [(3, 1), (3, 20), (7, 3), (41, 1)]:
        ref = cv2.erode(img, np.ones((k, k), np.uint8), iterations=it)
        out = erode(torch.from_numpy(img), k, it).numpy()
        assert np.array_equal(out, ref), (k, it)
    grey = rng.integers(0, 256, (50, 64), dtype=np.uint8)
    assert np.array_equal(erode(torch.from_numpy(grey), (5, 3)).numpy(),
                          cv2.erode(grey, np.ones((5, 3), np.uint8)))


def test_noncontiguous_and_empty(device):
    mask = (torch.rand(40, 30) < 0.9).to(device)
    t = mask.t()
    assert torch.equal(erode(t, 5).cpu(), erode_reference(t.contiguous().cpu(), 5))
    for shape in [(0, 5, 5), (3, 0, 4), (2, 4, 0)]:
        e = torch.zeros(shape, dtype=torch.bool, device=device)
        assert erode(e, 3).shape == e.shape


@pytest.mark.parametrize("bad, exc, words", [
    (lambda: erode(torch.zeros(4, 4), 3), TypeError, ["mask", "bool or uint8"]),
    (lambda: erode(torch.zeros(4, dtype=torch.bool), 3), ValueError, ["mask", "(..., H, W)"]),
    (lambda: erode(torch.zeros(4, 4, dtype=torch.bool), 4), ValueError, ["kernel_size", "odd"]),
    (lambda: erode(torch.zeros(4, 4, dtype=torch.bool), (3, 3, 3)), TypeError, ["kernel_size"]),
    (lambda: erode(torch.zeros(4, 4, dtype=torch.bool), 3, -1), ValueError, ["iterations"]),
    (lambda: erode_labels(torch.zeros(4, 4), 3), TypeError, ["labels", "int64"]),
    (lambda: erode_labels(torch.zeros(4, 4, dtype=torch.uint8), 3, ignore_index=300), ValueError, ["ignore_index"]),
    # a raw "'<=' not supported between int and NoneType" before
    (lambda: erode_labels(torch.zeros(4, 4, dtype=torch.uint8), 3, ignore_index=None), TypeError,
     ["erode_labels", "ignore_index must be an int", "None"]),
    (lambda: erode_labels(torch.zeros(4, 4, dtype=torch.uint8), 3, ignore_index=2.0), TypeError, ["ignore_index"]),
    (lambda: erode(torch.zeros(4, 4, dtype=torch.bool), 3, True), ValueError, ["iterations", "int"]),
])
def test_errors(bad, exc, words):
    assert_raises_naming(bad, exc, words)


def test_compiled_op_checks_inputs():
    with pytest.raises(RuntimeError, match="weakseg.erode: expected mask of dtype bool or uint8"):
        torch.ops.weakseg.erode(torch.zeros(4, 4), [3, 3], 1)
    with pytest.raises(RuntimeError, match="kernel_size must be odd"):
        torch.ops.weakseg.erode(torch.zeros(4, 4, dtype=torch.bool), [2, 3], 1)
    with pytest.raises(RuntimeError, match="weakseg.erode_labels: expected labels of dtype"):
        torch.ops.weakseg.erode_labels(torch.zeros(4, 4), [3, 3], 1, 255)


# ---- erode_labels -------------------------------------------------------------------------------

def _blocky_labels(lead, H, W, nlab, dtype, g):
    """Blocky label maps (so that some labels survive erosion) with ~2% of the pixels set to 255."""
    small = torch.randint(0, nlab, (*lead, max(1, H // 6), max(1, W // 6)), generator=g)
    lab = torch.nn.functional.interpolate(small.reshape(-1, 1, *small.shape[-2:]).float(), size=(H, W),
                                          mode="nearest").reshape(*lead, H, W).to(dtype)
    if lab.numel():
        lab.view(-1)[torch.randint(0, lab.numel(), (max(1, lab.numel() // 50),), generator=g)] = 255
    return lab


@given(shape=shapes, k=st.sampled_from([1, 3, 5, 9]), iterations=st.integers(0, 3),
       dtype=st.sampled_from([torch.int64, torch.int32, torch.uint8]), nlab=st.integers(1, 5),
       seed=st.integers(0, 2**31 - 1))
def test_erode_labels_matches_reference_cpu(shape, k, iterations, dtype, nlab, seed):
    lead, H, W = shape
    lab = _blocky_labels(lead, H, W, nlab, dtype, torch.Generator().manual_seed(seed))
    out = erode_labels(lab, k, iterations)
    ref = erode_labels_reference(lab, k, iterations)
    assert out.dtype == lab.dtype
    assert torch.equal(out, ref)


def test_erode_labels_device(device):
    g = torch.Generator().manual_seed(3)
    for shape in [(1, 1), (5, 1), (2, 64, 80), (130, 257)]:
        small = torch.randint(0, 4, (*shape[:-2], max(1, shape[-2] // 8), max(1, shape[-1] // 8)), generator=g)
        lab = torch.nn.functional.interpolate(small.reshape(-1, 1, *small.shape[-2:]).float(), size=shape[-2:],
                                              mode="nearest").reshape(shape).long()
        for k, it, ign in [(3, 20, 255), (5, 1, -1), (1, 1, 255)]:
            out = erode_labels(lab.to(device), k, it, ign).cpu()
            assert torch.equal(out, erode_labels_reference(lab, k, it, ign)), (shape, k, it)


def test_erode_labels_is_per_class_erosion():
    """ModuSeg's SBP: eroding each class mask with erode (borders not eroded) and
    painting the survivors gives exactly erode_labels."""
    g = torch.Generator().manual_seed(7)
    small = torch.randint(0, 4, (6, 8), generator=g)
    lab = small.repeat_interleave(15, 0).repeat_interleave(13, 1)
    out = erode_labels(lab, 3, 5)
    expect = torch.full_like(lab, 255)
    for c in range(4):
        keep = erode(lab == c, 3, 5)
        expect[keep] = c
    assert torch.equal(out, expect)
    assert (out != 255).any() and (out == 255).any()


def test_opcheck(device):
    mask = (torch.rand(2, 17, 23) < 0.8).to(device)
    torch.library.opcheck(torch.ops.weakseg.erode.default, (mask, [3, 5], 2))
    lab = torch.randint(0, 3, (2, 17, 23), device=device)
    torch.library.opcheck(torch.ops.weakseg.erode_labels.default, (lab, [3, 3], 2, 255))


# ---- the CPU kernel's paths (issue 20) -----------------------------------------------------------


@given(lead=st.integers(1, 3), H=st.integers(1, 90), W=st.integers(1, 90),
       kh=st.integers(0, 35).map(lambda r: 2 * r + 1), kw=st.integers(0, 35).map(lambda r: 2 * r + 1),
       threads=st.sampled_from([1, 2]), density=st.floats(0.9, 1.0), seed=st.integers(0, 2**31 - 1))
def test_erode_windows_of_every_size(lead, H, W, kh, kw, threads, density, seed):
    """Windows 1..71 on each axis (direct minima up to 3 rows / columns, the streaming van Herk pass
    and the doubling steps beyond, windows past the plane), on grey and binary planes."""
    g = torch.Generator().manual_seed(seed)
    grey = torch.randint(0, 256, (lead, H, W), generator=g, dtype=torch.uint8)
    binary = torch.rand(lead, H, W, generator=g) < density
    with torch_threads(threads):
        for m in (grey, binary):
            assert torch.equal(erode(m, (kh, kw)), erode_reference(m, (kh, kw)))


@given(lead=st.integers(1, 2), H=st.integers(1, 70), W=st.integers(1, 70),
       kh=st.integers(0, 25).map(lambda r: 2 * r + 1), kw=st.integers(0, 25).map(lambda r: 2 * r + 1),
       dtype=st.sampled_from([torch.int64, torch.int32, torch.uint8]), nlab=st.integers(1, 4),
       threads=st.sampled_from([1, 2]), seed=st.integers(0, 2**31 - 1))
def test_erode_labels_windows_of_every_size(lead, H, W, kh, kw, dtype, nlab, threads, seed):
    """erode_labels runs two min filters of "equal neighbour" maps with even-sized windows (the pairs
    inside a window): every window shape, 1-pixel planes, rows and columns."""
    lab = _blocky_labels((lead,), H, W, nlab, dtype, torch.Generator().manual_seed(seed))
    with torch_threads(threads):
        assert torch.equal(erode_labels(lab, (kh, kw)), erode_labels_reference(lab, (kh, kw)))


@pytest.mark.parametrize("shape, k, it", [((1, 700, 650), 3, 1), ((1, 700, 650), 41, 1), ((1, 517, 600), (5, 3), 20),
                                          ((1, 530, 515), (1, 9), 1), ((3, 300, 310), 41, 1), ((2, 1, 1200), 7, 1)])
def test_erode_large_planes_in_parallel(shape, k, it):
    """Planes big enough to be split into row bands across threads (and a few whole planes per thread)."""
    g = torch.Generator().manual_seed(sum(shape))
    mask = torch.rand(shape, generator=g) < 0.995
    for threads in (1, 2):
        with torch_threads(threads):
            assert torch.equal(erode(mask, k, it), erode_reference(mask, k, it)), threads


@pytest.mark.parametrize("shape, k, it", [((1, 600, 620), 3, 20), ((4, 256, 250), (3, 5), 6), ((1, 513, 700), 1, 1)])
def test_erode_labels_large_planes_in_parallel(shape, k, it):
    g = torch.Generator().manual_seed(1)
    small = torch.randint(0, 21, (shape[0], 1, max(1, shape[1] // 64), max(1, shape[2] // 64)), generator=g)
    lab = torch.nn.functional.interpolate(small.float(), size=shape[1:], mode="nearest")[:, 0].long()
    lab[:, ::97, ::89] = 7  # isolated pixels
    for threads in (1, 2):
        with torch_threads(threads):
            out = erode_labels(lab, k, it)
            assert torch.equal(out, erode_labels_reference(lab, k, it)), threads
            assert (out != 255).any()
