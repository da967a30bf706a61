import json
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from weakseg.cli import main
from weakseg.core import METHODS, MethodConfig, SegmentationOutput
from weakseg.toy.world import ToyWorld
from weakseg.eval import ConfusionMatrix, evaluate


@dataclass
class BorderConfig(MethodConfig):
    threshold: float = 60.0


@METHODS.register("test-border-colour", config=BorderConfig)
class BorderColourSegmenter:
    """A weak baseline with real behaviour: pixels far from the median border colour are
    foreground and take the first present object class of the image-level labels."""

    def __init__(self, config: BorderConfig):
        self.config = config
        self.calls = 0

    def segment(self, images, class_names, image_labels=None):
        self.calls += 1
        img = images[0].float()
        border = torch.cat([img[:, 0], img[:, -1], img[:, :, 0], img[:, :, -1]], dim=1)
        bg = border.median(dim=1).values
        fg = (img - bg[:, None, None]).abs().sum(0) > self.config.threshold
        cls = 1
        if image_labels is not None and image_labels[0, 1:].any():
            cls = int(image_labels[0, 1:].nonzero()[0]) + 1
        labels = torch.where(fg, cls, 0)[None]
        scores = torch.nn.functional.one_hot(labels, len(class_names)).permute(0, 3, 1, 2).float()
        return SegmentationOutput(scores, labels, list(class_names))


def _direct_matrix(world, n, seg):
    cm = ConfusionMatrix(world.num_classes)
    for i in range(n):
        s = world[i]
        il = torch.zeros(1, world.num_classes, dtype=torch.bool)
        il[0, s.image_labels] = True
        cm.update(seg.segment([s.image], world.class_names, il).labels[0], s.label)
    return cm


def test_evaluate_writes_metrics_preds_and_overlays(tmp_path):
    world = ToyWorld(size=32, split="test", num_scenes=6)
    seg = BorderColourSegmenter(BorderConfig())
    m = evaluate(seg, world, tmp_path, overlays=3, progress=False, method_name="border", dataset_name="toyworld")
    want = _direct_matrix(world, 6, BorderColourSegmenter(BorderConfig()))
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["num_images"] == 6 and saved["num_labelled"] == 6 and saved["method"] == "border"
    assert saved["miou"]["present"] == pytest.approx(want.miou("present"))
    assert saved["miou"]["all"] == pytest.approx(want.miou("all"))
    assert saved["pixel_accuracy"] == pytest.approx(want.pixel_accuracy())
    assert saved["pixels"] == 6 * 32 * 32
    assert saved["config"] == {"threshold": 60.0} or saved["config"]["threshold"] == 60.0
    assert 0.2 < saved["pixel_accuracy"] <= 1.0
    assert len(list((tmp_path / "preds").glob("*.png"))) == 6
    assert len(list((tmp_path / "overlays").glob("*.png"))) == 3
    assert "mIoU (present)" in (tmp_path / "metrics.md").read_text()
    assert m["miou"] == saved["miou"]


def test_resume_skips_cached_images_and_gives_the_same_result(tmp_path):
    world = ToyWorld(size=32, split="test", num_scenes=5)
    seg = BorderColourSegmenter(BorderConfig())
    evaluate(seg, world, tmp_path, limit=2, progress=False)
    assert seg.calls == 2
    full = evaluate(seg, world, tmp_path, progress=False)
    assert seg.calls == 5  # the first two came from the cache
    assert full["images_computed_this_run"] == 3
    fresh = evaluate(BorderColourSegmenter(BorderConfig()), world, tmp_path / "fresh", progress=False)
    assert full["miou"] == fresh["miou"] and full["pixels"] == fresh["pixels"]
    # an interrupted write leaves no half file: only complete PNGs are cached
    assert not list((tmp_path / "preds").glob("*.tmp"))


def _shard_worker(rank, world_size, init_file, out_dir, result_file):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        world = ToyWorld(size=32, split="test", num_scenes=7)
        m = evaluate(BorderColourSegmenter(BorderConfig()), world, out_dir, progress=False)
        if rank == 0:
            with open(result_file, "w") as f:
                json.dump(m, f, default=str)
    finally:
        dist.destroy_process_group()


