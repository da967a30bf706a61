import json
import math

import numpy as np
import pytest
import torch
from _helpers import assert_raises_naming
from hypothesis import given
from hypothesis import strategies as st

from weakseg.eval import ConfusionMatrix

# A hand-computed 5-class case. Class 3 is only predicted, class 4 never occurs, two pixels
# are ignored (their predictions 2 and 3 must not count).
#   target: 0 0 0 1 1 2 2 255 255 2
#   pred:   0 0 1 1 2 2 0 2   3   3
# rows = GT:  gt0 -> [2,1,0,0,0]  gt1 -> [0,1,1,0,0]  gt2 -> [1,0,1,1,0]
TARGET = torch.tensor([[0, 0, 0, 1, 1], [2, 2, 255, 255, 2]])
PRED = torch.tensor([[0, 0, 1, 1, 2], [2, 0, 2, 3, 3]])
MATRIX = torch.tensor([[2, 1, 0, 0, 0], [0, 1, 1, 0, 0], [1, 0, 1, 1, 0], [0] * 5, [0] * 5])


def hand_cm():
    return ConfusionMatrix(5).update(PRED, TARGET)


def test_hand_computed_matrix_and_iou():
    cm = hand_cm()
    assert torch.equal(cm.matrix, MATRIX)
    assert cm.total == 8
    assert cm.true_positives().tolist() == [2, 1, 1, 0, 0]
    assert cm.false_positives().tolist() == [1, 1, 1, 1, 0]
    assert cm.false_negatives().tolist() == [1, 1, 2, 0, 0]
    iou = cm.iou().tolist()
    assert iou[:4] == pytest.approx([2 / 4, 1 / 3, 1 / 4, 0.0])
    assert math.isnan(iou[4])  # no GT and no prediction


def test_miou_conventions():
    cm = hand_cm()
    # "all": absent class 4 counts as 0 (torchmetrics zero_division=0, DiffSegmenter's +1e-10)
    assert cm.miou("all") == pytest.approx((0.5 + 1 / 3 + 0.25 + 0 + 0) / 5)
    # "present": classes with GT pixels only (iSeg) -- class 3 (only predicted) is left out
    assert cm.miou("present") == pytest.approx((0.5 + 1 / 3 + 0.25) / 3)
    # "union": classes in GT or prediction (mmseg nanmean)
    assert cm.miou("union") == pytest.approx((0.5 + 1 / 3 + 0.25 + 0) / 4)
    assert_raises_naming(lambda: cm.miou("macro"), ValueError, ["convention", "all", "present", "macro"])


def test_accuracies_and_confusion_ratio():
    cm = hand_cm()
    assert cm.pixel_accuracy() == pytest.approx(4 / 8)
    acc = cm.class_accuracy().tolist()
    assert acc[:3] == pytest.approx([2 / 3, 1 / 2, 1 / 3]) and math.isnan(acc[3]) and math.isnan(acc[4])
    assert cm.mean_accuracy() == pytest.approx(0.5)
    assert cm.fw_iou() == pytest.approx(3 / 8 * 0.5 + 2 / 8 / 3 + 3 / 8 * 0.25)
    cr = cm.confusion_ratio().tolist()
    assert cr[:3] == pytest.approx([1 / 2, 1.0, 1.0])
    assert math.isinf(cr[3]) and math.isnan(cr[4])  # FP>0=TP -> inf; nothing -> NaN
    assert cm.mean_confusion_ratio() == pytest.approx((0.5 + 1 + 1) / 3)
    assert cm.mean_confusion_ratio(exclude=(0,)) == pytest.approx(1.0)


def test_unassigned_predictions_are_misses_or_skipped():
    target = torch.tensor([0, 0, 1, 1, 255])
    pred = torch.tensor([0, 255, 1, 1, 255])
    cm = ConfusionMatrix(2).update(pred, target)
    assert cm.unassigned.tolist() == [1, 0]
    assert cm.total == 4
    assert cm.iou().tolist() == pytest.approx([1 / 2, 1.0])  # the miss is a false negative of class 0
    assert cm.pixel_accuracy() == pytest.approx(3 / 4)
    skip = ConfusionMatrix(2, skip_unassigned=True).update(pred, target)
    assert skip.total == 3 and skip.unassigned.tolist() == [0, 0]
    assert skip.iou().tolist() == pytest.approx([1.0, 1.0])


def test_empty_matrix():
    cm = ConfusionMatrix(3)
    cm.update(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long))
    cm.update(torch.full((2, 2), 255), torch.full((2, 2), 255))
    assert cm.total == 0
    assert cm.miou("all") == 0.0
    assert math.isnan(cm.miou("present")) and math.isnan(cm.pixel_accuracy())


