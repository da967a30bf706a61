import pytest
import torch

from weakseg.methods.common import (BackgroundRule, clip_tag_classes, has_background, minmax_per_class, resize_maps,
                                    scores_to_labels)


def test_minmax_and_resize():
    x = torch.tensor([[[[1.0, 3.0], [2.0, 5.0]], [[4.0, 4.0], [4.0, 4.0]]]])
    y = minmax_per_class(x)
    torch.testing.assert_close(y[0, 0], torch.tensor([[0.0, 0.5], [0.25, 1.0]]), atol=1e-4, rtol=0)
    assert (y[0, 1] == 0).all()  # a constant map becomes 0
    assert resize_maps(x, (2, 2)) is x and resize_maps(x, (4, 6)).shape == (1, 2, 4, 6)


def test_power_rule_is_iseg_cam_to_label():
    names = ["background", "cat", "dog"]
    fg = torch.tensor([[[[0.9, 0.2]], [[0.1, 0.3]]]])  # (1, 2, 1, 2)
    scores, labels = scores_to_labels(fg, names, rule=BackgroundRule("power", 2.0))
    # pixel 0: bg = (1-0.9)^2 = 0.01 -> cat; pixel 1: bg = (1-0.3)^2 = 0.49 -> background
    torch.testing.assert_close(scores[0, 0, 0], torch.tensor([0.01, 0.49]))
    assert labels.tolist() == [[[1, 0]]]


def test_image_labels_mask_absent_classes():
    names = ["background", "cat", "dog"]
    fg = torch.tensor([[[[0.9]], [[0.95]]]])
    _, labels = scores_to_labels(fg, names, torch.tensor([[True, True, False]]))
    assert labels.item() == 1  # dog is not in the image, cat wins
    _, labels = scores_to_labels(fg, names, torch.tensor([[True, False, False]]))
    assert labels.item() == 0  # only background allowed


def test_threshold_and_constant_rules():
    names = ["background", "a", "b"]
    fg = torch.tensor([[[[0.5, 0.3, 0.0]], [[0.2, 0.44, 0.0]]]])
    _, labels = scores_to_labels(fg, names, rule=BackgroundRule("threshold", 0.45))
    assert labels.tolist() == [[[1, 0, 0]]]  # 0.3 and 0.44 fall below the threshold
    _, labels = scores_to_labels(fg, names, rule=BackgroundRule("constant", 0.4))
    assert labels.tolist() == [[[1, 2, 0]]]


def test_no_background_datasets_take_the_argmax():
    names = ["wall", "floor", "sky"]
    assert not has_background(names) and has_background(["background", "x"])
    fg = torch.tensor([[[[0.1]], [[0.7]], [[0.2]]]])
    scores, labels = scores_to_labels(fg, names)
    assert scores.shape == (1, 3, 1, 1) and labels.item() == 1