def test_sharded_run_under_torch_distributed_equals_single_process(tmp_path):
    single = evaluate(BorderColourSegmenter(BorderConfig()), ToyWorld(size=32, split="test", num_scenes=7),
                      tmp_path / "single", progress=False)
    mp.spawn(_shard_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "sharded"), str(tmp_path / "r.json")),
             nprocs=2, join=True)
    sharded = json.loads((tmp_path / "r.json").read_text())
    assert sharded["pixels"] == single["pixels"]
    assert sharded["miou"] == single["miou"]
    assert [c["gt_pixels"] for c in sharded["per_class"]] == [c["gt_pixels"] for c in single["per_class"]]
    assert len(list((tmp_path / "sharded" / "preds").glob("*.png"))) == 7


def test_cli_eval_on_toyworld(tmp_path, capsys):
    rc = main(["eval", "--method", "test-border-colour", "--dataset", "toyworld", "--limit", "3", "--quiet",
               "--set", "threshold=40", "--out", str(tmp_path)])
    assert rc == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["num_images"] == 3 and "miou_present" in printed
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["config"]["threshold"] == 40.0


def test_errors(tmp_path):
    class WrongSize(BorderColourSegmenter):
        def segment(self, images, class_names, image_labels=None):
            out = super().segment(images, class_names, image_labels)
            return SegmentationOutput(out.scores[..., :-1], out.labels[..., :-1], out.class_names)

    with pytest.raises(ValueError, match="label map"):
        evaluate(WrongSize(BorderConfig()), ToyWorld(size=32, num_scenes=1), tmp_path, progress=False)
    assert main(["eval", "--method", "test-border-colour", "--dataset", "voc", "--out", str(tmp_path)]) == 2
    with pytest.raises(ValueError, match="limit"):
        evaluate(BorderColourSegmenter(BorderConfig()), ToyWorld(size=32, num_scenes=1), tmp_path, limit=-1)


def test_cli_segment_writes_labels_overlays_and_scores(tmp_path, capsys):
    from PIL import Image
    from safetensors.torch import load_file

    scene = ToyWorld(size=32, split="test").scene(0)
    img_path = tmp_path / "scene.png"
    Image.fromarray(scene.image.permute(1, 2, 0).numpy()).save(img_path)
    rc = main(["segment", str(img_path), "--method", "test-border-colour", "--classes", "circle,square",
               "--out", str(tmp_path / "out"), "--save-scores"])
    assert rc == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["class_names"] == ["background", "circle", "square"]
    assert sum(printed["images"][0]["pixels"].values()) == 32 * 32
    assert (tmp_path / "out" / "scene_labels.png").exists() and (tmp_path / "out" / "scene_overlay.png").exists()
    saved = load_file(str(tmp_path / "out" / "scene_scores.safetensors"))
    assert saved["scores"].shape == (3, 32, 32) and saved["labels"].shape == (32, 32)
    assert main(["segment", str(tmp_path / "missing.png"), "--method", "test-border-colour", "--classes", "a"]) == 2
    assert main(["segment", str(img_path), "--method", "test-border-colour", "--classes", " , "]) == 2


# ---- the cache is keyed on method, config, weights and dataset (issue 25) -------------------------------------
def _metrics(out):
    return json.loads((out / "metrics.json").read_text())


def test_cli_eval_cache_is_keyed_on_the_config(tmp_path, capsys):
    """iSeg on the toy world: another config recomputes every image (and reports the new config's mIoU),
    the same config reuses the cached predictions."""
    out = tmp_path / "e"
    base = ["eval", "--method", "iseg", "--dataset", "toyworld", "--limit", "1", "--out", str(out), "--quiet"]
    assert main([*base, "--set", "preset=toy"]) == 0
    first = _metrics(out)
    assert first["images_computed_this_run"] == 1
    capsys.readouterr()
    assert main([*base, "--set", "preset=toy", "baseline=true"]) == 0
    second = _metrics(out)
    assert second["images_computed_this_run"] == 1 and second["config"]["baseline"] is True
    err = capsys.readouterr().err
    assert "config.baseline" in err and "recomputing every image" in err
    fresh = tmp_path / "fresh"
    assert main(["eval", "--method", "iseg", "--dataset", "toyworld", "--limit", "1", "--out", str(fresh), "--quiet",
                 "--set", "preset=toy", "baseline=true"]) == 0
    assert second["miou"] == _metrics(fresh)["miou"]
    assert main([*base, "--set", "preset=toy", "baseline=true"]) == 0
    assert _metrics(out)["images_computed_this_run"] == 0 and _metrics(out)["miou"] == second["miou"]


