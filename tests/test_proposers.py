import json
import socket

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _helpers import assert_raises_naming
from PIL import Image

from weakseg.backbones.proposers import (DiskProposer, MaskProposer, Proposals, SAMProposer, SuperpixelProposer,
                                         paint_disjoint)
from weakseg.core import PROPOSERS

from weakseg.backbones.proposers import SAM2Proposer
from weakseg.backbones.proposers.sam import _has_sam2

if not _has_sam2():  # transformers without Sam2Model
    SAM2Proposer = None

SAM_CLASSES = [SAMProposer] + ([SAM2Proposer] if SAM2Proposer is not None else [])


def check_proposals(p, H, W):
    """Every invariant of the Proposals contract, checked independently of its constructor."""
    assert isinstance(p, Proposals)
    assert p.masks.dtype == torch.bool and p.masks.dim() == 3 and p.masks.shape[1:] == (H, W)
    assert p.scores.dtype == torch.float32 and p.scores.shape == (p.masks.shape[0],)
    assert torch.all(p.scores[:-1] >= p.scores[1:])
    assert not p.masks.numel() or int(p.masks.sum(0).max()) <= 1
    assert p.masks.flatten(1).any(1).all()


def _image(H, W, seed=0):
    return torch.randint(0, 256, (3, H, W), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


# ----------------------------------------------------------------------------------------------
# Proposals and paint_disjoint
# ----------------------------------------------------------------------------------------------
def _rects(H, W, boxes):
    masks = torch.zeros(len(boxes), H, W, dtype=torch.bool)
    for i, (t, l, b, r) in enumerate(boxes):
        masks[i, t:b, l:r] = True
    return masks


def test_paint_disjoint_exact():
    # A: rows 0-2 x cols 0-3 (0.5); B: rows 1-3 x cols 2-5 (0.9); C: rows 0-3 x cols 3-4 (0.7); D: inside B (0.1)
    masks = _rects(4, 6, [(0, 0, 3, 4), (1, 2, 4, 6), (0, 3, 4, 5), (2, 2, 3, 3)])
    p = paint_disjoint(masks, [0.5, 0.9, 0.7, 0.1])
    expected = torch.tensor([[1, 1, 1, 3, 3, 0],
                             [1, 1, 2, 2, 2, 2],
                             [1, 1, 2, 2, 2, 2],
                             [0, 0, 2, 2, 2, 2]])
    # ids in the Proposals order: B (0.9) -> 1, C (0.7) -> 2, A (0.5) -> 3; D is swallowed by B
    remap = {0: 0, 1: 3, 2: 1, 3: 2}
    want = expected.clone().apply_(lambda v: remap[v])
    assert p.scores.tolist() == pytest.approx([0.9, 0.7, 0.5])
    assert torch.equal(p.to_id_map(), want.int())
    check_proposals(p, 4, 6)


def test_paint_disjoint_ties_thresholds_and_areas():
    masks = _rects(3, 4, [(0, 0, 3, 2), (0, 1, 3, 4), (0, 0, 1, 1)])
    p = paint_disjoint(masks, [0.5, 0.5, 0.2])  # tie: the first listed mask wins the overlap
    assert p.to_id_map().tolist() == [[1, 1, 2, 2]] * 3 and p.scores.tolist() == [0.5, 0.5]
    assert p.areas.tolist() == [6, 6]
    p = paint_disjoint(masks, [0.5, 0.6, 0.9])
    assert p.to_id_map().tolist() == [[1, 2, 2, 2], [3, 2, 2, 2], [3, 2, 2, 2]]
    assert p.scores.tolist() == pytest.approx([0.9, 0.6, 0.5])
    # min_area applies after painting; the dropped mask's pixels stay unassigned
    p = paint_disjoint(masks, [0.5, 0.6, 0.9], min_area=2)
    assert p.to_id_map().tolist() == [[0, 1, 1, 1], [2, 1, 1, 1], [2, 1, 1, 1]]
    assert p.scores.tolist() == pytest.approx([0.6, 0.5])
    assert paint_disjoint(masks, [0.5, 0.6, 0.9], min_area=3).to_id_map().tolist() == [[0, 1, 1, 1]] * 3
    # score_thresh drops masks before painting (kept if score >= thresh)
    p = paint_disjoint(masks, [0.5, 0.6, 0.9], score_thresh=0.6)
    assert p.scores.tolist() == pytest.approx([0.9, 0.6]) and p.to_id_map()[1, 0] == 0
    empty = paint_disjoint(torch.zeros(0, 5, 7, dtype=torch.bool), [])
    check_proposals(empty, 5, 7)
    assert len(empty) == 0
    p = paint_disjoint(torch.tensor([[[0, 1], [1, 1]]], dtype=torch.uint8), torch.tensor([2.0]))
    assert p.masks.dtype == torch.bool and p.areas.tolist() == [3]


def test_paint_disjoint_errors():
    masks = torch.ones(2, 3, 3, dtype=torch.bool)
    assert_raises_naming(lambda: paint_disjoint(masks[0], [1.0]), ValueError, ["masks", "(M, H, W)"])
    assert_raises_naming(lambda: paint_disjoint(masks, [1.0]), ValueError, ["scores", "2"])
    assert_raises_naming(lambda: paint_disjoint(masks.float(), [1.0, 2.0]), TypeError, ["masks", "float"])
    assert_raises_naming(lambda: paint_disjoint(masks.int() * 2, [1.0, 2.0]), ValueError, ["0/1"])
    assert_raises_naming(lambda: paint_disjoint(masks, [1.0, float("nan")]), ValueError, ["NaN"])


def test_proposals_invariants_enforced():
    overlap = _rects(3, 3, [(0, 0, 2, 2), (1, 1, 3, 3)])
    assert_raises_naming(lambda: Proposals(overlap, torch.tensor([0.9, 0.1])), ValueError, ["disjoint"])
    disjoint = _rects(3, 3, [(0, 0, 1, 3), (2, 0, 3, 3)])
    assert_raises_naming(lambda: Proposals(disjoint, torch.tensor([0.1, 0.9])), ValueError, ["descending"])
    assert_raises_naming(lambda: Proposals(disjoint.int(), torch.tensor([0.9, 0.1])), ValueError, ["bool"])
    assert_raises_naming(lambda: Proposals(disjoint, torch.tensor([0.9, 0.1], dtype=torch.float64)), ValueError,
                         ["float32"])
    with_empty = torch.cat([disjoint, torch.zeros(1, 3, 3, dtype=torch.bool)])
    assert_raises_naming(lambda: Proposals(with_empty, torch.tensor([0.9, 0.5, 0.1])), ValueError, ["empty"])
    ok = Proposals(disjoint, torch.tensor([0.9, 0.1]))
    assert len(ok) == 2 and ok.image_size == (3, 3)


def test_id_map_round_trip():
    ids = torch.tensor([[0, 3, 3, 1], [2, 2, 0, 1], [5, 5, 5, 1]])
    p = Proposals.from_id_map(ids, {1: 0.2, 2: 0.9, 3: 0.5, 5: 0.7})
    assert p.scores.tolist() == pytest.approx([0.9, 0.7, 0.5, 0.2])
    back = p.to_id_map()
    for k, new in [(2, 1), (5, 2), (3, 3), (1, 4)]:
        assert torch.equal(back == new, ids == k)
    assert (back == 0).eq(ids == 0).all()
    # list scores indexed by id - 1, thresholds, areas
    p = Proposals.from_id_map(ids.numpy(), [0.2, 0.9, 0.5, 0.0, 0.7], score_thresh=0.5, min_area=3)
    assert p.scores.tolist() == pytest.approx([0.7]) and torch.equal(p.masks[0], ids == 5)
    p = Proposals.from_id_map(ids, [0.2, 0.9, 0.5, 0.0, 0.7], min_area=3)
    assert p.areas.tolist() == [3, 3] and p.scores.tolist() == pytest.approx([0.7, 0.2])
    assert_raises_naming(lambda: Proposals.from_id_map(ids, [0.1, 0.2]), ValueError, ["scores", "5"])
    assert_raises_naming(lambda: Proposals.from_id_map(ids, {1: 0.1}), ValueError, ["no score", "2"])
    assert_raises_naming(lambda: Proposals.from_id_map(ids.float()), ValueError, ["id_map", "integer"])
    assert_raises_naming(lambda: Proposals.from_id_map(ids - 1), ValueError, ["id_map", ">= 0"])
    assert len(Proposals.from_id_map(torch.zeros(4, 4, dtype=torch.int64))) == 0


# ----------------------------------------------------------------------------------------------
# DiskProposer
# ----------------------------------------------------------------------------------------------
def test_disk_png_uint8_with_scores(tmp_path):
    ids = np.zeros((12, 16), np.uint8)
    ids[:6, :8], ids[6:, :8], ids[:, 8:12], ids[:3, 12:] = 1, 2, 3, 4
    Image.fromarray(ids).save(tmp_path / "2007_000032.png")
    (tmp_path / "2007_000032.json").write_text(json.dumps([0.7, 0.4, 0.95, 0.55]))
    disk = DiskProposer(tmp_path, score_thresh=0.5)
    assert PROPOSERS.get("disk") is DiskProposer
    img = _image(12, 16)
    p = disk(img, key="/data/VOC/JPEGImages/2007_000032.jpg")
    check_proposals(p, 12, 16)
    assert p.scores.tolist() == pytest.approx([0.95, 0.7, 0.55])
    for mask, k in zip(p.masks, [3, 1, 4]):
        assert torch.equal(mask, torch.from_numpy(ids == k))
    # no threshold and no sidecar: every region, default score 1, in id order
    (tmp_path / "2007_000032.json").unlink()
    p = DiskProposer(tmp_path)(key="2007_000032")
    assert p.scores.tolist() == [1.0] * 4
    for mask, k in zip(p.masks, [1, 2, 3, 4]):
        assert torch.equal(mask, torch.from_numpy(ids == k))
    # dict sidecar
    (tmp_path / "2007_000032.json").write_text(json.dumps({"1": 0.1, "2": 0.2, "3": 0.3, "4": 0.65}))
    p = DiskProposer(tmp_path, score_thresh=0.6)(key="2007_000032")
    assert len(p) == 1 and torch.equal(p.masks[0], torch.from_numpy(ids == 4))


@pytest.mark.parametrize("big", [300, 65535])
def test_disk_png_16bit_ids(tmp_path, big):
    ids = np.zeros((10, 10), np.uint16)
    ids[:5], ids[5:, :5] = big, 2
    Image.fromarray(ids).save(tmp_path / "a.png")
    with Image.open(tmp_path / "a.png") as im:
        assert int(np.array(im).max()) == big
    p = DiskProposer(tmp_path, min_area=20)(key="a")
    assert len(p) == 2
    assert torch.equal(p.masks[0], torch.from_numpy(ids == 2)) and torch.equal(p.masks[1], torch.from_numpy(ids == big))
    assert len(DiskProposer(tmp_path, min_area=30)(key="a")) == 1


def test_disk_npz_overlapping(tmp_path):
    masks = _rects(4, 6, [(0, 0, 3, 4), (1, 2, 4, 6), (0, 3, 4, 5)]).numpy()
    np.savez(tmp_path / "img1.npz", masks=masks, scores=np.array([0.5, 0.9, 0.7], np.float32))
    p = DiskProposer(tmp_path)(_image(4, 6), key="img1.jpg")
    ref = paint_disjoint(torch.from_numpy(masks), [0.5, 0.9, 0.7])
    assert torch.equal(p.masks, ref.masks) and torch.equal(p.scores, ref.scores)
    p = DiskProposer(tmp_path, score_thresh=0.6)(key="img1")
    assert p.scores.tolist() == pytest.approx([0.9, 0.7])
    assert torch.equal(p.masks[0], torch.from_numpy(masks[1]))
    assert torch.equal(p.masks[1], torch.from_numpy(masks[2] & ~masks[1]))
    np.savez(tmp_path / "img2.npz", masks=masks[:2].astype(np.uint8))  # no scores: default score
    p = DiskProposer(tmp_path, default_score=0.8)(key="img2")
    assert p.scores.tolist() == pytest.approx([0.8, 0.8])
    assert torch.equal(p.masks[0], torch.from_numpy(masks[0]))  # tie: first listed wins


def test_disk_naming_and_errors(tmp_path):
    (tmp_path / "train2014").mkdir()
    np.savez(tmp_path / "train2014" / "COCO_1_masks.npz", masks=np.ones((1, 3, 3), bool))
    disk = DiskProposer(tmp_path, pattern="train2014/{key}_masks")
    assert len(disk(key="COCO_1")) == 1
    missing = tmp_path / "train2014" / "COCO_2_masks"
    assert_raises_naming(lambda: disk(key="COCO_2.jpg"), FileNotFoundError,
                         ["'COCO_2.jpg'", f"{missing}.npz", f"{missing}.png"])
    assert_raises_naming(lambda: disk(_image(4, 4), key="COCO_1"), ValueError, ["3x3", "4x4"])
    assert_raises_naming(lambda: DiskProposer(tmp_path / "absent"), FileNotFoundError, ["absent", "directory"])
    assert_raises_naming(lambda: DiskProposer(tmp_path, pattern="x"), ValueError, ["{key}"])
    assert_raises_naming(lambda: DiskProposer(tmp_path, formats=("jpg",)), ValueError, ["formats"])
    np.savez(tmp_path / "bad.npz", segs=np.ones((1, 3, 3), bool))
    assert_raises_naming(lambda: DiskProposer(tmp_path)(key="bad"), KeyError, ["bad.npz", "'masks'"])
    np.savez(tmp_path / "bad2.npz", masks=np.ones((1, 3, 3), bool), scores=np.ones(2, np.float32))
    assert_raises_naming(lambda: DiskProposer(tmp_path)(key="bad2"), ValueError, ["bad2.npz", "scores"])
    np.savez(tmp_path / "bad3.npz", masks=np.ones((1, 3, 3), np.float32))
    assert_raises_naming(lambda: DiskProposer(tmp_path)(key="bad3"), TypeError, ["bad3.npz", "float32"])
    Image.fromarray(np.zeros((3, 3, 3), np.uint8)).save(tmp_path / "rgb.png")
    assert_raises_naming(lambda: DiskProposer(tmp_path)(key="rgb"), ValueError, ["rgb.png", "single-channel"])
    assert_raises_naming(lambda: disk(_image(3, 3).float(), key="COCO_1"), TypeError, ["image", "uint8"])


# ----------------------------------------------------------------------------------------------
# SuperpixelProposer
# ----------------------------------------------------------------------------------------------
def _flat_rectangles(seed=0, noise=4):
    H, W = 60, 90
    layout = [((0, 0, 30, 50), (200, 40, 40)), ((0, 50, 30, 90), (40, 180, 60)),
              ((30, 0, 60, 30), (50, 60, 210)), ((30, 30, 60, 90), (230, 220, 90))]
    img = torch.zeros(3, H, W)
    truth = []
    for (t, l, b, r), colour in layout:
        img[:, t:b, l:r] = torch.tensor(colour, dtype=torch.float32).view(3, 1, 1)
        m = torch.zeros(H, W, dtype=torch.bool)
        m[t:b, l:r] = True
        truth.append(m)
    g = torch.Generator().manual_seed(seed)
    img = img + torch.randint(-noise, noise + 1, img.shape, generator=g)
    return img.clamp(0, 255).to(torch.uint8), truth


@pytest.mark.parametrize("method", ["felzenszwalb", "slic"])
def test_superpixel_recovers_rectangles(method):
    img, truth = _flat_rectangles()
    sp = SuperpixelProposer(method, n_segments=60)
    p = sp(img)
    check_proposals(p, 60, 90)
    assert p.masks.any(0).all()  # the regions tile the image
    for t in truth:
        inter = (p.masks & t).flatten(1).sum(1).float()
        union = (p.masks | t).flatten(1).sum(1).float()
        assert (inter / union).max() >= 0.9
    # area score: the largest region first, scores are area fractions
    torch.testing.assert_close(p.scores, p.areas.float() / (60 * 90))
    assert torch.equal(sp(img).masks, p.masks)  # deterministic


def test_superpixel_scores_and_merging():
    img, truth = _flat_rectangles(noise=0)
    hom = SuperpixelProposer(score="homogeneity")(img)
    check_proposals(hom, 60, 90)
    assert hom.scores.max() <= 1.0 and hom.scores.min() > 0.9  # flat regions: std ~ 0
    # a huge merge threshold joins everything into one region
    one = SuperpixelProposer(merge_thresh=1000.0)(img)
    assert len(one) == 1 and one.masks[0].all()
    assert len(SuperpixelProposer(min_area=1000)(img)) == 3  # the 30x30 rectangle (900 px) is dropped
    assert_raises_naming(lambda: SuperpixelProposer("watershed"), ValueError, ["method", "watershed"])
    assert_raises_naming(lambda: SuperpixelProposer(score="size"), ValueError, ["score", "size"])


def test_superpixel_random_image_is_valid():
    p = SuperpixelProposer()(_image(40, 56, seed=3))
    check_proposals(p, 40, 56)
    assert p.masks.any(0).all()


# ----------------------------------------------------------------------------------------------
# SAM / SAM2
# ----------------------------------------------------------------------------------------------
_LOOSE = dict(points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0, nms_iou=1.0)


@pytest.mark.parametrize("cls", SAM_CLASSES)
def test_sam_tiny_end_to_end(cls):
    assert PROPOSERS.get(cls.model_type) is cls
    sam = cls.tiny(seed=0, **_LOOSE)
    assert isinstance(sam, MaskProposer) and sam.device == torch.device("cpu") and sam.dtype == torch.float32
    img = _image(50, 70, seed=1)
    p = sam(img)
    check_proposals(p, 50, 70)
    assert len(p) >= 1
    assert torch.equal(sam(img).masks, p.masks)  # deterministic
    # with crops, fewer points per batch, an area floor
    p2 = cls.tiny(seed=0, crop_n_layers=1, points_per_batch=5, min_area=10, **_LOOSE)(img)
    check_proposals(p2, 50, 70)
    assert (p2.areas >= 10).all()
    # default thresholds: random weights predict low IoUs, so nothing survives, and that is valid
    check_proposals(cls.tiny(seed=0)(img), 50, 70)


@pytest.mark.parametrize("cls", SAM_CLASSES)
def test_sam_save_load_offline(cls, tmp_path, monkeypatch):
    sam = cls.tiny(seed=2, **_LOOSE)
    sam.save_pretrained(tmp_path / "m")
    img = _image(40, 33, seed=4)
    ref = sam(img)

    def no_network(*args, **kwargs):
        raise OSError("network access during a local load")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    loaded = cls.from_pretrained(str(tmp_path / "m"), **_LOOSE)
    assert type(loaded.model) is type(sam.model)
    out = loaded(img)
    assert torch.equal(out.masks, ref.masks) and torch.equal(out.scores, ref.scores)
    assert not any(p.suffix in (".bin", ".pt", ".pth") for p in (tmp_path / "m").iterdir())
    assert_raises_naming(lambda: cls.from_pretrained(str(tmp_path / "none")), FileNotFoundError,
                         [str(tmp_path / "none")])
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.json").write_text("{}")
    assert_raises_naming(lambda: cls.from_pretrained(str(tmp_path / "half")), FileNotFoundError,
                         ["preprocessor_config.json"])


def test_sam_rejects_other_model(tmp_path):
    if SAM2Proposer is None:
        pytest.skip("transformers without Sam2Model")
    SAM2Proposer.tiny().save_pretrained(tmp_path / "s2")
    assert_raises_naming(lambda: SAMProposer.from_pretrained(str(tmp_path / "s2")), ValueError, ["'sam2'", "'sam'"])
    assert_raises_naming(lambda: SAMProposer(SAM2Proposer.tiny().model, SAMProposer.tiny().image_processor),
                         TypeError, ["SamModel", "Sam2Model"])


def test_filter_matches_transformers_filter_masks():
    """Our RLE-free filter + NMS gives the masks of the image processor's filter_masks +
    post_process_for_mask_generation."""
    sam = SAMProposer.tiny(pred_iou_thresh=0.3, stability_score_thresh=0.6, nms_iou=0.5)
    ip = sam.image_processor
    g = torch.Generator().manual_seed(0)
    logits = F.interpolate(torch.randn(6, 3, 6, 8, generator=g) * 8, size=(30, 40), mode="bilinear")
    iou = torch.rand(6, 3, generator=g)
    for crop in (torch.tensor([0.0, 0.0, 40.0, 30.0]), torch.tensor([10.0, 5.0, 40.0, 30.0])):
        sub = logits[..., int(crop[1]):, int(crop[0]):].contiguous()
        masks, scores, boxes = sam._filter_masks(sub, iou, (30, 40), crop)
        rle, sc2, bx2 = ip.filter_masks(sub, iou, (30, 40), crop, 0.3, 0.6, 0.0, 1.0)
        assert torch.equal(scores, sc2) and torch.equal(boxes, bx2) and len(rle) == masks.shape[0] > 0
        ref_masks, ref_scores, _, _ = ip.post_process_for_mask_generation(rle, sc2, bx2, 0.5)
        from torchvision.ops import batched_nms
        keep = batched_nms(boxes.float(), scores, torch.zeros_like(scores), 0.5)
        assert torch.equal(scores[keep], ref_scores)
        assert torch.equal(masks[keep], torch.stack(ref_masks))


@pytest.mark.parametrize("make", [lambda: SAMProposer.tiny(), lambda: SuperpixelProposer()])
def test_bad_images(make):
    prop = make()
    assert_raises_naming(lambda: prop(_image(8, 8).float()), TypeError, ["image", "uint8"])
    assert_raises_naming(lambda: prop(_image(8, 8).unsqueeze(0)), ValueError, ["one RGB image", "batch"])
    assert_raises_naming(lambda: prop(_image(8, 8)[:2]), ValueError, ["(3, H, W)"])
    assert_raises_naming(lambda: prop(np.zeros((3, 8, 8), np.uint8)), TypeError, ["torch.Tensor"])
    assert_raises_naming(lambda: prop(torch.zeros(3, 0, 8, dtype=torch.uint8)), ValueError, ["0x8"])


def test_sam_bad_options():
    assert_raises_naming(lambda: SAMProposer.tiny(points_per_side=0), ValueError, ["points_per_side"])
    assert_raises_naming(lambda: SAMProposer.tiny(nms_iou=1.5), ValueError, ["nms_iou"])
    assert_raises_naming(lambda: SAMProposer.tiny(image_size=50), ValueError, ["image_size", "32"])
