import pytest
import torch
from _helpers import assert_raises_naming
from hypothesis import given, settings
from hypothesis import strategies as st

from weakseg.ops import kl_kmeans, kl_kmeans_reference

EPS = 1e-5


def _kl(p, a):
    """(N, A) symmetric KL between the rows of p (N, D) and a (A, D), float64, clamped at EPS."""
    p, a = p.double().clamp_min(EPS), a.double().clamp_min(EPS)
    return 0.5 * ((p[:, None] - a[None]) * (p.log()[:, None] - a.log()[None])).sum(-1)


def _trajectory_gap(x, seeds, iterations):
    """Smallest float64 gap, over every point and iteration of the Lloyd trajectory, between
    a point's nearest and second-nearest alive anchor (distinct anchor values only: an exact
    duplicate loses every tie by rule, on every backend). Small gap = a near-tie that float32
    rounding may resolve either way."""
    x = x.double()
    gap = float("inf")
    for b in range(x.shape[0]):
        pts = x[b]
        anchors = pts[seeds.long()]
        for _ in range(iterations):
            d = _kl(pts, torch.unique(anchors, dim=0))
            if d.shape[1] > 1:
                two = d.topk(2, dim=1, largest=False).values
                gap = min(gap, (two[:, 1] - two[:, 0]).min().item())
            assign = _kl(pts, anchors).argmin(1)
            keep = [j for j in range(anchors.shape[0]) if (assign == j).any()]
            anchors = torch.stack([pts[assign == j].mean(0) for j in keep])
    return gap


def _data(kind, B, N, D, g):
    if kind == "softmax":  # clustered distributions, like attention maps
        K = 1 + int(torch.randint(0, 6, (1,), generator=g))
        centers = torch.randn(K, D, generator=g) * 3
        which = torch.randint(0, K, (B, N), generator=g)
        return torch.softmax(centers[which] + 0.3 * torch.randn(B, N, D, generator=g), dim=-1)
    if kind == "sparse":  # exact zeros (clamped to eps inside)
        x = torch.rand(B, N, D, generator=g) * (torch.rand(B, N, D, generator=g) < 0.3)
        return x / x.sum(-1, keepdim=True).clamp_min(1e-3)
    return torch.rand(B, N, D, generator=g)  # unnormalised non-negative values


def _compare(x, seeds, iterations, device="cpu", gap_tol=1e-3):
    """Compiled op on ``x`` vs the float64 reference; a disagreement is only allowed where the
    float64 trajectory had a near-tie. Returns whether the outputs agreed."""
    labels, cents = kl_kmeans(x.to(device), seeds.to(device), iterations)
    B, N, D = x.shape
    S = seeds.shape[0]
    assert labels.dtype == torch.int64 and labels.shape == (B, N)
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    assert cents.dtype == cdt and cents.shape == (B, S, D)
    labels, cents = labels.cpu(), cents.cpu()
    rl, rc = kl_kmeans_reference(x.double(), seeds, iterations)
    # structural invariants hold whatever the rounding: contiguous labels, zero rows past n_b
    for b in range(B):
        n_b = int(labels[b].max()) + 1 if N else 0
        assert n_b <= S and set(labels[b].tolist()) == set(range(n_b))
        assert (cents[b, n_b:] == 0).all()
    if torch.equal(labels, rl):
        tol = 1e-10 if cdt == torch.float64 else 2e-5
        torch.testing.assert_close(cents.double(), rc, rtol=tol, atol=tol)
        return True
    gap = _trajectory_gap(x, seeds, iterations)
    assert gap < gap_tol, f"labels differ from the reference although the nearest anchor was clear (gap {gap})"
    return False


@given(B=st.integers(0, 3), N=st.integers(0, 300), D=st.integers(1, 80), S=st.integers(1, 40),
       iterations=st.integers(1, 20), kind=st.sampled_from(["softmax", "sparse", "uniform"]),
       seed=st.integers(0, 2**31 - 1))
@settings(max_examples=40)
def test_matches_reference_cpu(B, N, D, S, iterations, kind, seed):
    g = torch.Generator().manual_seed(seed)
    x = _data(kind, B, N, D, g)
    seeds = torch.randint(0, max(N, 1), (S,), generator=g) if N else torch.randint(0, 5, (S,), generator=g)
    _compare(x, seeds, iterations)


