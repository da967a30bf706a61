"""Class-name tables of the benchmark datasets, and the rename tables the methods use.

Index i of each list is class id i of the label maps the readers in
:mod:`weakseg.data.datasets` return. The lists follow the dataset devkits and
the MMSegmentation dataset definitions (the names are data; ADE20K keeps
MMSegmentation's spelling).
"""

from __future__ import annotations

from typing import Mapping, Sequence

__all__ = [
    "VOC_CLASSES", "COCO_THINGS", "COCO_THING_IDS", "COCO_OBJECT_CLASSES", "CONTEXT59_CLASSES", "CONTEXT60_CLASSES",
    "CITYSCAPES_CLASSES", "CITYSCAPES_LABELID_TO_TRAINID", "ADE20K_CLASSES", "COCO_STUFF_CLASSES",
    "CLASS_RENAMES", "rename_classes", "BACKGROUND_NAMES", "has_background",
]

from weakseg.core import BACKGROUND_NAMES, has_background  # noqa: E402  (the class convention of segment)

# PASCAL VOC 2012: background + 20 objects, devkit spelling.
VOC_CLASSES: tuple[str, ...] = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)

# The 80 COCO object categories in ascending category-id order (ids 1..90 with gaps).
COCO_THINGS: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard",
    "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
)

# Their COCO category ids (1..90 without 12, 26, 29, 30, 45, 66, 68, 69, 71, 83).
COCO_THING_IDS: tuple[int, ...] = tuple(i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83))

# COCO-Object: background 0 + the 80 things as 1..80.
COCO_OBJECT_CLASSES: tuple[str, ...] = ("background",) + COCO_THINGS

# PASCAL Context, the 59 most frequent classes (MMSegmentation order); Context-60 adds background as 0.
CONTEXT59_CLASSES: tuple[str, ...] = (
    "aeroplane", "bag", "bed", "bedclothes", "bench", "bicycle", "bird", "boat", "book", "bottle", "building",
    "bus", "cabinet", "car", "cat", "ceiling", "chair", "cloth", "computer", "cow", "cup", "curtain", "dog",
    "door", "fence", "floor", "flower", "food", "grass", "ground", "horse", "keyboard", "light", "motorbike",
    "mountain", "mouse", "person", "plate", "platform", "pottedplant", "road", "rock", "sheep", "shelves",
    "sidewalk", "sign", "sky", "snow", "sofa", "table", "track", "train", "tree", "truck", "tvmonitor", "wall",
    "water", "window", "wood",
)
CONTEXT60_CLASSES: tuple[str, ...] = ("background",) + CONTEXT59_CLASSES

# Cityscapes, the 19 evaluation classes (trainIds 0..18).
CITYSCAPES_CLASSES: tuple[str, ...] = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
)

# Cityscapes labelIds 0..33 -> trainIds (255 = ignored in evaluation); the standard 34 -> 19 table.
CITYSCAPES_LABELID_TO_TRAINID: dict[int, int] = {
    **{i: 255 for i in range(34)},
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12, 26: 13,
    27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}

# ADE20K SceneParsing, 150 classes (GT values 1..150 -> ids 0..149).
ADE20K_CLASSES: tuple[str, ...] = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk",
    "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand",
    "path", "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge",
    "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove",
    "palm", "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus",
    "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver",
    "airplane", "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle",
    "buffet", "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything",
    "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven",
    "ball", "food", "step", "tank", "trade name", "microwave", "pot", "animal", "bicycle", "lake",
    "dishwasher", "screen", "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray",
    "ashcan", "fan", "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator", "glass",
    "clock", "flag",
)

# COCO-Stuff 164k, 171 classes (labelTrainIds 0..170): the 80 things, then 91 stuff classes.
COCO_STUFF_CLASSES: tuple[str, ...] = COCO_THINGS + (
    "banner", "blanket", "branch", "bridge", "building-other", "bush", "cabinet", "cage", "cardboard", "carpet",
    "ceiling-other", "ceiling-tile", "cloth", "clothes", "clouds", "counter", "cupboard", "curtain",
    "desk-stuff", "dirt", "door-stuff", "fence", "floor-marble", "floor-other", "floor-stone", "floor-tile",
    "floor-wood", "flower", "fog", "food-other", "fruit", "furniture-other", "grass", "gravel", "ground-other",
    "hill", "house", "leaves", "light", "mat", "metal", "mirror-stuff", "moss", "mountain", "mud", "napkin",
    "net", "paper", "pavement", "pillow", "plant-other", "plastic", "platform", "playingfield", "railing",
    "railroad", "river", "road", "rock", "roof", "rug", "salad", "sand", "sea", "shelf", "sky-other",
    "skyscraper", "snow", "solid-other", "stairs", "stone", "straw", "structural-other", "table", "tent",
    "textile-other", "towel", "tree", "vegetable", "wall-brick", "wall-concrete", "wall-other", "wall-panel",
    "wall-stone", "wall-tile", "wall-wood", "water-other", "waterdrops", "window-blind", "window-other", "wood",
)