def test_errors():
    with pytest.raises(ValueError, match="foreground maps"):
        scores_to_labels(torch.zeros(1, 3, 2, 2), ["background", "a", "b"])
    with pytest.raises(ValueError, match="image_labels"):
        scores_to_labels(torch.zeros(1, 2, 2, 2), ["background", "a", "b"], torch.ones(1, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="kind"):
        BackgroundRule("magic")
    with pytest.raises(ValueError, match="value"):
        BackgroundRule("threshold", 1.5)


def test_clip_tagging_keeps_topk_above_threshold():
    from weakseg.backbones.clip import CLIPBackbone

    clip = CLIPBackbone.tiny(seed=0)
    imgs = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    names = ["background", "circle", "square", "star", "ring"]
    keep = clip_tag_classes(clip, imgs, names, topk=2, threshold=0.0, templates="single")
    assert keep.shape == (2, 5) and keep[:, 0].all() and (keep[:, 1:].sum(1) == 2).all()
    keep = clip_tag_classes(clip, imgs, names, topk=3, threshold=1.01, templates="single")
    assert (keep[:, 1:].sum(1) == 1).all()  # nothing passes the threshold: the top class stays


def test_minmax_has_no_absolute_eps():
    # the references divide by the range itself: a map of range 1e-4 must still reach 1 (an eps of 1e-5
    # gave 1e-4 / 1.1e-4 = 0.91 and let a weaker class win the pixel)
    x = torch.tensor([[[0.0, 1e-4]], [[0.0, 0.95]]])[None]  # (1, 2, 1, 2)
    y = minmax_per_class(x)
    torch.testing.assert_close(y[0, 0, 0], torch.tensor([0.0, 1.0]), atol=1e-6, rtol=0)
    assert y[0, :, 0, 1].argmax().item() == 0
    # the test is relative: a map of values ~1e-4 with range 1e-5 normalises exactly
    z = minmax_per_class(torch.tensor([[[[1e-4, 1.1e-4, 1.05e-4]]]]))
    torch.testing.assert_close(z[0, 0, 0], torch.tensor([0.0, 1.0, 0.5]), atol=1e-5, rtol=0)
    # a zero range, or one of a few ulps (a 1x1 map upsampled bilinearly), gives 0, not NaN or noise
    one = torch.full((1, 1, 1, 1), 0.0113890)
    up = torch.nn.functional.interpolate(one, size=(8, 8), mode="bilinear", align_corners=False)
    c = torch.tensor([[[[3.0, 3.0]], [[1.0, 1.0 + 2 ** -23]]]])
    for m in (minmax_per_class(c), minmax_per_class(up), minmax_per_class(torch.full((1, 1, 4), 0.5) + 
                                                                          torch.tensor([0, 1e-7, 0, 0]))):
        assert m.eq(0).all()
    with pytest.raises(ValueError, match="eps"):
        minmax_per_class(x, eps=-1.0)


def test_check_segment_inputs_is_the_one_check_every_method_runs():
    import weakseg
    from weakseg.core import check_segment_inputs

    img = torch.zeros(3, 8, 8, dtype=torch.uint8)
    inp = check_segment_inputs([img, img], ["background", "cat"], torch.tensor([[1, 1], [1, 0]]).bool())
    assert inp.size == (8, 8) and inp.background and inp.batch == 2 and inp.allowed.tolist() == [[1, 1], [1, 0]]
    cases = [
        (([img, torch.zeros(3, 8, 9, dtype=torch.uint8)], ["cat"]), {}, "images: one batch"),
        (([img], "cat,dog"), {}, "class_names: expected a list"),
        (([img], []), {}, "at least one class"),
        (([img], ["cat", " "]), {}, "empty class name at position 1"),
        (([img], ["cat", "dog", "cat"]), {}, "'cat' is given twice (positions 0 and 2)"),
        (([img], ["cat"]), {"background": "required"}, "needs the background first"),
        (([img], ["background"]), {"min_foreground": 1}, "at least 1"),
        (([img], ["cat"], torch.ones(1, 2, dtype=torch.bool)), {}, "image_labels: expected a (B, C) = (1, 1)"),
    ]
    for args, kw, words in cases:
        with pytest.raises(ValueError) as e:
            check_segment_inputs(*args, **kw)
        assert words in str(e.value), (words, str(e.value))
    # every method runs it: a duplicate class reaches the same error through segment()
    seg = weakseg.create("synseg", preset="tiny")
    with pytest.raises(ValueError, match="given twice"):
        seg.segment([torch.zeros(3, 64, 64, dtype=torch.uint8)], ["background", "cat", "cat"])


def _pamr_naive(img, masks, iterations, dilations):
    """PAMR written out per pixel (the definition in weakseg.methods.common.PAMR's docstring)."""
    import math

    _, C, H, W = img.shape
    offs = [(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)]

    def at(t, y, x):  # replicate padding
        return t[:, min(max(y, 0), H - 1), min(max(x, 0), W - 1)]

    aff = {}
    for y in range(H):
        for x in range(W):
            nb = [(y + d * dy, x + d * dx) for d in dilations for dy, dx in offs]
            vals = torch.stack([at(img[0], *p) for p in nb])                      # (N, C)
            hood = torch.stack([t for d in dilations
                                for t in [at(img[0], y, x)] + [at(img[0], y + d * dy, x + d * dx) for dy, dx in offs]])
            sigma = hood.std(dim=0)                                                # (C,)
            logits = (-(vals - img[0, :, y, x]).abs() / (1e-8 + 0.1 * sigma)).mean(dim=1)
            aff[y, x] = (nb, torch.softmax(logits, 0))
    m = masks[0].clone()
    for _ in range(iterations):
        new = torch.empty_like(m)
        for (y, x), (nb, a) in aff.items():
            new[:, y, x] = sum(a[i] * at(m, *p) for i, p in enumerate(nb))
        m = new
    assert math.isfinite(float(m.sum()))
    return m[None]


@pytest.mark.parametrize("hw,dil,it", [((5, 6), (1,), 2), ((7, 4), (1, 2), 3), ((1, 1), (1, 3), 1)])
def test_pamr_matches_its_per_pixel_definition(hw, dil, it):
    from weakseg.methods.common import PAMR

    g = torch.Generator().manual_seed(hw[0] * 10 + it)
    img = torch.rand(1, 3, *hw, generator=g)
    masks = torch.rand(1, 2, *hw, generator=g)
    torch.testing.assert_close(PAMR(it, dil)(img, masks), _pamr_naive(img, masks, it, dil), rtol=1e-4, atol=1e-5)


def test_pamr_keeps_masks_in_range_and_snaps_them_to_colour_edges():
    from weakseg.methods.common import PAMR

    img = torch.zeros(1, 3, 16, 16)
    img[..., 8:] = 1.0                                   # two flat halves, the edge between columns 7 and 8
    img += 0.01 * torch.randn(img.shape, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., 5:] = 1.0                                  # a coarse mask that leaks 3 columns past the edge
    out = PAMR(10)(img, mask)
    assert out.shape == (1, 1, 16, 16) and 0 <= float(out.min()) and float(out.max()) <= 1 + 1e-6
    assert float(out[..., 5:8].mean()) < 0.35 and float(out[..., 9:].mean()) > 0.95
    torch.testing.assert_close(PAMR(0)(img, mask), mask)   # no iterations: the (resized) masks as given
    assert PAMR(2)(img, torch.ones(1, 3, 4, 4)).sub(1).abs().max() < 1e-5   # constants stay constant
    assert PAMR(2)(img, torch.rand(1, 2, 4, 4)).shape == (1, 2, 16, 16)  # masks are resized to the image
    for bad, name in (({"iterations": -1}, "iterations"), ({"iterations": 1.5}, "iterations"),
                      ({"dilations": ()}, "dilations"), ({"dilations": (0,)}, "dilations")):
        with pytest.raises(ValueError, match=name):
            PAMR(**bad)
    with pytest.raises(ValueError, match="masks"):
        PAMR(1)(img, torch.rand(2, 1, 4, 4))


def test_pamr_options_and_the_methods_pamr_step():
    from weakseg.methods.common import PAMR, check_pamr_options, pamr_maps

    check_pamr_options("Cfg", 0, (1,))
    check_pamr_options("Cfg", 10, [1, 2, 4])
    for it in (-1, 1.0, True, "3"):
        with pytest.raises(ValueError, match=r"Cfg\.pamr_iterations: expected an int >= 0"):
            check_pamr_options("Cfg", it, (1,))
    for dil in ((), (0,), (1, 2.0), (True,), 3, None):
        with pytest.raises(ValueError, match=r"Cfg\.pamr_dilations: expected a non-empty list of ints >= 1"):
            check_pamr_options("Cfg", 1, dil)
    g = torch.Generator().manual_seed(3)
    imgs = torch.randint(0, 256, (2, 3, 12, 10), generator=g, dtype=torch.uint8)
    maps = torch.rand(2, 3, 12, 10, generator=g)
    assert pamr_maps(imgs, maps, 0) is maps                                  # off: the maps as they are
    want = PAMR(2, (1, 2))(imgs.float() / 255, maps)
    torch.testing.assert_close(pamr_maps(imgs, maps, 2, (1, 2)), want)
    torch.testing.assert_close(pamr_maps(list(imgs), maps, 2, (1, 2)), want)  # a list of images works the same