def test_reference_matches_independent_float64_loop():
    g = torch.Generator().manual_seed(4)
    x = _data("softmax", 2, 120, 12, g).double()
    seeds = torch.tensor([0, 5, 5, 17, 90, 33, 2, 100])
    rl, rc = kl_kmeans_reference(x, seeds, 6)
    for b in range(2):  # a plain Python re-implementation, written differently
        pts = x[b]
        anchors = [pts[s] for s in seeds.tolist()]
        for _ in range(6):
            assign = [min(range(len(anchors)), key=lambda j: (_kl(p[None], anchors[j][None]).item(), j)) for p in pts]
            groups = [[i for i, a in enumerate(assign) if a == j] for j in range(len(anchors))]
            keep = [j for j in range(len(anchors)) if groups[j]]
            anchors = [pts[groups[j]].mean(0) for j in keep]
            assign = [keep.index(a) for a in assign]
        assert rl[b].tolist() == assign
        torch.testing.assert_close(rc[b, : len(anchors)], torch.stack(anchors), rtol=1e-12, atol=1e-12)
        assert (rc[b, len(anchors):] == 0).all()


def test_clustered_inputs_agree_exactly(device):
    # well-separated clusters: the comparison above must not pass vacuously
    g = torch.Generator().manual_seed(11)
    centers = torch.softmax(torch.randn(6, 24, generator=g) * 4, -1)
    which = torch.randint(0, 6, (250,), generator=g).expand(2, 250)
    x = torch.softmax(centers[which].log() + 0.1 * torch.randn(2, 250, 24, generator=g), -1)
    # one seed in each cluster of image 0 (its first member), plus a duplicate
    first = [int((which[0] == k).nonzero()[0]) for k in range(6)]
    seeds = torch.tensor(first + [first[2]])
    assert _trajectory_gap(x, seeds, 8) > 1e-3
    assert _compare(x, seeds, 8, device)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_dtypes(device, dtype):
    g = torch.Generator().manual_seed(5)
    x = _data("softmax", 2, 150, 16, g).to(dtype)
    seeds = torch.arange(0, 150, 13)
    labels, cents = kl_kmeans(x.to(device), seeds.to(device), 5)
    assert cents.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    # fp16/bf16 input is upcast first: the same as clustering the upcast values
    _compare(x.double() if dtype == torch.float64 else x.float(), seeds, 5, device)
    l2, c2 = kl_kmeans(x.to(device).float(), seeds.to(device), 5)
    if dtype != torch.float64:
        assert torch.equal(labels, l2) and torch.equal(cents, c2)


# ------------------------------------------------------------------------------------------
# exact cases on hand-made data

def _two_clusters(device, dtype=torch.float32):
    return torch.tensor([[[0.9, 0.1], [0.8, 0.2], [0.1, 0.9], [0.2, 0.8]]], dtype=dtype, device=device)


def test_two_obvious_clusters(device):
    x = _two_clusters(device)
    labels, cents = kl_kmeans(x, torch.tensor([0, 2], device=device), 3)
    assert labels.cpu().tolist() == [[0, 0, 1, 1]]
    torch.testing.assert_close(cents.cpu(), torch.tensor([[[0.85, 0.15], [0.15, 0.85]]]))


def test_duplicate_seeds_are_dropped(device):
    x = _two_clusters(device)
    labels, cents = kl_kmeans(x, torch.tensor([0, 0, 2], device=device), 2)
    assert labels.cpu().tolist() == [[0, 0, 1, 1]]
    torch.testing.assert_close(cents.cpu(), torch.tensor([[[0.85, 0.15], [0.15, 0.85], [0.0, 0.0]]]))
    # relabelling follows the original anchor order, not the point order
    labels, cents = kl_kmeans(x, torch.tensor([2, 0, 2], device=device, dtype=torch.int32), 1)
    assert labels.cpu().tolist() == [[1, 1, 0, 0]]
    torch.testing.assert_close(cents.cpu(), torch.tensor([[[0.15, 0.85], [0.85, 0.15], [0.0, 0.0]]]))


