import json
import shutil
import sys

import numpy as np
import pytest
import torch
from _helpers import assert_raises_naming
from PIL import Image

from weakseg.data import (
    DATASETS, ADE20K, COCOObject, DatasetLayoutError, ImageFolder, VOCSegmentation, collate_samples, open_dataset,
)
from weakseg.data.classnames import (
    ADE20K_CLASSES, CITYSCAPES_CLASSES, COCO_OBJECT_CLASSES, COCO_STUFF_CLASSES, COCO_THING_IDS, COCO_THINGS,
    CONTEXT59_CLASSES, CONTEXT60_CLASSES, VOC_CLASSES,
)

H, W = 8, 10

# pycocotools' RLE decode trips NumPy 2's __array__(copy=) deprecation (library code, harmless)
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def rgb(seed, h=H, w=W):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def write_image(path, seed, h=H, w=W):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb(seed, h, w)).save(path)


def write_ids(path, arr, palette=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    if palette:
        im = Image.fromarray(arr.astype(np.uint8), mode="P")
        im.putpalette([(i * 37) % 256 for i in range(256 * 3)])
    else:
        im = Image.fromarray(arr.astype(np.uint8), mode="L")
    im.save(path)


def label(values, seed):
    return np.random.default_rng(seed).choice(np.asarray(values), size=(H, W))


def pil_rgb(path):
    return torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)


def check_sample(ds, i, expect_label):
    s = ds[i]
    assert s.image.dtype == torch.uint8 and s.image.shape == (3, H, W)
    assert torch.equal(s.image, pil_rgb(ds.image_path(i)))
    assert s.label.dtype == torch.int64
    assert s.label.tolist() == np.asarray(expect_label).tolist()
    present = sorted(set(np.unique(expect_label).tolist()) - {255})
    if ds.has_background:
        present = sorted(set(present) | {0})
    assert s.image_labels == present
    return s


# ------------------------------------------------------------------------------------------ VOC
VOC_IDS = ["2007_000032", "2007_000039", "2008_000001"]


def make_voc(tmp_path):
    base = tmp_path / "VOCdevkit" / "VOC2012"
    labels = {}
    for k, i in enumerate(VOC_IDS):
        write_image(base / "JPEGImages" / f"{i}.jpg", k)
        lab = label([0, 1, 15, 255], k) if k != 1 else label([3, 20, 255], k)  # item 1 has no background
        labels[i] = lab
        write_ids(base / "SegmentationClass" / f"{i}.png", lab, palette=True)
        write_ids(base / "SegmentationClassAug" / f"{i}.png", np.where(lab == 255, 5, lab))
    sets = base / "ImageSets" / "Segmentation"
    sets.mkdir(parents=True)
    (sets / "train.txt").write_text("2007_000032\n2007_000039\n")
    (sets / "val.txt").write_text("2008_000001\n")
    (sets / "aug.txt").write_text("\n".join(VOC_IDS) + "\n")
    return base, labels


def test_voc_reads_palette_labels_and_image_labels(tmp_path):
    base, labels = make_voc(tmp_path)
    for root in (tmp_path, tmp_path / "VOCdevkit", base):
        ds = VOCSegmentation(root, "train")
        assert len(ds) == 2 and ds.names == VOC_IDS[:2]
        assert ds.num_classes == 21 and ds.class_names == list(VOC_CLASSES) and ds.has_background
        for i in range(2):
            s = check_sample(ds, i, labels[VOC_IDS[i]])
        assert 0 in s.image_labels and 0 not in np.unique(labels[VOC_IDS[1]])  # background always listed
        assert ds.label_dir.name == "SegmentationClass"
    ds = VOCSegmentation(tmp_path, "train", always_background=False)
    assert ds[1].image_labels == [3, 20]
    assert ds[-1].name == VOC_IDS[1]
    with pytest.raises(IndexError):
        ds[2]


