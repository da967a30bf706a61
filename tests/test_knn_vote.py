import pytest
import torch
from _helpers import assert_raises_naming, torch_threads
from hypothesis import given, settings
from hypothesis import strategies as st

from weakseg.ops import knn_vote, knn_vote_reference
from weakseg.ops.knn_vote import MAX_CLASSES


def _unambiguous(queries, bank, bank_labels, k, num_classes, margin=1e-4):
    """Queries whose result cannot depend on float32 rounding: a clear gap between the
    k-th and (k+1)-th similarity, and a winner clear of the runner-up's vote sum."""
    q = torch.nn.functional.normalize(queries.double(), dim=1)
    b = torch.nn.functional.normalize(bank.double(), dim=1)
    sims = q @ b.T
    N = bank.shape[0]
    k = min(k, N)
    if k == 0:
        return torch.ones(queries.shape[0], dtype=torch.bool)
    vals, idx = sims.sort(dim=1, descending=True, stable=True)
    ok = torch.ones(queries.shape[0], dtype=torch.bool)
    if k < N:
        ok &= (vals[:, k - 1] - vals[:, k]) > margin
    lab = bank_labels[idx[:, :k]]
    votes = torch.zeros(queries.shape[0], num_classes, dtype=torch.long).scatter_add_(1, lab, torch.ones_like(lab))
    sums = torch.zeros(queries.shape[0], num_classes, dtype=torch.float64).scatter_add_(1, lab, vals[:, :k])
    top = votes.max(1, keepdim=True).values
    tied = (votes == top)
    s = torch.where(tied, sums, torch.full_like(sums, -1e9))
    s = torch.cat([s, torch.full_like(s[:, :1], -1e9)], 1).sort(1, descending=True).values
    ok &= (tied.sum(1) == 1) | ((s[:, 0] - s[:, 1]) > margin)
    return ok


def _check_against_reference(queries, bank, bank_labels, k, C, device="cpu"):
    labels, conf, votes = knn_vote(queries.to(device), bank.to(device), bank_labels.to(device), k, C)
    rl, rc, rv = knn_vote_reference(queries, bank, bank_labels, k, C)
    labels, conf, votes = labels.cpu(), conf.cpu(), votes.cpu()
    assert labels.dtype == torch.int64 and votes.dtype == torch.int64 and conf.dtype == torch.float32
    assert votes.shape == (queries.shape[0], C)
    assert (votes.sum(1) == min(k, bank.shape[0])).all()
    assert torch.isfinite(conf).all()
    ok = _unambiguous(queries, bank, bank_labels, k, C)
    assert torch.equal(labels[ok], rl[ok])
    assert torch.equal(votes[ok], rv[ok])
    torch.testing.assert_close(conf[ok], rc[ok], rtol=1e-5, atol=1e-5)
    return ok


@given(Q=st.integers(0, 20), N=st.integers(0, 60), D=st.integers(1, 16), k=st.integers(1, 70),
       C=st.integers(1, 6), seed=st.integers(0, 2**31 - 1))
def test_matches_reference_cpu(Q, N, D, k, C, seed):
    g = torch.Generator().manual_seed(seed)
    queries = torch.randn(Q, D, generator=g)
    bank = torch.randn(N, D, generator=g)
    bank_labels = torch.randint(0, C, (N,), generator=g)
    _check_against_reference(queries, bank, bank_labels, k, C)


def test_many_tiles_and_devices(device):
    g = torch.Generator().manual_seed(0)
    for Q, N, D, k, C in [(37, 10000, 32, 25, 21), (1, 9000, 64, 1, 3), (5, 5000, 8, 200, 7), (300, 1500, 128, 25, 81)]:
        queries = torch.randn(Q, D, generator=g)
        bank = torch.randn(N, D, generator=g) * torch.rand(N, 1, generator=g) * 10  # normalisation matters
        bank_labels = torch.randint(0, C, (N,), generator=g)
        ok = _check_against_reference(queries, bank, bank_labels, k, C, device)
        assert ok.float().mean() > 0.5


def test_empty_bank_and_queries(device):
    labels, conf, votes = knn_vote(torch.randn(4, 8, device=device), torch.zeros(0, 8, device=device),
                                   torch.zeros(0, dtype=torch.long, device=device), 25, 3)
    assert labels.tolist() == [-1] * 4 and conf.tolist() == [0.0] * 4 and votes.sum().item() == 0
    labels, conf, votes = knn_vote(torch.zeros(0, 8, device=device), torch.randn(5, 8, device=device),
                                   torch.zeros(5, dtype=torch.long, device=device), 3, 2)
    assert labels.shape == (0,) and votes.shape == (0, 2)


