import numpy as np
import pytest
import torch

from weakseg.toy.world import CLASSES, COLORS, STUFF, ToyWorld, caption_for


def test_scenes_are_deterministic_and_order_free():
    w = ToyWorld(size=48, num_scenes=10)
    a = [w.scene(i) for i in (3, 1, 7)]
    b = [ToyWorld(size=48, num_scenes=10)[i] for i in (3, 1, 7)]
    for x, y in zip(a, b):
        assert torch.equal(x.image, y.image) and torch.equal(x.label, y.label) and x.caption == y.caption
    assert not torch.equal(a[0].image, a[1].image)


def test_splits_and_seeds_give_different_scenes():
    imgs = {(split, seed): ToyWorld(size=32, split=split, seed=seed).scene(0).image
            for split in ("train", "val", "test") for seed in (0, 1)}
    keys = list(imgs)
    for i in range(len(keys)):
        for j in range(i + 1, len(keys)):
            assert not torch.equal(imgs[keys[i]], imgs[keys[j]]), (keys[i], keys[j])


def test_scene_contents_are_consistent():
    w = ToyWorld(size=64, min_objects=1, max_objects=3)
    for i in range(30):
        s = w.scene(i)
        assert s.image.dtype == torch.uint8 and s.image.shape == (3, 64, 64)
        assert s.label.dtype == torch.int64 and s.label.shape == (64, 64)
        assert s.image_labels == sorted(torch.unique(s.label).tolist())
        assert 1 <= len(s.objects) <= 3 and s.stuff in STUFF
        assert s.caption.startswith("a photo of ") and s.caption.endswith(f" on {s.stuff}")
        for c in s.image_labels[1:]:  # every visible class is named in the caption
            assert CLASSES[c] in s.caption
        for o in s.objects:
            assert o.color in COLORS and 1 <= o.cls < len(CLASSES)
        # object pixels carry the object's colour, background pixels the stuff texture
        img = s.image.float()
        fg = s.label > 0
        if fg.any() and (~fg).any():
            assert (img[:, fg].mean(1) - img[:, ~fg].mean(1)).abs().sum() > 0


def test_shapes_have_the_expected_area():
    """Each shape's pixel area matches its geometry (circle pi r^2, ring pi r^2 (1 - 0.55^2), ...)."""
    w = ToyWorld(size=96, min_objects=1, max_objects=1, radius=(0.2, 0.2))
    r = 0.2 * 96
    expected = {"circle": np.pi * r * r, "ring": np.pi * r * r * (1 - 0.55 ** 2), "square": (1.64 * r) ** 2,
                "triangle": 3 * np.sqrt(3) / 4 * r * r}
    seen = {}
    for i in range(40):
        s = w.scene(i)
        name = CLASSES[s.objects[0].cls]
        seen.setdefault(name, (s.label == s.objects[0].cls).sum().item())
    for name, area in expected.items():
        if name in seen:
            assert abs(seen[name] - area) / area < 0.08, (name, seen[name], area)
    if "star" in seen:  # a 5-point star with inner radius 0.45 r lies between the pentagon of notches and the disc
        assert 0.25 * np.pi * r * r < seen["star"] < 0.6 * np.pi * r * r


def test_caption_grammar():
    from weakseg.toy.world import ToyObject
    objs = [ToyObject(1, "red", 5, 5, 3, 0), ToyObject(4, "orange", 9, 9, 3, 0), ToyObject(5, "blue", 2, 2, 2, 0)]
    assert caption_for(objs[:1], "grass") == "a photo of a red circle on grass"
    assert caption_for(objs, "sky") == "a photo of a red circle, an orange star and a blue ring on sky"


def test_dataset_protocol_and_errors():
    w = ToyWorld(size=32, num_scenes=4)
    assert len(w) == 4 and w.class_names[0] == "background" and w.num_classes == len(CLASSES)
    with pytest.raises(IndexError):
        w[4]
    for kwargs, word in [({"size": 8}, "size"), ({"split": "dev"}, "split"), ({"min_objects": 0}, "min_objects"),
                         ({"radius": (0.3, 0.6)}, "radius"), ({"num_scenes": -1}, "num_scenes")]:
        with pytest.raises(ValueError, match=word):
            ToyWorld(**kwargs)