def test_voc_train_aug_and_label_dir_fallback(tmp_path):
    base, labels = make_voc(tmp_path)
    ds = VOCSegmentation(tmp_path, "train_aug")
    assert ds.names == VOC_IDS and ds.label_dir.name == "SegmentationClassAug"
    for i, n in enumerate(VOC_IDS):
        check_sample(ds, i, np.where(labels[n] == 255, 5, labels[n]))
    # the train_aug.txt file (preferred over aug.txt), in the "image-path label-path" format
    sets = base / "ImageSets" / "Segmentation"
    (sets / "train_aug.txt").write_text(f"/JPEGImages/{VOC_IDS[2]}.jpg /SegmentationClassAug/{VOC_IDS[2]}.png\n")
    assert VOCSegmentation(tmp_path, "aug").names == [VOC_IDS[2]]
    # val falls back to SegmentationClassAug when SegmentationClass is absent
    shutil.rmtree(base / "SegmentationClass")
    assert VOCSegmentation(tmp_path, "val").label_dir.name == "SegmentationClassAug"


def test_voc_class_name_tables(tmp_path):
    make_voc(tmp_path)
    names = VOCSegmentation(tmp_path, "val", class_names="moduseg").class_names
    assert (names[4], names[11], names[15]) == ("ship", "table", "people")
    assert names[16] == "pottedplant"
    ds = open_dataset("voc", tmp_path, "val", class_names="diffsegmenter")
    assert ds.class_names[1] == "plane" and ds.class_names[20] == "monitor"
    assert VOCSegmentation(tmp_path, "val", class_names="iseg").class_names[16] == "potted plant"
    assert_raises_naming(lambda: VOCSegmentation(tmp_path, "val", class_names="nope"), ValueError,
                         ["class_names", "nope", "moduseg"])
    assert_raises_naming(lambda: VOCSegmentation(tmp_path, "val", class_names=["a"]), ValueError, ["1", "21"])


def test_voc_layout_errors_name_the_missing_piece(tmp_path):
    base, _ = make_voc(tmp_path)
    assert_raises_naming(lambda: VOCSegmentation(tmp_path, "test"), ValueError, ["test", "train_aug", "val"])
    assert_raises_naming(lambda: VOCSegmentation(tmp_path / "nowhere", "val"), DatasetLayoutError, ["nowhere"])
    sets = base / "ImageSets" / "Segmentation"
    (sets / "val.txt").unlink()
    assert_raises_naming(lambda: VOCSegmentation(tmp_path, "val"), DatasetLayoutError,
                         ["val.txt", "ImageSets/Segmentation"])
    (sets / "aug.txt").unlink()
    assert_raises_naming(lambda: VOCSegmentation(tmp_path, "train_aug"), DatasetLayoutError,
                         ["train_aug.txt", "aug.txt"])
    (base / "SegmentationClass" / f"{VOC_IDS[1]}.png").unlink()
    assert_raises_naming(lambda: VOCSegmentation(tmp_path, "train"), DatasetLayoutError,
                         [f"SegmentationClass/{VOC_IDS[1]}.png", "1 of the 2", "train.txt"])
    (base / "JPEGImages" / f"{VOC_IDS[0]}.jpg").unlink()
    assert_raises_naming(lambda: VOCSegmentation(tmp_path, "train"), DatasetLayoutError,
                         [f"JPEGImages/{VOC_IDS[0]}.jpg", "image"])
    shutil.rmtree(base / "JPEGImages")
    assert_raises_naming(lambda: VOCSegmentation(tmp_path, "train"), DatasetLayoutError,
                         ["JPEGImages", "VOC2012"])


def test_label_checks_name_the_file(tmp_path):
    base, _ = make_voc(tmp_path)
    bad = base / "SegmentationClass" / f"{VOC_IDS[2]}.png"
    Image.fromarray(rgb(9)).save(bad)  # an RGB colour PNG instead of class ids
    ds = VOCSegmentation(tmp_path, "val")
    assert_raises_naming(lambda: ds[0], ValueError, [str(bad), "mode RGB"])
    write_ids(bad, np.full((H, W), 21))
    assert_raises_naming(lambda: ds[0], ValueError, [str(bad), "[21]"])
    write_ids(bad, np.zeros((H, W + 1)))
    assert_raises_naming(lambda: ds[0], ValueError, [str(bad), "(8, 11)", "(8, 10)"])