def _iseg_scores(t, p, n):
    """The iSeg / deeplab-style numpy scores() formula, written out independently."""
    m = (t >= 0) & (t < n)
    hist = np.bincount(n * t[m] + p[m], minlength=n * n).reshape(n, n)
    with np.errstate(divide="ignore", invalid="ignore"):
        iu = np.diag(hist) / (hist.sum(1) + hist.sum(0) - np.diag(hist))
        acc = np.diag(hist).sum() / hist.sum()
    present = iu[hist.sum(1) > 0]
    return hist, iu, (present.mean() if present.size else np.nan), acc


maps = st.lists(
    st.tuples(st.integers(1, 6), st.integers(1, 6), st.integers(0, 2**31 - 1)), min_size=1, max_size=5
)


@given(maps=maps, num_classes=st.integers(1, 6))
def test_merge_equals_single_accumulation(maps, num_classes):
    C = num_classes
    preds, targets = [], []
    for h, w, seed in maps:
        g = torch.Generator().manual_seed(seed)
        t = torch.randint(0, C + 1, (h, w), generator=g)
        t[t == C] = 255  # some ignore pixels
        p = torch.randint(0, C, (h, w), generator=g)
        preds.append(p)
        targets.append(t)
    parts = [ConfusionMatrix(C).update(p, t) for p, t in zip(preds, targets)]
    merged = ConfusionMatrix(C)
    for part in parts:
        merged.merge(part)
    added = parts[0]
    for part in parts[1:]:
        added = added + part
    whole = ConfusionMatrix(C).update(torch.cat([p.flatten() for p in preds]),
                                      torch.cat([t.flatten() for t in targets]))
    assert merged == whole and added == whole
    # against an independent numpy formula
    tt = torch.cat([t.flatten() for t in targets]).numpy()
    pp = torch.cat([p.flatten() for p in preds]).numpy()
    hist, iu, miou_present, acc = _iseg_scores(tt, pp, C)
    assert np.array_equal(whole.matrix.numpy(), hist)
    if hist.sum():
        np.testing.assert_allclose(whole.iou().numpy(), iu, equal_nan=True)
        assert whole.miou("present") == pytest.approx(miou_present)
        assert whole.pixel_accuracy() == pytest.approx(acc)
        assert whole.miou("all") == pytest.approx(np.nan_to_num(iu).mean())


def test_add_does_not_mutate_and_iadd_does():
    a, b = hand_cm(), hand_cm()
    c = a + b
    assert a == hand_cm() and torch.equal(c.matrix, 2 * MATRIX)
    a += b
    assert a == c


@pytest.mark.parametrize("suffix", [".safetensors", ".json"])
def test_save_load_round_trip(tmp_path, suffix):
    cm = hand_cm()
    cm.update(torch.tensor([255, 0]), torch.tensor([1, 1]))  # an unassigned pixel too
    path = cm.save(tmp_path / f"sub/cm{suffix}")
    back = ConfusionMatrix.load(path)
    assert back == cm and torch.equal(back.unassigned, cm.unassigned)
    assert back.summary() == cm.summary()
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary left behind
    if suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            assert f.get_tensor("counts").dtype == torch.int64
    # resume: keep accumulating on the loaded matrix
    back.update(PRED, TARGET)
    assert torch.equal(back.matrix, cm.matrix + MATRIX)


def test_state_dict_round_trip_and_errors(tmp_path):
    cm = hand_cm()
    assert ConfusionMatrix.from_state_dict(cm.state_dict()) == cm
    bad = cm.state_dict()
    bad["counts"] = torch.zeros(3, 3, dtype=torch.int64)
    assert_raises_naming(lambda: ConfusionMatrix.from_state_dict(bad), ValueError, ["counts", "(5, 6)"])
    assert_raises_naming(lambda: ConfusionMatrix.load(tmp_path / "nope.json"), FileNotFoundError, ["nope.json"])
    assert_raises_naming(lambda: cm.save(tmp_path / "cm.pt"), ValueError, ["cm.pt", ".safetensors", ".json"])
    (tmp_path / "other.json").write_text(json.dumps({"a": 1}))
    assert_raises_naming(lambda: ConfusionMatrix.load(tmp_path / "other.json"), ValueError,
                         ["other.json", "format"])