def test_k_larger_than_bank_uses_all_rows(device):
    bank = torch.eye(3, device=device)
    lab = torch.tensor([0, 1, 1], device=device)
    labels, conf, votes = knn_vote(torch.tensor([[1.0, 0.0, 0.0]], device=device), bank, lab, 25, 2)
    assert votes.cpu().tolist() == [[1, 2]] and labels.item() == 1
    assert conf.item() == pytest.approx(0.0)


def test_tie_rules_exact(device):
    # one-hot bank: similarities are exactly 1 or 0
    bank = torch.tensor([[1.0, 0], [1.0, 0], [0, 1.0], [1.0, 0], [0, 1.0], [0, 1.0]], device=device)
    lab = torch.tensor([2, 1, 0, 1, 0, 0], device=device)
    q = torch.tensor([[1.0, 0]], device=device)
    # equal similarities rank the smaller bank index first: rows 0, 1 are the top-2 of {0, 1, 3}
    labels, conf, votes = knn_vote(q, bank, lab, 2, 3)
    assert votes.cpu().tolist() == [[0, 1, 1]]
    # a vote tie with equal sums goes to the smaller class id
    assert labels.item() == 1 and conf.item() == 1.0
    # 3 voters: rows 0,1,3 (sims 1): class 1 has 2 votes and wins
    labels, conf, votes = knn_vote(q, bank, lab, 3, 3)
    assert labels.item() == 1 and votes.cpu().tolist() == [[0, 2, 1]]
    # equal votes, larger similarity sum wins over the smaller id
    bank2 = torch.tensor([[1.0, 0], [0.6, 0.8], [0.8, 0.6], [0.0, 1.0]], device=device)
    lab2 = torch.tensor([1, 0, 0, 1], device=device)
    labels, conf, votes = knn_vote(q, bank2, lab2, 4, 2)
    # class 0: 0.6 + 0.8 = 1.4 ; class 1: 1.0 + 0.0 = 1.0
    assert labels.item() == 0 and votes.cpu().tolist() == [[2, 2]]
    assert conf.item() == pytest.approx(0.7)


def test_zero_query_is_finite(device):
    labels, conf, votes = knn_vote(torch.zeros(2, 4, device=device), torch.randn(6, 4, device=device),
                                   torch.arange(6, device=device) % 3, 3, 3)
    assert torch.isfinite(conf).all() and (labels == 0).all()  # all similarities 0: smallest index wins ties


def test_matches_faiss_flat_ip():
    faiss = pytest.importorskip("faiss")
    g = torch.Generator().manual_seed(2)
    q = torch.nn.functional.normalize(torch.randn(50, 32, generator=g), dim=1)
    b = torch.nn.functional.normalize(torch.randn(3000, 32, generator=g), dim=1)
    bl = torch.randint(0, 5, (3000,), generator=g)
    index = faiss.IndexFlatIP(32)
    index.add(b.numpy())
    D, I = index.search(q.numpy(), 25)
    votes = torch.zeros(50, 5, dtype=torch.long).scatter_add_(1, bl[torch.from_numpy(I)], torch.ones(50, 25, dtype=torch.long))
    ok = _unambiguous(q, b, bl, 25, 5)
    _, _, ours = knn_vote(q, b, bl, 25, 5)
    assert torch.equal(ours[ok], votes[ok]) and ok.float().mean() > 0.8