def test_dataloader_with_list_collate(tmp_path):
    make_voc(tmp_path)
    ds = VOCSegmentation(tmp_path, "train_aug")
    batches = list(torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=collate_samples))
    assert [len(b) for b in batches] == [2, 1] and batches[1][0].name == VOC_IDS[2]


# ------------------------------------------------------------------------------------------ Context
def make_context(tmp_path):
    base = tmp_path / "VOCdevkit" / "VOC2010"
    raws = {}
    for k, i in enumerate(["2008_000002", "2008_000007"]):
        write_image(base / "JPEGImages" / f"{i}.jpg", 10 + k)
        raws[i] = label([0, 1, 30, 59], 10 + k)
        write_ids(base / "SegmentationClassContext" / f"{i}.png", raws[i])
    sets = base / "ImageSets" / "SegmentationContext"
    sets.mkdir(parents=True)
    (sets / "train.txt").write_text("2008_000002\n")
    (sets / "val.txt").write_text("2008_000002\n2008_000007\n")
    return base, raws


def test_context59_and_60(tmp_path):
    base, raws = make_context(tmp_path)
    c60 = open_dataset("context60", tmp_path, "val")
    c59 = open_dataset("context59", base, "val")
    assert c60.num_classes == 60 and c60.has_background and c60.class_names == list(CONTEXT60_CLASSES)
    assert c59.num_classes == 59 and not c59.has_background and c59.class_names == list(CONTEXT59_CLASSES)
    assert c60.class_names[1:] == c59.class_names
    for i, n in enumerate(c60.names):
        check_sample(c60, i, raws[n])
        s = check_sample(c59, i, np.where(raws[n] == 0, 255, raws[n] - 1))
        assert 58 in s.image_labels and 255 not in s.image_labels
    assert len(open_dataset("context59", tmp_path, "train")) == 1
    (base / "SegmentationClassContext" / "2008_000007.png").unlink()
    assert_raises_naming(lambda: open_dataset("context59", tmp_path, "val"), DatasetLayoutError,
                         ["SegmentationClassContext/2008_000007.png", "val.txt"])
    shutil.rmtree(base / "ImageSets")
    assert_raises_naming(lambda: open_dataset("context60", tmp_path, "val"), DatasetLayoutError,
                         ["SegmentationContext/val.txt"])


# ------------------------------------------------------------------------------------------ Cityscapes
def make_cityscapes(tmp_path):
    raw_ids = np.array([[7, 8, 26, 0, 33, 9, 24, 23, 255, 1]] * H)
    train_ids = label(list(range(19)) + [255], 21)
    items = {"aachen_000000_000019": ("aachen", "trainIds", train_ids),
             "bochum_000000_000313": ("bochum", "labelIds", raw_ids)}
    for k, (stem, (city, kind, arr)) in enumerate(items.items()):
        write_image(tmp_path / "leftImg8bit" / "val" / city / f"{stem}_leftImg8bit.png", 20 + k)
        suffix = "labelTrainIds" if kind == "trainIds" else "labelIds"
        write_ids(tmp_path / "gtFine" / "val" / city / f"{stem}_gtFine_{suffix}.png", arr)
    return items


def test_cityscapes_train_ids_and_label_id_conversion(tmp_path):
    items = make_cityscapes(tmp_path)
    ds = open_dataset("cityscapes", tmp_path, "val")
    assert ds.names == list(items) and ds.num_classes == 19 and not ds.has_background
    assert ds.class_names == list(CITYSCAPES_CLASSES)
    check_sample(ds, 0, items["aachen_000000_000019"][2])
    # labelIds 7 road, 8 sidewalk, 26 car, 0 unlabeled, 33 bicycle, 9 parking, 24 person, 23 sky, 1 ego vehicle
    expect = np.array([[0, 1, 13, 255, 18, 255, 11, 10, 255, 255]] * H)
    s = check_sample(ds, 1, expect)
    assert s.image_labels == [0, 1, 10, 11, 13, 18]
    assert_raises_naming(lambda: open_dataset("cityscapes", tmp_path, "val", label_type="labelIds"),
                         DatasetLayoutError, ["aachen_000000_000019_gtFine_labelIds.png"])
    assert_raises_naming(lambda: open_dataset("cityscapes", tmp_path, "val", label_type="trainIds"),
                         DatasetLayoutError, ["bochum_000000_000313_gtFine_labelTrainIds.png"])
    assert_raises_naming(lambda: open_dataset("cityscapes", tmp_path, "train"), DatasetLayoutError,
                         ["leftImg8bit/train"])
    shutil.rmtree(tmp_path / "gtFine")
    assert_raises_naming(lambda: open_dataset("cityscapes", tmp_path, "val"), DatasetLayoutError, ["gtFine/val"])