def test_cache_key_covers_config_weights_dataset_and_labels(tmp_path, capsys):
    world = ToyWorld(size=32, split="test", num_scenes=3)
    weights = tmp_path / "head.bin"
    weights.write_bytes(b"one")

    @dataclass
    class WeightedConfig(BorderConfig):
        head: str = ""

    def run(threshold=60.0, head=str(weights), **kw):
        seg = BorderColourSegmenter(WeightedConfig(threshold=threshold, head=head))
        return evaluate(seg, world, tmp_path / "o", progress=False, **kw)["images_computed_this_run"]

    assert run() == 3
    assert run() == 0
    assert run(threshold=30.0) == 3  # another config
    assert "config.threshold" in capsys.readouterr().err
    assert run(threshold=30.0) == 0
    weights.write_bytes(b"two")  # same path, other weights
    assert run(threshold=30.0) == 3
    assert "weights" in capsys.readouterr().err
    assert run(threshold=30.0, use_image_labels=False) == 3
    assert run(threshold=30.0, use_image_labels=False, dataset_name="other") == 3
    assert run(threshold=30.0, use_image_labels=False, dataset_name="other") == 0
    # predictions without a manifest (an older weakseg) are not trusted
    (tmp_path / "o" / "preds" / "manifest.json").unlink()
    assert run(threshold=30.0, use_image_labels=False, dataset_name="other") == 3
    assert "no manifest" in capsys.readouterr().err


@pytest.mark.parametrize("damage", ["truncated", "garbage", "wrong-size", "bad-class"])
def test_corrupt_cached_predictions_are_recomputed(tmp_path, capsys, damage):
    world = ToyWorld(size=32, split="test", num_scenes=3)
    seg = BorderColourSegmenter(BorderConfig())
    want = evaluate(seg, world, tmp_path, progress=False)
    victim = tmp_path / "preds" / f"{world[1].name}.png"
    good = victim.read_bytes()
    if damage == "truncated":
        victim.write_bytes(good[: len(good) // 2])
    elif damage == "garbage":
        victim.write_text("not a png")
    elif damage == "wrong-size":
        from PIL import Image

        Image.fromarray(np.zeros((5, 7), np.uint8)).save(victim)
    else:
        from PIL import Image

        Image.fromarray(np.full((32, 32), 77, np.uint8)).save(victim)
    capsys.readouterr()
    again = evaluate(seg, world, tmp_path, progress=False)
    assert again["images_computed_this_run"] == 1 and again["miou"] == want["miou"]
    assert str(victim) in capsys.readouterr().err and victim.read_bytes() == good


def test_overlay_panel_is_readable_and_has_a_legend():
    """64 px panels are enlarged by an integer factor to >= 256 px (nearest: each label pixel becomes an f x f
    block of its colour), and the legend below shows a swatch of each class present, in its palette colour."""
    import numpy as np

    from weakseg.eval.visualize import overlay_panel, palette

    img = torch.full((3, 64, 48), 100, dtype=torch.uint8)
    gt = torch.zeros(64, 48, dtype=torch.long)
    gt[10:20, 5:9] = 2
    pred = gt.clone()
    pred[0, 0] = 255
    plain = overlay_panel(img, gt, pred, min_size=1)
    assert plain.shape == (64, 3 * 48 + 8, 3)
    out = overlay_panel(img, gt, pred, alpha=1.0, class_names=["background", "cat", "dog"])
    f = 6  # ceil(256 / 48)
    assert out.shape[1] == 3 * 48 * f + 8 and out.shape[0] > 64 * f
    gt_panel = out[: 64 * f, 48 * f + 4: 2 * 48 * f + 4]
    pal = palette()
    assert (gt_panel[10 * f: 20 * f, 5 * f: 9 * f] == pal[2]).all() and (gt_panel[: 10 * f] == pal[0]).all()
    pred_panel = out[: 64 * f, 2 * 48 * f + 8:]
    assert (pred_panel[:f, :f] == pal[255]).all() and (pred_panel[f:2 * f, :f] == pal[0]).all()
    legend = out[64 * f:].reshape(-1, 3)
    colours = {tuple(c) for c in legend}
    assert tuple(pal[2]) in colours and tuple(pal[1]) not in colours  # "dog" shown, "cat" (absent) not
    with pytest.raises(ValueError, match="min_size"):
        overlay_panel(img, gt, pred, min_size=0)