def test_bad_inputs_name_the_argument():
    cm = ConfusionMatrix(3)
    t = torch.zeros(2, 3, dtype=torch.long)
    assert_raises_naming(lambda: cm.update(torch.zeros(3, 2, dtype=torch.long), t), ValueError,
                         ["pred", "target", "(3, 2)", "(2, 3)"])
    assert_raises_naming(lambda: cm.update(t.float(), t), TypeError, ["pred", "float32"])
    assert_raises_naming(lambda: cm.update(t, t.bool()), TypeError, ["target", "bool"])
    assert_raises_naming(lambda: cm.update(t.numpy(), t), TypeError, ["pred", "Tensor"])
    assert_raises_naming(lambda: cm.update(t, torch.full((2, 3), 3)), ValueError, ["target", "[3]", "255"])
    assert_raises_naming(lambda: cm.update(t, torch.full((2, 3), -1)), ValueError, ["target", "[-1]"])
    assert_raises_naming(lambda: cm.update(torch.full((2, 3), 7), t), ValueError, ["pred", "[7]"])
    assert_raises_naming(lambda: cm.update(torch.full((2, 3), -2), t), ValueError, ["pred", "[-2]"])
    assert cm.total == 0  # nothing half-counted
    # out-of-range predictions under ignored targets are still errors
    assert_raises_naming(lambda: cm.update(torch.full((1,), 9), torch.full((1,), 255)), ValueError, ["pred"])
    assert_raises_naming(lambda: ConfusionMatrix(0), ValueError, ["num_classes"])
    assert_raises_naming(lambda: ConfusionMatrix(3, ignore_index=1), ValueError, ["ignore_index", "[0, num_classes=3)"])
    assert_raises_naming(lambda: cm.merge(ConfusionMatrix(4)), ValueError, ["num_classes=4", "num_classes=3"])
    assert_raises_naming(lambda: cm + ConfusionMatrix(3, skip_unassigned=True), ValueError, ["skip_unassigned=True"])
    assert_raises_naming(lambda: cm.summary(["a", "b"]), ValueError, ["class_names", "2", "3"])


def test_update_on_device(device):
    cm = ConfusionMatrix(5).update(PRED.to(device), TARGET.to(device))
    assert cm == hand_cm() and cm.matrix.device.type == "cpu"
    assert_raises_naming(lambda: cm.update(PRED.to(device), TARGET.to(device).float()), TypeError, ["target"])


def test_small_integer_dtypes_accepted():
    cm = ConfusionMatrix(5).update(PRED.to(torch.uint8), TARGET.to(torch.uint8))
    assert torch.equal(cm.matrix, MATRIX)
    cm2 = ConfusionMatrix(5).update(PRED.int(), TARGET.to(torch.int16))
    assert cm2 == cm


def test_summary_and_markdown():
    names = ["background", "cat", "dog", "cow", "sheep"]
    s = hand_cm().summary(names)
    json.dumps(s)  # JSON-ready
    assert s["pixels"] == 8
    assert s["miou"]["all"] == pytest.approx(1.0833333 / 5)
    assert s["percent"]["miou_present"] == pytest.approx(100 * (0.5 + 1 / 3 + 0.25) / 3)
    assert s["percent"]["iou"]["background"] == pytest.approx(50.0)
    assert s["percent"]["iou"]["sheep"] is None
    row = s["per_class"][3]
    assert row["name"] == "cow" and row["iou"] == 0.0 and row["confusion_ratio"] == math.inf
    assert row["gt_pixels"] == 0 and row["pred_pixels"] == 1
    md = hand_cm().to_markdown(names)
    assert "| 0 | background | 50.00 | 66.67 | 0.50 | 3 |" in md
    assert "| 3 | cow | 0.00 | - | inf | 0 |" in md
    assert "| mIoU (all 5 classes) | 21.67 |" in md


def _dist_worker(rank, world, init, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    cm = ConfusionMatrix(5)
    if rank == 0:
        cm.update(PRED, TARGET)
    else:
        cm.update(torch.tensor([4, 4, 0]), torch.tensor([4, 3, 0]))
    cm.all_reduce()
    cm.save(f"{out}/rank{rank}.json")
    dist.destroy_process_group()


def test_all_reduce_sums_over_processes(tmp_path):
    cm = hand_cm()
    assert cm.all_reduce() == hand_cm()  # no process group: a no-op
    import multiprocessing as mp

    # two gloo ranks in forked processes (fork: no re-import of torch, so this stays fast)
    ctx = mp.get_context("fork")
    init = f"file://{tmp_path}/store"
    procs = [ctx.Process(target=_dist_worker, args=(r, 2, init, str(tmp_path))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
    assert [p.exitcode for p in procs] == [0, 0]
    expect = hand_cm().update(torch.tensor([4, 4, 0]), torch.tensor([4, 3, 0]))
    for r in range(2):
        assert ConfusionMatrix.load(tmp_path / f"rank{r}.json") == expect