# ------------------------------------------------------------------------------------------ ADE20K
def test_ade20k_shift(tmp_path):
    base = tmp_path / "ADEChallengeData2016"
    raws = {}
    for k, stem in enumerate(["ADE_val_00000001", "ADE_val_00000002"]):
        write_image(base / "images" / "validation" / f"{stem}.jpg", 30 + k)
        raws[stem] = label([0, 1, 2, 150], 30 + k)
        write_ids(base / "annotations" / "validation" / f"{stem}.png", raws[stem])
    for root in (tmp_path, base):
        ds = ADE20K(root, "val")
        assert ds.names == list(raws) and ds.num_classes == 150 and ds.class_names == list(ADE20K_CLASSES)
        for i, stem in enumerate(ds.names):
            s = check_sample(ds, i, np.where(raws[stem] == 0, 255, raws[stem] - 1))
        assert s.image_labels == [0, 1, 149]
    (base / "annotations" / "validation" / "ADE_val_00000002.png").unlink()
    assert_raises_naming(lambda: ADE20K(tmp_path, "validation"), DatasetLayoutError,
                         ["annotations/validation/ADE_val_00000002.png"])
    assert_raises_naming(lambda: ADE20K(tmp_path, "train"), DatasetLayoutError, ["images/training"])


# ------------------------------------------------------------------------------------------ COCO-Stuff
def test_coco_stuff(tmp_path):
    raws = {}
    for k, stem in enumerate(["000000000139", "000000000285"]):
        write_image(tmp_path / "images" / "val2017" / f"{stem}.jpg", 40 + k)
        raws[stem] = label([0, 80, 170, 255], 40 + k)
        write_ids(tmp_path / "annotations" / "val2017" / f"{stem}_labelTrainIds.png", raws[stem])
    ds = open_dataset("coco_stuff", tmp_path, "val")
    assert ds.num_classes == 171 and not ds.has_background and ds.class_names == list(COCO_STUFF_CLASSES)
    assert ds.class_names[80] == "banner" and ds.class_names[170] == "wood"
    for i, stem in enumerate(ds.names):
        check_sample(ds, i, raws[stem])
    bad = tmp_path / "annotations" / "val2017" / "000000000139_labelTrainIds.png"
    write_ids(bad, np.full((H, W), 171))
    assert_raises_naming(lambda: ds[0], ValueError, [str(bad), "[171]"])
    bad.unlink()
    assert_raises_naming(lambda: open_dataset("coco_stuff", tmp_path, "val"), DatasetLayoutError,
                         ["000000000139_labelTrainIds.png"])


# ------------------------------------------------------------------------------------------ COCO object
def box(x0, y0, x1, y1):
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