@pytest.mark.parametrize("bad, exc, words", [
    (lambda: knn_vote(torch.randn(3), torch.randn(4, 3), torch.zeros(4, dtype=torch.long), 2, 2), ValueError, ["queries", "(Q, D)"]),
    (lambda: knn_vote(torch.randn(2, 3), torch.randn(4, 5), torch.zeros(4, dtype=torch.long), 2, 2), ValueError, ["feature size D"]),
    (lambda: knn_vote(torch.randn(2, 3), torch.randn(4, 3), torch.zeros(3, dtype=torch.long), 2, 2), ValueError, ["bank_labels", "one label per bank row"]),
    (lambda: knn_vote(torch.randn(2, 3), torch.randn(4, 3), torch.zeros(4), 2, 2), TypeError, ["bank_labels", "int64"]),
    (lambda: knn_vote(torch.randn(2, 3), torch.randn(4, 3), torch.full((4,), 5), 2, 2), ValueError, ["num_classes=2", "[5, 5]"]),
    (lambda: knn_vote(torch.randn(2, 3), torch.randn(4, 3), torch.zeros(4, dtype=torch.long), 0, 2), ValueError, ["k must be"]),
    (lambda: knn_vote(torch.randn(2, 3), torch.randn(4, 3), torch.zeros(4, dtype=torch.long), 2, 0), ValueError, ["num_classes"]),
    (lambda: knn_vote(torch.randint(0, 3, (2, 3)), torch.randn(4, 3), torch.zeros(4, dtype=torch.long), 2, 2), TypeError, ["queries"]),
    # issue 25.10: 2**31 + 5 classes got the process killed allocating the votes
    (lambda: knn_vote(torch.randn(2, 3), torch.randn(4, 3), torch.zeros(4, dtype=torch.long), 2, 2**31 + 5), ValueError,
     ["num_classes must be an int in [1, 65536]", str(2**31 + 5)]),
    (lambda: knn_vote(torch.randn(2, 3), torch.randn(4, 3), torch.zeros(4, dtype=torch.long), 2, MAX_CLASSES + 1),
     ValueError, ["num_classes", "65536"]),
    (lambda: knn_vote(torch.randn(2, 3), torch.randn(4, 3), torch.zeros(4, dtype=torch.long), 2, True), ValueError,
     ["num_classes", "True"]),
])
def test_errors(bad, exc, words):
    assert_raises_naming(bad, exc, words)


def test_compiled_op_checks_inputs():
    with pytest.raises(RuntimeError, match="weakseg.knn_vote: bank_labels must lie in"):
        torch.ops.weakseg.knn_vote(torch.randn(2, 3), torch.randn(4, 3), torch.full((4,), 7), 2, 3)
    with pytest.raises(RuntimeError, match=r"weakseg.knn_vote: num_classes must be in \[1, 65536\], got 2147483653"):
        torch.ops.weakseg.knn_vote(torch.randn(2, 3), torch.randn(4, 3), torch.zeros(4, dtype=torch.long), 2, 2**31 + 5)


def test_largest_num_classes_works(device):
    q, b = torch.randn(3, 4).to(device), torch.randn(5, 4).to(device)
    bl = torch.tensor([0, MAX_CLASSES - 1, 7, MAX_CLASSES - 1, 0], device=device)
    labels, conf, votes = knn_vote(q, b, bl, 5, MAX_CLASSES)
    assert votes.shape == (3, MAX_CLASSES) and votes.sum().item() == 15 and votes[:, MAX_CLASSES - 1].tolist() == [2] * 3


def test_wrapper_traces_under_fake_tensors_and_compile():
    # Issue 25.11: the wrapper read the labels' range in Python (DataDependentOutputException under fake
    # tensors); traced labels are range-checked by the compiled op when it runs.
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        labels, conf, votes = knn_vote(torch.randn(6, 8), torch.randn(20, 8), torch.randint(0, 3, (20,)), 4, 3)
        assert labels.shape == (6,) and conf.shape == (6,) and votes.shape == (6, 3)
    g = torch.Generator().manual_seed(2)
    q, b, bl = torch.randn(6, 8, generator=g), torch.randn(20, 8, generator=g), torch.randint(0, 3, (20,), generator=g)
    f = torch.compile(lambda q, b, bl: knn_vote(q, b, bl, 4, 3), fullgraph=True, backend="eager")
    for x, y in zip(f(q, b, bl), knn_vote(q, b, bl, 4, 3)):
        assert torch.equal(x, y)
    with pytest.raises(RuntimeError, match="weakseg.knn_vote: bank_labels must lie in"):
        f(q, b, torch.full((20,), 3))


def test_opcheck(device):
    g = torch.Generator().manual_seed(9)
    args = (torch.randn(7, 16, generator=g).to(device), torch.randn(40, 16, generator=g).to(device),
            torch.randint(0, 4, (40,), generator=g).to(device), 5, 4)
    torch.library.opcheck(torch.ops.weakseg.knn_vote.default, args)