def test_cluster_empties_midway_d1(device):
    # D = 1, d(a, b) = ½(a − b) ln(a / b). Anchors 7, 6, 1 (seeds 0, 2, 1):
    # iteration 1: {7} | {6, 6, 3} | {1, 2, 2}  -> anchors 7, 5, 5/3
    # iteration 2: 6 is nearer 7 than 5, 3 nearer 5/3 than 5: anchor 1 empties and dies
    #              {7, 6, 6} | {1, 2, 2, 3}    -> 19/3, 2 (stable afterwards)
    x = torch.tensor([7.0, 1.0, 6.0, 2.0, 6.0, 2.0, 3.0], device=device).view(1, 7, 1)
    seeds = torch.tensor([0, 2, 1], device=device)
    labels, cents = kl_kmeans(x, seeds, 1)
    assert labels.cpu().tolist() == [[0, 2, 1, 2, 1, 2, 1]]
    torch.testing.assert_close(cents.cpu().view(-1), torch.tensor([7.0, 5.0, 5.0 / 3]))
    for it in (2, 3, 10):
        labels, cents = kl_kmeans(x, seeds, it)
        assert labels.cpu().tolist() == [[0, 1, 0, 1, 0, 1, 1]]
        torch.testing.assert_close(cents.cpu().view(-1), torch.tensor([19.0 / 3, 2.0, 0.0]))
        assert cents[0, 2].item() == 0.0


def test_batch_elements_are_independent(device):
    g = torch.Generator().manual_seed(3)
    x = _data("softmax", 3, 90, 10, g).to(device)
    seeds = torch.tensor([1, 30, 60, 89], device=device)
    labels, cents = kl_kmeans(x, seeds, 7)
    for b in range(3):
        lb, cb = kl_kmeans(x[b:b + 1], seeds, 7)
        assert torch.equal(labels[b:b + 1], lb)
        torch.testing.assert_close(cents[b:b + 1], cb)


def test_iterations_1_is_one_lloyd_step(device):
    g = torch.Generator().manual_seed(6)
    x = _data("sparse", 1, 200, 20, g)
    seeds = torch.tensor([3, 50, 120, 199, 7])
    assert _trajectory_gap(x, seeds, 1) > 1e-3
    labels, cents = kl_kmeans(x.to(device), seeds.to(device), 1)
    assign = _kl(x[0], x[0, seeds]).argmin(1)  # nearest seed row
    alive = torch.bincount(assign, minlength=5) > 0
    relabel = alive.cumsum(0) - 1
    assert labels.cpu()[0].tolist() == relabel[assign].tolist()
    means = torch.stack([x[0][assign == j].mean(0) for j in range(5) if alive[j]])
    torch.testing.assert_close(cents.cpu()[0, : len(means)], means)
    assert (cents.cpu()[0, len(means):] == 0).all()


def test_negative_and_zero_entries_act_as_eps(device):
    g = torch.Generator().manual_seed(8)
    x = _data("sparse", 1, 60, 6, g)
    seeds = torch.tensor([0, 20, 40])
    neg = x.clone()
    neg[x == 0] = -torch.rand(int((x == 0).sum()), generator=g)  # negatives clamp to eps too
    # the first assignment sees only clamped values; the means then use the raw rows
    l0, _ = kl_kmeans(x.to(device), seeds.to(device), 1)
    l1, c1 = kl_kmeans(neg.to(device), seeds.to(device), 1)
    assert torch.equal(l0, l1)
    rl, rc = kl_kmeans_reference(neg.double(), seeds, 1)
    torch.testing.assert_close(c1.cpu().double(), rc, rtol=2e-5, atol=2e-5)
    assert (c1 < 0).any()  # raw (negative) entries enter the means
    l1, c1 = kl_kmeans(neg.to(device), seeds.to(device), 4)
    rl, rc = kl_kmeans_reference(neg.double(), seeds, 4)
    assert torch.equal(l1.cpu(), rl)
    torch.testing.assert_close(c1.cpu().double(), rc, rtol=2e-5, atol=2e-5)