def make_coco(tmp_path):
    from pycocotools import mask as mask_utils

    images = [
        {"id": 139, "file_name": "COCO_val2014_000000000139.jpg", "height": H, "width": W},
        {"id": 285, "file_name": "COCO_val2014_000000000285.jpg", "height": H, "width": W},
        {"id": 632, "file_name": "COCO_val2014_000000000632.jpg", "height": H, "width": W},  # no annotations
    ]
    for k, im in enumerate(images):
        write_image(tmp_path / "val2014" / im["file_name"], 50 + k)
    crowd = np.zeros((H, W), dtype=np.uint8)
    crowd[:, 6:] = 1
    # uncompressed RLE, column-major run lengths
    flat = crowd.flatten(order="F")
    runs, cur, n = [], 0, 0
    for v in flat:
        if v != cur:
            runs.append(n)
            cur, n = v, 0
        n += 1
    runs.append(n)
    bottle = np.zeros((H, W), dtype=np.uint8, order="F")
    bottle[1:4, 1:4] = 1
    rle = mask_utils.encode(np.asfortranarray(bottle))
    rle["counts"] = rle["counts"].decode("ascii")
    anns = [
        # listed small-first with the smaller id: area order, not file order, decides the painting
        {"id": 1, "image_id": 139, "category_id": 90, "segmentation": box(3, 2, 6, 5), "area": 9.0,
         "bbox": [3, 2, 3, 3], "iscrowd": 0},
        {"id": 2, "image_id": 139, "category_id": 1, "segmentation": box(1, 1, 9, 7), "area": 48.0,
         "bbox": [1, 1, 8, 6], "iscrowd": 0},
        {"id": 3, "image_id": 285, "category_id": 18, "segmentation": {"counts": runs, "size": [H, W]},
         "area": float(crowd.sum()), "bbox": [6, 0, 4, 8], "iscrowd": 1},
        {"id": 4, "image_id": 285, "category_id": 44, "segmentation": rle, "area": 9.0,
         "bbox": [1, 1, 3, 3], "iscrowd": 0},
    ]
    cats = [{"id": i, "name": n, "supercategory": "x"} for i, n in zip(COCO_THING_IDS, COCO_THINGS)]
    ann_file = tmp_path / "annotations" / "instances_val2014.json"
    ann_file.parent.mkdir()
    ann_file.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return images, anns, crowd, bottle


def expected_coco(images, anns):
    """Paint each image's annotations, largest area first, straight from pycocotools' mask decoding."""
    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = {"images": images, "annotations": anns, "categories": []}
    coco.createIndex()
    out = {}
    for im in images:
        lab = np.zeros((H, W), dtype=np.int64)
        for a in sorted((a for a in anns if a["image_id"] == im["id"]), key=lambda a: -a["area"]):
            lab[coco.annToMask(a) > 0] = COCO_THING_IDS.index(a["category_id"]) + 1
        out[im["file_name"][:-4]] = lab
    return out


def test_coco_object_rasterisation_and_cache(tmp_path, monkeypatch):
    images, anns, crowd, bottle = make_coco(tmp_path)
    expect = expected_coco(images, anns)
    cache = tmp_path / "cache"
    ds = COCOObject(tmp_path, "val", cache_dir=cache)
    assert ds.num_classes == 81 and ds.has_background and ds.class_names == list(COCO_OBJECT_CLASSES)
    assert ds.class_names[80] == "toothbrush" and ds.class_names[17] == "dog" and ds.class_names[40] == "bottle"
    assert ds.names == [im["file_name"][:-4] for im in images]
    s0 = check_sample(ds, 0, expect[ds.names[0]])
    # hand-checked pixels: small toothbrush (80) on top of the large person (1), background outside
    assert s0.label[3, 4] == 80 and s0.label[1, 1] == 1 and s0.label[6, 8] == 1 and s0.label[0, 0] == 0
    assert s0.image_labels == [0, 1, 80]
    s1 = check_sample(ds, 1, expect[ds.names[1]])
    assert (s1.label[crowd == 1] == 17).all()  # crowd dog from an uncompressed RLE
    assert (s1.label[bottle == 1] == 40).all()  # bottle (COCO id 44) from a compressed RLE
    assert ((s1.label == 0) == torch.from_numpy((crowd == 0) & (bottle == 0))).all()
    s2 = check_sample(ds, 2, np.zeros((H, W)))
    assert s2.image_labels == [0]
    # cached as PNG id maps, atomically (no temporary left behind)
    (sub,) = [p for p in cache.iterdir()]
    assert sub.name.startswith("val2014-")
    assert sorted(p.name for p in sub.iterdir()) == sorted([f"{n}.png" for n in ds.names] + ["index.json"])
    assert np.array_equal(np.asarray(Image.open(sub / f"{ds.names[0]}.png")), expect[ds.names[0]])
    # the next open reuses the cache without pycocotools or the JSON
    monkeypatch.setitem(sys.modules, "pycocotools", None)
    monkeypatch.setitem(sys.modules, "pycocotools.coco", None)
    again = COCOObject(tmp_path, "val", cache_dir=cache)
    assert torch.equal(again[0].label, s0.label) and again.names == ds.names
    # ... but a cache miss needs pycocotools and says so
    (sub / f"{ds.names[1]}.png").unlink()
    assert_raises_naming(lambda: again[1], ImportError, ["pycocotools"])