def test_vote_rule_on_given_neighbours():
    from weakseg.ops.knn_vote import knn_vote_from_neighbors

    # most votes beats a larger sum; equal votes: the larger sum; equal votes and sums: the smaller id
    sims = torch.tensor([[0.9, 0.9, 0.1, 0.1, 0.1],
                         [0.5, 0.5, 0.6, 0.6, 0.0],
                         [0.5, 0.25, 0.5, 0.25, 0.0],
                         [0.7, 0.3, 0.0, 0.0, 0.0]])
    labels = torch.tensor([[3, 3, 1, 1, 1],
                           [1, 1, 2, 2, -1],
                           [2, 2, 1, 1, -1],
                           [-1, -1, -1, -1, -1]])
    lab, conf, votes = knn_vote_from_neighbors(sims, labels, 4)
    assert lab.tolist() == [1, 2, 1, -1]
    assert votes.tolist() == [[0, 3, 0, 2], [0, 2, 2, 0], [0, 2, 2, 0], [0, 0, 0, 0]]
    torch.testing.assert_close(conf, torch.tensor([0.1, 0.6, 0.375, 0.0]))
    assert lab.dtype == votes.dtype == torch.int64 and conf.dtype == torch.float32


def test_reference_and_moduseg_share_the_vote_rule():
    """One definition: the reference and ModuSeg's GEMM / FAISS paths vote with knn_vote_from_neighbors,
    bitwise, exact similarity ties included (small-integer vectors tie often)."""
    import weakseg.methods.moduseg.search as moduseg_search
    from weakseg.methods.moduseg import exact_topk, vote_from_neighbors
    from weakseg.ops.knn_vote import knn_vote_from_neighbors

    assert moduseg_search.knn_vote_from_neighbors is knn_vote_from_neighbors
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        q = torch.randint(-2, 3, (12, 4), generator=g).float()
        bank = torch.randint(-2, 3, (50, 4), generator=g).float()
        bank[bank.abs().sum(1) == 0, 0] = 1.0
        q[q.abs().sum(1) == 0, 0] = 1.0
        bl = torch.randint(0, 5, (50,), generator=g)
        ref = knn_vote_reference(q, bank, bl, 9, 5)
        sims, idx = exact_topk(q, bank, 9)
        for got in (vote_from_neighbors(sims, idx, bl, 5), knn_vote_from_neighbors(sims, bl[idx], 5)):
            assert all(torch.equal(a, b) for a, b in zip(got, ref))


# ---- the CPU kernel's tiled / split paths (issue 20) --------------------------------------------


def _exact_tie_bank(N, D, C, g, nan_rows=False):
    """A bank of scaled one-hot rows (2^m e_d): every similarity is exactly a query component (or 0),
    whatever the GEMM's blocking or the normalisation's rounding, so long runs of exactly equal
    similarities cross the tile and part boundaries. Optionally some NaN rows (rank last)."""
    d = torch.randint(0, D, (N,), generator=g)
    scale = 2.0 ** torch.randint(-3, 4, (N,), generator=g).float()
    bank = torch.nn.functional.one_hot(d, D).float() * scale[:, None]
    if nan_rows and N:
        bank[torch.rand(N, generator=g) < 0.05] = float("nan")
    return bank, torch.randint(0, C, (N,), generator=g)


def _exact_queries(Q, D, g):
    """Queries whose components have distinct magnitudes and random signs: the ranking of the bank's
    directions is then clear of any rounding."""
    base = torch.stack([torch.randperm(D, generator=g) for _ in range(Q)]).float() + 1.0 if Q else torch.zeros(0, D)
    sign = torch.where(torch.rand(Q, D, generator=g) < 0.5, -1.0, 1.0)
    return base * sign


def _assert_exact(queries, bank, bank_labels, k, C):
    labels, conf, votes = knn_vote(queries, bank, bank_labels, k, C)
    rl, rc, rv = knn_vote_reference(queries, bank, bank_labels, k, C)
    assert torch.equal(labels, rl)
    assert torch.equal(votes, rv)
    torch.testing.assert_close(conf, rc, rtol=1e-6, atol=1e-6)