def test_toy_captions_with_crops_append_one_object_each_captioned_alone():
    from weakseg.toy.world import ToyCaptions, crop_half, crop_objects

    plain, ds = ToyCaptions(num_scenes=3, size=48), ToyCaptions(num_scenes=3, size=48, crops=4, crop_seed=2)
    assert len(plain) == 3 and len(ds) == 7
    assert ds.keys == [f"toy{i:06d}" for i in range(3)] + [f"toycrop{j:06d}" for j in range(4)]
    for i in range(3):  # the scenes come first and are the plain ones
        assert torch.equal(ds[i].image, plain[i].image) and ds[i].caption == plain[i].caption
    world = ToyWorld(size=48, num_scenes=3)
    for j in range(4):
        c, s = ds[3 + j], world.scene(j)
        assert c.image.shape == (3, 48, 48) and c.image.dtype == torch.uint8 and c.key == f"toycrop{j:06d}"
        # one of scene j's objects, named alone, and the crop is that object's box of scene j
        objs = [o for o in s.objects if caption_for([o], s.stuff) == c.caption]
        assert objs, (c.caption, s.caption)
        rng = np.random.default_rng([2, j])
        shown = [s.objects[n] for n in s.shown]
        o = shown[int(rng.integers(len(shown)))]
        assert caption_for([o], s.stuff) == c.caption
        half = crop_half([o.radius], rng)
        assert torch.equal(c.image, crop_objects(s.image[None], [o.cy], [o.cx], half, 48)[0])
        # the object fills a good part of its crop (the same box cut out of its class's mask)
        mask = (s.label == o.cls).to(torch.uint8).mul(255)[None, None].expand(1, 3, 48, 48)
        box = crop_objects(mask, [o.cy], [o.cx], half, 48)
        assert box[0, 0].float().div(255).mean() > 0.2
    assert ds.captions[3:] == [ds[3 + j].caption for j in range(4)]
    with pytest.raises(IndexError):
        ds[7]
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="crops"):
            ToyCaptions(num_scenes=2, crops=bad)


def test_crop_half_keeps_a_minimum_and_scales_with_the_radius():
    from weakseg.toy.world import CROP_HALF, CROP_MIN_HALF, crop_half

    h = crop_half([1.0, 10.0, 20.0], np.random.default_rng(0))
    assert h[0] == CROP_MIN_HALF and 0.9 * CROP_HALF * 10 <= h[1] <= 1.3 * CROP_HALF * 10
    assert 0.9 * CROP_HALF * 20 <= h[2] <= 1.3 * CROP_HALF * 20


def test_a_fully_covered_object_is_not_shown_named_or_cropped(monkeypatch):
    """An object hidden under a later, bigger one has no visible pixel: the scene's ``shown`` leaves it out, the
    caption does not name it and a crop never shows it (its box would show the neighbour under its name)."""
    from weakseg.toy.world import ToyCaptions, ToyObject

    hidden = ToyObject(cls=CLASSES.index("circle"), color="red", cy=24.0, cx=24.0, radius=4.0, angle=0.0)
    top = ToyObject(cls=CLASSES.index("square"), color="blue", cy=24.0, cx=24.0, radius=14.0, angle=0.0)
    monkeypatch.setattr(ToyWorld, "sample_layout", lambda self, rng: ("grass", [hidden, top]))
    s = ToyWorld(size=48, num_scenes=2).scene(0)
    assert s.shown == [1] and CLASSES.index("circle") not in s.image_labels
    assert "circle" not in s.caption and "blue square" in s.caption
    ds = ToyCaptions(num_scenes=2, size=48, crops=6, cache=False)
    assert all(ds[2 + j].caption == caption_for([top], "grass") for j in range(6))
    monkeypatch.setattr(ToyWorld, "sample_layout", lambda self, rng: ("grass", [top, hidden]))
    assert ToyWorld(size=48, num_scenes=2).scene(0).shown == [0, 1]