def test_coco_object_prepare_skip_and_fingerprint(tmp_path):
    images, anns, _, _ = make_coco(tmp_path)
    expect = expected_coco(images, anns)
    ds = COCOObject(tmp_path, "val2014", skip_unannotated=True, prepare=True)  # default cache under root
    assert len(ds) == 2 and ds.names == [im["file_name"][:-4] for im in images[:2]]
    sub = ds.cache_dir
    assert sub.parent == tmp_path / "weakseg_cache" / "coco_object"
    assert all(ds.label_path(i).is_file() for i in range(len(ds)))
    for i, n in enumerate(ds.names):
        check_sample(ds, i, expect[n])
    # editing the annotations gives a fresh cache directory
    ann_file = tmp_path / "annotations" / "instances_val2014.json"
    data = json.loads(ann_file.read_text())
    data["annotations"] = data["annotations"][1:]  # drop the toothbrush
    ann_file.write_text(json.dumps(data) + " ")
    fresh = COCOObject(tmp_path, "val", skip_unannotated=True)
    assert fresh.cache_dir != sub
    assert fresh[0].image_labels == [0, 1]


def test_coco_object_layout_errors(tmp_path):
    make_coco(tmp_path)
    assert_raises_naming(lambda: COCOObject(tmp_path, "train"), DatasetLayoutError, ["train2014"])
    (tmp_path / "val2014" / "COCO_val2014_000000000285.jpg").unlink()
    assert_raises_naming(lambda: COCOObject(tmp_path, "val", cache_dir=tmp_path / "c"), DatasetLayoutError,
                         ["COCO_val2014_000000000285.jpg", "instances_val2014.json"])
    (tmp_path / "annotations" / "instances_val2014.json").unlink()
    assert_raises_naming(lambda: COCOObject(tmp_path, "val"), DatasetLayoutError,
                         ["annotations/instances_val2014.json"])


# ------------------------------------------------------------------------------------------ folder
def test_image_folder(tmp_path):
    write_image(tmp_path / "b.jpg", 1)
    write_image(tmp_path / "a.PNG", 2)
    write_image(tmp_path / "sub" / "c.png", 3, h=5, w=7)
    (tmp_path / "notes.txt").write_text("not an image")
    ds = open_dataset("folder", tmp_path, None)
    assert ds.names == ["a", "b"] and ds.num_classes == 0
    s = ds[0]
    assert s.label is None and s.image_labels == [] and torch.equal(s.image, pil_rgb(tmp_path / "a.PNG"))
    rec = ImageFolder(tmp_path, recursive=True, class_names=["cat", "dog"])
    assert rec.names == ["a", "b", "sub/c"] and rec[2].image.shape == (3, 5, 7) and rec.class_names == ["cat", "dog"]
    (tmp_path / "empty").mkdir()
    assert_raises_naming(lambda: ImageFolder(tmp_path / "empty"), DatasetLayoutError, ["empty", "recursive"])
    assert_raises_naming(lambda: ImageFolder(tmp_path / "missing"), DatasetLayoutError, ["missing"])


def test_registry():
    assert set(DATASETS) == {"voc", "coco_object", "context59", "context60", "cityscapes", "ade20k", "coco_stuff",
                             "folder"}
    assert_raises_naming(lambda: open_dataset("kitti", "/x"), KeyError, ["kitti", "voc", "ade20k"])