@given(Q=st.integers(0, 12), N=st.integers(0, 6000), D=st.integers(2, 6), k=st.integers(1, 80),
       C=st.integers(1, 5), threads=st.sampled_from([1, 2]), nan_rows=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_exact_ties_across_tiles_and_parts(Q, N, D, k, C, threads, nan_rows, seed):
    """Equal similarities rank the smaller bank index first across the kernel's bank tiles (1024 rows
    at small D) and across the bank parts of different threads (banks of >= 4096 rows with 2 threads);
    k > N uses every row; NaN similarities rank last."""
    g = torch.Generator().manual_seed(seed)
    bank, bl = _exact_tie_bank(N, D, C, g, nan_rows)
    with torch_threads(threads):
        _assert_exact(_exact_queries(Q, D, g), bank, bl, k, C)


@pytest.mark.parametrize("N", [1023, 1024, 1025, 2048, 4095, 4096, 4097, 8191, 12289])
def test_exact_ties_at_tile_and_part_boundaries(N):
    g = torch.Generator().manual_seed(N)
    D = 3
    # Every row is e_0 except a block of e_1 rows around the boundary: the top-k of a query with a
    # larger component 1 is the first k e_1 rows, which straddle the tile / part boundary.
    bank = torch.zeros(N, D)
    bank[:, 0] = 1.0
    mid = N // 2
    lo, hi = max(0, mid - 30), min(N, mid + 30)
    bank[lo:hi, 0] = 0.0
    bank[lo:hi, 1] = 4.0
    bank[N - 40:, 1] = 0.5  # later rows with the same direction tie with the block and lose
    bank[N - 40:, 0] = 0.0
    bl = torch.randint(0, 4, (N,), generator=g)
    q = torch.tensor([[0.1, 3.0, -1.0], [2.0, 1.0, 0.5], [0.0, 0.0, 1.0]])
    for threads in (1, 2):
        with torch_threads(threads):
            for k in (1, 25, 60, 200):
                _assert_exact(q, bank, bl, k, 4)


@given(Q=st.integers(100, 300), N=st.integers(1, 3000), D=st.integers(1, 40), k=st.integers(1, 40),
       seed=st.integers(0, 2**31 - 1))
@settings(max_examples=15)
def test_query_split_matches_reference(Q, N, D, k, seed):
    """Many queries and a small bank: the queries are split across the threads."""
    g = torch.Generator().manual_seed(seed)
    q, b = torch.randn(Q, D, generator=g), torch.randn(N, D, generator=g) * 3
    bl = torch.randint(0, 7, (N,), generator=g)
    with torch_threads(2):
        _check_against_reference(q, b, bl, k, 7)


@pytest.mark.parametrize("Q,N,D,k", [(3, 9000, 24, 25), (40, 20000, 300, 25), (2, 5000, 1024, 7)])
def test_bank_split_matches_reference(Q, N, D, k):
    """Banks of several tiles per thread: the bank is split across the threads, each part keeps its own
    top-k, the parts are merged. D = 1024 gives 256-row tiles; D = 1 a single column."""
    g = torch.Generator().manual_seed(Q * N)
    q, b = torch.randn(Q, D, generator=g), torch.randn(N, D, generator=g)
    b[::7] *= 100.0  # the per-row normalisation matters
    b[5] = 0.0  # a zero row: similarity 0, as the reference's clamped norm gives
    bl = torch.randint(0, 11, (N,), generator=g)
    for threads in (1, 2):
        with torch_threads(threads):
            ok = _check_against_reference(q, b, bl, k, 11)
            assert ok.float().mean() > 0.5


def test_parallel_rows_are_exact_ties():
    """D = 1: every similarity is exactly +1 or -1 (parallel rows, however long), so the top-k are the
    first k rows of the query's sign, in every tile and part."""
    g = torch.Generator().manual_seed(11)
    bank = torch.randn(9000, 1, generator=g) * torch.rand(9000, 1, generator=g) * 50
    bl = torch.randint(0, 5, (9000,), generator=g)
    q = torch.tensor([[2.5], [-0.1], [0.0]])
    for threads in (1, 2):
        with torch_threads(threads):
            for k in (3, 25, 4700):
                _assert_exact(q, bank, bl, k, 5)


def test_double_and_noncontiguous_bank():
    g = torch.Generator().manual_seed(5)
    q = torch.randn(9, 16, generator=g, dtype=torch.float64)
    b = torch.randn(16, 5000, generator=g, dtype=torch.float64).t()  # a transposed view
    bl = torch.randint(0, 3, (5000,), generator=g)
    with torch_threads(2):
        _check_against_reference(q, b, bl, 25, 3)
        for x, y in zip(knn_vote(q, b, bl.int(), 25, 3), knn_vote(q, b, bl, 25, 3)):
            assert torch.equal(x, y)