def test_empty_and_degenerate(device):
    labels, cents = kl_kmeans(torch.rand(2, 0, 5, device=device), torch.tensor([0, 3], device=device), 4)
    assert labels.shape == (2, 0) and cents.shape == (2, 2, 5) and (cents == 0).all()
    labels, cents = kl_kmeans(torch.rand(2, 0, 5, device=device), torch.zeros(0, dtype=torch.long, device=device), 1)
    assert labels.shape == (2, 0) and cents.shape == (2, 0, 5)
    labels, cents = kl_kmeans(torch.rand(0, 7, 5, device=device), torch.tensor([1], device=device), 3)
    assert labels.shape == (0, 7) and cents.shape == (0, 1, 5)
    # one point, several (duplicate) seeds
    x = torch.tensor([[[0.2, 0.0, 0.8]]], device=device)
    labels, cents = kl_kmeans(x, torch.tensor([0, 0, 0], device=device), 5)
    assert labels.cpu().tolist() == [[0]]
    assert torch.equal(cents.cpu(), torch.tensor([[[0.2, 0.0, 0.8], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]]))
    # D = 1 and a single seed: one cluster, the mean
    x = torch.rand(1, 9, 1, generator=torch.Generator().manual_seed(1)).to(device)
    labels, cents = kl_kmeans(x, torch.tensor([4], device=device), 2)
    assert (labels == 0).all()
    torch.testing.assert_close(cents[0, 0], x[0].mean(0))


def test_non_contiguous_input(device):
    g = torch.Generator().manual_seed(12)
    x = _data("softmax", 2, 64, 9, g).transpose(0, 1).contiguous().transpose(0, 1)
    assert not x.is_contiguous()
    seeds = torch.tensor([0, 16, 32, 48])
    l0, c0 = kl_kmeans(x.to(device), seeds.to(device), 4)
    l1, c1 = kl_kmeans(x.contiguous().to(device), seeds.to(device), 4)
    assert torch.equal(l0, l1) and torch.equal(c0, c1)


# ------------------------------------------------------------------------------------------
# the methods' shapes

def _grid_seeds(side, step, stop):
    rows = torch.arange(0, stop, step)
    return (rows[:, None] * side + rows[None, :]).reshape(-1)


def _map_data(B, side, D, seeds, g, noise=0.3):
    """Per-pixel distributions of a side x side map made of regions around the seed pixels
    (each pixel takes the region of its nearest seed): attention-like inputs whose clusters
    are clear, so the compiled op must agree with the float64 reference exactly."""
    yy, xx = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    pos = torch.stack([yy.reshape(-1), xx.reshape(-1)], 1).float()
    region = torch.cdist(pos, pos[seeds]).argmin(1)  # (side*side,)
    centers = torch.randn(B, seeds.numel(), D, generator=g) * 3
    logits = centers[:, region] + noise * torch.randn(B, side * side, D, generator=g)
    return torch.softmax(logits, -1)


def test_iseg_shape(device):
    # iSeg: per-pixel 77-d token vectors of a 64x64 map, 6x6 grid seeds (0, 11, ..., 55), 20 iterations
    seeds = _grid_seeds(64, 11, 64)
    assert seeds.numel() == 36
    x = _map_data(1, 64, 77, seeds, torch.Generator().manual_seed(21))
    assert _compare(x, seeds, 20, device)


def test_diclip_shape(device):
    # DiCLIP ACR: 400 tokens with 400-d columns of the chained attention, {0,6,12,18}^2 anchors, 5 iterations
    seeds = _grid_seeds(20, 6, 20)
    assert seeds.numel() == 16
    x = _map_data(4, 20, 400, seeds, torch.Generator().manual_seed(22))
    assert _compare(x, seeds, 5, device)


def test_overlapping_regions_near_ties_only(device):
    # less separated regions and random extra seeds: any disagreement must come from a near-tie
    g = torch.Generator().manual_seed(23)
    seeds = _grid_seeds(32, 8, 32)
    x = _map_data(2, 32, 20, seeds, g, noise=2.0)
    _compare(x, torch.cat([seeds, torch.randint(0, 1024, (8,), generator=g)]), 10, device)