# Per dataset, per method: devkit name -> the name the method puts in its prompts / class file.
# Only renames stated in the method specs or the authors' class tables are listed; every other class keeps
# its devkit name.
_DS_CONTEXT = {"aeroplane": "airplane", "pottedplant": "plant", "tvmonitor": "monitor"}
_ISEG_CONTEXT = {"aeroplane": "plane", "bedclothes": "bedding", "computer": "laptop", "pottedplant": "plant",
                 "tvmonitor": "monitor"}
CLASS_RENAMES: dict[str, dict[str, dict[str, str]]] = {
    "voc": {
        # ModuSeg's class file (meta/class_mapping.json): ship, people, table.
        "moduseg": {"boat": "ship", "person": "people", "diningtable": "table"},
        # DiffSegmenter's single-token VOC words (open_vocabulary/voc12/ptp_stable_best.py, ``embs``).
        "diffsegmenter": {"aeroplane": "plane", "bus": "buses", "diningtable": "table", "person": "people",
                          "pottedplant": "plant", "tvmonitor": "monitor"},
        # iSeg's voc_name20 (data/voc/voc_name20.py) spells the compound names as words (it then picks
        # token subsets: "potted plant" -> token 1, "tv monitor" -> token 1, "dining table" -> tokens 0, 1).
        "iseg": {"aeroplane": "plane", "pottedplant": "potted plant", "tvmonitor": "tv monitor",
                 "diningtable": "dining table"},
    },
    # PASCAL Context (VOC2010 images): DiffSegmenter's open_vocabulary/voc10/ptp_stable_voc10.py ``embs``;
    # iSeg's context_name59 (data/voc_context/context_name59.py, the keys of VOC_CONTEXT_NAME).
    "context59": {"diffsegmenter": dict(_DS_CONTEXT), "iseg": dict(_ISEG_CONTEXT)},
    "context60": {"diffsegmenter": dict(_DS_CONTEXT), "iseg": dict(_ISEG_CONTEXT)},
    "coco_object": {
        # DiffSegmenter's open_vocabulary/coco/ptp_stable_coco.py ``embs``: VOC-style spellings, and
        # "toothbrus" as the reference writes it (its class JSON has that spelling, so its prompts do).
        "diffsegmenter": {"motorcycle": "motorbike", "airplane": "aeroplane", "couch": "sofa",
                          "potted plant": "pottedplant", "dining table": "diningtable", "tv": "tvmonitor",
                          "toothbrush": "toothbrus"},
        # iSeg's coco_name80 (data/coco14/coco_name80.py).
        "iseg": {"person": "people", "airplane": "plane", "motorcycle": "motorbike", "couch": "sofa",
                 "tv": "tv monitor"},
    },
}


def rename_classes(names: Sequence[str], table: Mapping[str, str] | None) -> list[str]:
    """``names`` with every entry found in ``table`` replaced (others unchanged)."""
    table = table or {}
    return [table.get(n, n) for n in names]


def _check_lengths() -> None:
    expected = {"VOC_CLASSES": 21, "COCO_THINGS": 80, "COCO_THING_IDS": 80, "COCO_OBJECT_CLASSES": 81, "CONTEXT59_CLASSES": 59,
                "CONTEXT60_CLASSES": 60, "CITYSCAPES_CLASSES": 19, "ADE20K_CLASSES": 150,
                "COCO_STUFF_CLASSES": 171}
    g = globals()
    for name, n in expected.items():
        if len(g[name]) != n or len(set(g[name])) != n:
            raise AssertionError(f"{name}: expected {n} distinct names, got {len(g[name])} "
                                 f"({len(set(g[name]))} distinct)")


_check_lengths()
