import pytest
import torch
from _helpers import assert_raises_naming
from hypothesis import given, settings
from hypothesis import strategies as st

from weakseg.ops import kl_kmeans, kl_kmeans_reference

EPS = 1e-5
# Relative gap (second-nearest − nearest) / second-nearest under which two anchors count as a float64
# near-tie: the compiled op's float64 expanded-GEMM scores and the reference's direct float64 sums may
# order them differently. Far below the gaps attention maps have (1e-6 and up), far above float64 rounding.
REL_TIE = 1e-9


def _kl(p, a):
    """(N, A) symmetric KL between the rows of p (N, D) and a (A, D), float64, EPS added to every entry."""
    p, a = p.double().clamp_min(0) + EPS, a.double().clamp_min(0) + EPS
    return 0.5 * ((p[:, None] - a[None]) * (p.log()[:, None] - a.log()[None])).sum(-1)


def _trajectory_gap(x, seeds, iterations):
    """Smallest relative float64 gap (d2 − d1) / d2, over every point and iteration of the Lloyd
    trajectory, between a point's nearest (d1) and second-nearest (d2) alive anchor (distinct anchor
    values only: an exact duplicate loses every tie by rule, on every backend). A small gap is a
    near-tie that rounding may resolve either way."""
    x = x.double()
    gap = float("inf")
    for b in range(x.shape[0]):
        pts = x[b]
        anchors = pts[seeds.long()]
        for _ in range(iterations):
            d = _kl(pts, torch.unique(anchors, dim=0))
            if d.shape[1] > 1:
                two = d.topk(2, dim=1, largest=False).values
                rel = (two[:, 1] - two[:, 0]) / two[:, 1].clamp_min(1e-300)
                gap = min(gap, rel.min().item())
            assign = _kl(pts, anchors).argmin(1)
            keep = [j for j in range(anchors.shape[0]) if (assign == j).any()]
            anchors = torch.stack([pts[assign == j].mean(0) for j in keep])
    return gap