# ------------------------------------------------------------------------------------------
# errors and the compiled op itself

@pytest.mark.parametrize("bad, exc, words", [
    (lambda: kl_kmeans(torch.rand(4, 3), torch.tensor([0]), 1), ValueError, ["x", "(B, N, D)"]),
    (lambda: kl_kmeans(torch.randint(0, 3, (1, 4, 3)), torch.tensor([0]), 1), TypeError, ["x", "floating"]),
    (lambda: kl_kmeans(torch.rand(1, 4, 3), torch.tensor([[0]]), 1), ValueError, ["seeds", "(S,)"]),
    (lambda: kl_kmeans(torch.rand(1, 4, 3), torch.tensor([0.0]), 1), TypeError, ["seeds", "int64"]),
    (lambda: kl_kmeans(torch.rand(1, 4, 3), torch.zeros(0, dtype=torch.long), 1), ValueError, ["seeds", "empty"]),
    (lambda: kl_kmeans(torch.rand(1, 4, 3), torch.tensor([0, 4]), 1), ValueError, ["seeds", "[0, N=4)", "[0, 4]"]),
    (lambda: kl_kmeans(torch.rand(1, 4, 3), torch.tensor([-1, 2]), 1), ValueError, ["seeds", "[0, N=4)", "[-1, 2]"]),
    (lambda: kl_kmeans(torch.rand(1, 4, 3), torch.tensor([0]), 0), ValueError, ["iterations", ">= 1"]),
    (lambda: kl_kmeans(torch.rand(1, 4, 3), torch.tensor([0]), 2.0), ValueError, ["iterations", "int"]),
    (lambda: kl_kmeans(torch.rand(1, 4, 3), torch.tensor([0], device="meta"), 1), ValueError, ["same device"]),
    (lambda: kl_kmeans(torch.rand(1, 4, 3).numpy(), torch.tensor([0]), 1), TypeError, ["x", "tensor"]),
])
def test_errors(bad, exc, words):
    assert_raises_naming(bad, exc, words)


@pytest.mark.parametrize("args, words", [
    ((torch.rand(4, 3), torch.tensor([0]), 1), ["x", "(B, N, D)"]),
    ((torch.randint(0, 3, (1, 4, 3)), torch.tensor([0]), 1), ["floating-point x"]),
    ((torch.rand(1, 4, 3), torch.tensor([[0]]), 1), ["seeds of shape (S,)"]),
    ((torch.rand(1, 4, 3), torch.tensor([0.0]), 1), ["seeds of dtype int64 or int32"]),
    ((torch.rand(1, 4, 3), torch.zeros(0, dtype=torch.long), 1), ["seeds must not be empty"]),
    ((torch.rand(1, 4, 3), torch.tensor([0, 4]), 1), ["seeds must lie in [0, N=4)", "[0, 4]"]),
    ((torch.rand(1, 4, 3), torch.tensor([0]), 0), ["iterations must be >= 1"]),
])
def test_compiled_op_checks_inputs(args, words):
    words = ["weakseg.kl_kmeans:"] + words
    assert_raises_naming(lambda: torch.ops.weakseg.kl_kmeans(*args), RuntimeError, words)


@pytest.mark.cuda
def test_compiled_op_device_mismatch(device):
    if device != "cuda":
        pytest.skip("needs two devices")
    assert_raises_naming(lambda: torch.ops.weakseg.kl_kmeans(torch.rand(1, 4, 3, device="cuda"), torch.tensor([0]), 1),
                         RuntimeError, ["weakseg.kl_kmeans:", "same device"])
    assert_raises_naming(lambda: kl_kmeans(torch.rand(1, 4, 3, device="cuda"), torch.tensor([0]), 1),
                         ValueError, ["same device"])


def test_opcheck(device):
    g = torch.Generator().manual_seed(9)
    for x, seeds in [(_data("softmax", 2, 50, 7, g), torch.tensor([0, 10, 10, 49])),
                     (_data("sparse", 1, 30, 5, g).double(), torch.tensor([3, 1], dtype=torch.int32))]:
        torch.library.opcheck(torch.ops.weakseg.kl_kmeans.default, (x.to(device), seeds.to(device), 3))