def _sum_maps(B, N, D, g, side=None, sharp=0.5):
    """iSeg's fused cross-attention as the op sees it: per-pixel rows of D token maps, each map
    normalised to sum 1 over the pixels (values ~1/N, so 1e-5 matters) and bilinearly upsampled from
    coarse grids. Their clusters are close: relative distance gaps of 1e-6 occur, where a float32
    expanded distance flipped 0.2-4% of the labels."""
    side = side or int(round(N ** 0.5))
    if D == 0:
        return torch.rand(B, N, 0, generator=g)
    out = 0
    for res, w in ((max(1, side // 4), 0.7), (max(1, side // 2), 0.3)):
        logits = torch.randn(B, res * res, D, generator=g) * sharp + torch.randn(B, 1, D, generator=g) * 2
        p = logits.softmax(-1).transpose(1, 2).reshape(B, D, res, res)
        p = p / p.sum((2, 3), keepdim=True)
        out = out + w * torch.nn.functional.interpolate(p, size=(side, side), mode="bilinear", align_corners=False)
    return out.flatten(2).transpose(1, 2)[:, :N].contiguous()


def _data(kind, B, N, D, g):
    if kind == "softmax":  # clustered distributions, like attention maps
        K = 1 + int(torch.randint(0, 6, (1,), generator=g))
        centers = torch.randn(K, D, generator=g) * 3
        which = torch.randint(0, K, (B, N), generator=g)
        return torch.softmax(centers[which] + 0.3 * torch.randn(B, N, D, generator=g), dim=-1)
    if kind == "sparse":  # exact zeros (1e-5 inside the distance)
        x = torch.rand(B, N, D, generator=g) * (torch.rand(B, N, D, generator=g) < 0.3)
        return x / x.sum(-1, keepdim=True).clamp_min(1e-3)
    if kind == "summaps":  # tiny values, close clusters
        return _sum_maps(B, N, D, g, side=int(N ** 0.5) + 1)
    return torch.rand(B, N, D, generator=g)  # unnormalised non-negative values


def _compare(x, seeds, iterations, device="cpu", rel_tie=REL_TIE):
    """Compiled op on ``x`` vs the reference; a disagreement is only allowed where the float64
    trajectory had a near-tie. Returns whether the outputs agreed."""
    labels, cents = kl_kmeans(x.to(device), seeds.to(device), iterations)
    B, N, D = x.shape
    S = seeds.shape[0]
    assert labels.dtype == torch.int64 and labels.shape == (B, N)
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    assert cents.dtype == cdt and cents.shape == (B, S, D)
    labels, cents = labels.cpu(), cents.cpu()
    rl, rc = kl_kmeans_reference(x, seeds, iterations)
    # structural invariants hold whatever the rounding: contiguous labels, zero rows past n_b
    for b in range(B):
        n_b = int(labels[b].max()) + 1 if N else 0
        assert n_b <= S and set(labels[b].tolist()) == set(range(n_b))
        assert (cents[b, n_b:] == 0).all()
    if torch.equal(labels, rl):
        # both are float64 means (summed in another order) rounded to cdt
        tol = 1e-12 if cdt == torch.float64 else 1e-6
        torch.testing.assert_close(cents, rc, rtol=tol, atol=1e-12)
        return True
    gap = _trajectory_gap(x, seeds, iterations)
    assert gap < rel_tie, f"labels differ from the reference although the nearest anchor was clear (gap {gap})"
    return False


@given(B=st.integers(0, 3), N=st.integers(0, 300), D=st.integers(0, 80), S=st.integers(1, 40),
       iterations=st.integers(1, 20), kind=st.sampled_from(["softmax", "sparse", "uniform", "summaps"]),
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


# ------------------------------------------------------------------------------------------
# the authors' code: a transcription of kl_dis and of the clustering loop that calls it
# (DiCLIP model/featurecluster.py: kl_dis, attn_kl_cluster, DFC_KL.forward; iSeg wsss/featurecluster.py
# DFC_KL.forward with util/attn.py's kl_dis), with the grid of seed rows passed in.

def _authors_kl_dis(anchor, attn, dtype=torch.float16):
    """kl_dis(anchor [.., n1, p], attn [.., n2, p]) -> [.., n1, n2]. The authors cast to float16; the
    ``dtype`` argument is the one change, to compare with weakseg's float64 evaluation."""
    anchor, attn = anchor.type(dtype) + 1e-5, attn.type(dtype) + 1e-5
    anchor, attn = anchor.unsqueeze(-2), attn.unsqueeze(-3)
    qoutient = torch.log(anchor) - torch.log(attn)
    kl_1 = torch.sum(anchor * qoutient, dim=-1) * 0.5
    kl_2 = -torch.sum(attn * qoutient, dim=-1) * 0.5
    return kl_1 + kl_2


def _authors_cluster(attn, seeds, iterations, dtype=torch.float16):
    """The authors' loop on rows attn (hw, c) from the rows ``seeds`` -> (labels (hw,), anchors)."""
    attn = torch.where(attn == 0, 1e-6, attn)
    anchor, cluster = attn[seeds], None
    for _ in range(iterations):
        dis = _authors_kl_dis(anchor, attn, dtype)
        values, cluster = torch.min(dis, dim=0)
        idx = cluster.unique()
        anchor = torch.stack([attn[cluster == dat].mean(0) for dat in idx], dim=0)
    idx = cluster.unique()
    for idx_ in idx:
        cluster[cluster == idx_] = torch.nonzero(idx == idx_).squeeze()
    return cluster.to(torch.int64), anchor


def _smallest_case():
    return torch.tensor([[[4e-4, 6e-4], [1.9e-3, 1e-4], [4e-3, 3.4e-3]]]), torch.tensor([0, 1])


def test_authors_epsilon_is_added_not_clamped(device):
    # Issue 26.2: d(x2, x0) vs d(x2, x1) is 6.5141e-3 vs 6.4449e-3 with 1e-5 added to every entry (the
    # authors: point 2 joins seed 1), but 6.5731e-3 vs 6.6002e-3 with entries clamped at 1e-5 (point 2
    # joined seed 0 before).
    x, seeds = _smallest_case()
    for dtype in (torch.float16, torch.float64):
        labels, anchors = _authors_cluster(x[0], seeds, 1, dtype)
        assert labels.tolist() == [0, 1, 1], dtype
    expect = torch.tensor([[[4e-4, 6e-4], [(1.9e-3 + 4e-3) / 2, (1e-4 + 3.4e-3) / 2]]])
    for lab, cen in (kl_kmeans(x.to(device), seeds.to(device), 1), kl_kmeans_reference(x, seeds, 1),
                     kl_kmeans(x.double().to(device), seeds.to(device), 1)):
        assert lab.cpu().tolist() == [[0, 1, 1]]
        torch.testing.assert_close(cen.cpu().double(), expect.double(), rtol=1e-6, atol=0)


@given(N=st.integers(1, 200), D=st.integers(1, 40), S=st.integers(1, 20), iterations=st.integers(1, 8),
       kind=st.sampled_from(["softmax", "sparse", "uniform", "summaps"]), seed=st.integers(0, 2**31 - 1))
@settings(max_examples=40, deadline=None)
def test_matches_authors_code(N, D, S, iterations, kind, seed):
    """Labels and centroids equal the authors' loop (evaluated in float64 instead of float16) given the
    same x, i.e. after their zeros -> 1e-6, except at float64 near-ties."""
    g = torch.Generator().manual_seed(seed)
    x = _data(kind, 1, N, D, g).double()
    x = torch.where(x == 0, 1e-6, x)  # what the authors' callers do first (and weakseg's DiCLIP ACR)
    seeds = torch.randint(0, N, (S,), generator=g)
    labels, cents = kl_kmeans(x, seeds, iterations)
    ours = kl_kmeans_reference(x, seeds, iterations)
    theirs, anchors = _authors_cluster(x[0], seeds, iterations, torch.float64)
    if not torch.equal(labels[0], theirs):
        assert _trajectory_gap(x, seeds, iterations) < REL_TIE
        return
    assert torch.equal(ours[0][0], theirs)
    n = anchors.shape[0]
    torch.testing.assert_close(cents[0, :n], anchors, rtol=1e-12, atol=1e-15)
    assert (cents[0, n:] == 0).all()


def test_authors_float16_agrees_on_clear_clusters():
    # The float16 cast, weakseg's one departure from kl_dis, changes nothing where the clusters are clear.
    g = torch.Generator().manual_seed(31)
    centers = torch.softmax(torch.randn(5, 16, generator=g) * 4, -1)
    which = torch.randint(0, 5, (300,), generator=g)
    x = torch.softmax(centers[which].log() + 0.1 * torch.randn(300, 16, generator=g), -1)
    seeds = torch.tensor([int((which == k).nonzero()[0]) for k in range(5)])
    theirs, _ = _authors_cluster(x, seeds, 5, torch.float16)
    labels, _ = kl_kmeans(x[None], seeds, 5)
    assert torch.equal(labels[0], theirs)
    assert len(theirs.unique()) == 5


def _expanded_float32_labels(x, seeds, iterations):
    """The scores the compiled op used before issue 27.4: the expanded distance as a float32 GEMM
    (plus the per-anchor constant), with float32 means. x (1, N, D) -> labels (N,)."""
    x = x[0].float()
    xc = x.clamp_min(0) + EPS
    points = torch.cat([xc, xc.log()], 1)
    anchors = x[seeds]
    for _ in range(iterations):
        ac = anchors.clamp_min(0) + EPS
        la = ac.log()
        assign = ((ac * la).sum(1)[None] - points @ torch.cat([la, ac], 1).T).argmin(1)
        counts = torch.bincount(assign, minlength=anchors.shape[0])
        alive = counts > 0
        anchors = (torch.zeros_like(anchors).index_add_(0, assign, x) / counts.clamp_min(1)[:, None])[alive]
        assign = (alive.cumsum(0) - 1)[assign]
    return assign


def test_sum_normalised_maps_agree_with_reference(device):
    # Issue 27.4: on iSeg's shapes with sum-normalised maps (values ~1e-3, close clusters) the
    # expanded distance as a float32 GEMM cancels and flips 1-2% of the labels against the reference;
    # in float64 the compiled op agrees with it exactly.
    seeds = _grid_seeds(64, 11, 64)
    for seed in (1, 2):
        x = _sum_maps(1, 4096, 77, torch.Generator().manual_seed(seed), side=64)
        rl, _ = kl_kmeans_reference(x, seeds, 8)
        assert (_expanded_float32_labels(x, seeds, 8) != rl[0]).float().mean() > 0.005  # the data is hard
        assert _compare(x, seeds, 8, device)


def test_clustered_inputs_agree_exactly(device):
    # well-separated clusters: the comparison above must not pass vacuously
    g = torch.Generator().manual_seed(11)
    centers = torch.softmax(torch.randn(6, 24, generator=g) * 4, -1)
    which = torch.randint(0, 6, (250,), generator=g).expand(2, 250)
    x = torch.softmax(centers[which].log() + 0.1 * torch.randn(2, 250, 24, generator=g), -1)
    # one seed in each cluster of image 0 (its first member), plus a duplicate
    first = [int((which[0] == k).nonzero()[0]) for k in range(6)]
    seeds = torch.tensor(first + [first[2]])
    assert _trajectory_gap(x, seeds, 8) > 1e-4
    assert _compare(x, seeds, 8, device)


def test_equal_anchors_keep_the_first_whatever_their_gemm_column(device):
    # The expanded distance goes through a GEMM, and a BLAS may round an edge column differently
    # from the others, so equal anchors need not get equal floats there. Equal anchors must still
    # behave as in the direct form: the first one takes every member, the later ones die. Repeated
    # seed indices at every position up to past the GEMM's blocking, and distinct indices of
    # identical rows.
    g = torch.Generator().manual_seed(3)
    x = _data("softmax", 1, 40, 11, g)
    x[0, 30:] = x[0, :10]  # rows 30..39 repeat rows 0..9
    for S in range(2, 50, 3):
        seeds = torch.randint(0, 40, (S,), generator=g)
        seeds[-1] = seeds[0]  # the last GEMM column repeats the first
        labels, cents = kl_kmeans(x.to(device), seeds.to(device), 1)
        # the same clustering from the first seed of each distinct row, in order
        rows, keep = [], []
        for s in seeds.tolist():
            r = int(s) % 30
            if r not in rows:
                rows.append(r)
                keep.append(s)
        l1, c1 = kl_kmeans(x.to(device), torch.tensor(keep, device=device), 1)
        assert torch.equal(labels.cpu(), l1.cpu()), S
        torch.testing.assert_close(cents[:, : len(keep)].cpu(), c1.cpu(), rtol=1e-6, atol=1e-12)
        assert _compare(x, seeds, 1, device)


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
    assert _trajectory_gap(x, seeds, 1) > 1e-4
    labels, cents = kl_kmeans(x.to(device), seeds.to(device), 1)
    assign = _kl(x[0], x[0, seeds]).argmin(1)  # nearest seed row
    alive = torch.bincount(assign, minlength=5) > 0
    relabel = alive.cumsum(0) - 1
    assert labels.cpu()[0].tolist() == relabel[assign].tolist()
    means = torch.stack([x[0][assign == j].mean(0) for j in range(5) if alive[j]])
    torch.testing.assert_close(cents.cpu()[0, : len(means)], means)
    assert (cents.cpu()[0, len(means):] == 0).all()


def test_negative_entries_count_as_zero(device):
    g = torch.Generator().manual_seed(8)
    x = _data("sparse", 1, 60, 6, g)
    seeds = torch.tensor([0, 20, 40])
    neg = x.clone()
    neg[x == 0] = -torch.rand(int((x == 0).sum()), generator=g)  # negatives enter the distance as 0 + eps
    # the first assignment sees only max(x, 0) + eps; the means then use the raw rows
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


def test_zero_width_rows_join_the_first_seed(device):
    # D = 0: every distance is 0, the tie rule sends every point to the first seed (the compiled CPU op
    # counted no members and returned labels -1 before)
    x = torch.rand(2, 5, 0, device=device)
    seeds = torch.tensor([3, 1, 3], device=device)
    for labels, cents in (kl_kmeans(x, seeds, 3), torch.ops.weakseg.kl_kmeans(x, seeds, 1),
                          kl_kmeans_reference(x.cpu(), seeds.cpu(), 3)):
        assert labels.cpu().tolist() == [[0] * 5] * 2
        assert cents.shape == (2, 3, 0) and cents.dtype == torch.float32


def test_wrapper_traces_under_fake_tensors_and_compile():
    # Issue 25.11: the wrapper read the seeds' range in Python (DataDependentOutputException under fake
    # tensors); traced seeds are range-checked by the compiled op when it runs.
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        labels, cents = kl_kmeans(torch.rand(2, 30, 4), torch.tensor([0, 7, 29]), 3)
        assert labels.shape == (2, 30) and labels.dtype == torch.int64
        assert cents.shape == (2, 3, 4) and cents.dtype == torch.float32
    x, seeds = torch.rand(2, 30, 4), torch.tensor([0, 7, 29])
    f = torch.compile(lambda x, s: kl_kmeans(x, s, 3), fullgraph=True, backend="eager")
    for a, b in zip(f(x, seeds), kl_kmeans(x, seeds, 3)):
        assert torch.equal(a, b)
    with pytest.raises(RuntimeError, match=r"weakseg.kl_kmeans: seeds must lie in \[0, N=30\)"):
        f(x, torch.tensor([0, 30, 2]))


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
