"""Issue 25: bad input and interruptions end in one line on stderr and exit status 2 (Ctrl-C: 130), inputs
are checked before any model loads, outputs never collide, 16-bit images are rescaled."""

import json
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import weakseg
from weakseg.cli import main
from weakseg.core import METHODS, MethodConfig, SegmentationOutput

LOADS = {"count": 0}


@dataclass
class ProbeConfig(MethodConfig):
    steps: int = 1
    interrupt: bool = False


@METHODS.register("test-cli-probe", config=ProbeConfig)
class ProbeSegmenter:
    """Counts its constructions (a model load) and segments by brightness; ``interrupt`` raises Ctrl-C."""

    def __init__(self, config: ProbeConfig):
        LOADS["count"] += 1
        self.config = config

    def segment(self, images, class_names, image_labels=None):
        if self.config.interrupt:
            raise KeyboardInterrupt
        img = images[0].float().mean(0)
        labels = (img > img.mean()).long()[None] * (len(class_names) - 1)
        scores = torch.nn.functional.one_hot(labels, len(class_names)).permute(0, 3, 1, 2).float()
        return SegmentationOutput(scores, labels, list(class_names))


def _png(path, size=(24, 20), value=None, seed=0):
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8) if value is None else \
        np.full((size[1], size[0], 3), value, np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


def _one_line_error(capsys, *names):
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for n in names:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def _segment(*argv):
    return main(["segment", *argv, "--method", "test-cli-probe", "--classes", "thing"])


# ---------------------------------------------------------------------------------------------- images
@pytest.mark.parametrize("kind", ["truncated", "not-an-image", "directory", "missing", "bomb-error", "bomb-warning"])
def test_bad_images_are_one_line_errors_before_any_model_loads(tmp_path, capsys, monkeypatch, kind):
    good = _png(tmp_path / "good.png", size=(8, 8))
    bad = tmp_path / "bad.png"
    if kind == "truncated":
        bad.write_bytes(_png(tmp_path / "big.png", size=(64, 64)).read_bytes()[:-200])
    elif kind == "not-an-image":
        bad.write_text("hello, not a PNG\n")
    elif kind == "directory":
        bad.mkdir()
    elif kind.startswith("bomb"):
        _png(bad, size=(32, 32))
        # 1024 pixels: above 2 x limit is Pillow's DecompressionBombError, above the limit its warning
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 300 if kind == "bomb-error" else 800)
    LOADS["count"] = 0
    assert _segment(str(good), str(bad), "--out", str(tmp_path / "out")) == 2
    line = _one_line_error(capsys, "IMAGE", str(bad))
    assert LOADS["count"] == 0  # the model was never built
    assert not (tmp_path / "out").exists()
    if kind == "directory":
        assert "is a directory" in line
    if kind.startswith("bomb"):
        assert "decompression bomb" in line


def test_read_image_rescales_16_bit_everywhere(tmp_path):
    from weakseg.data.captions import CaptionFolder
    from weakseg.data.datasets import ImageFolder
    from weakseg.io import read_image

    grey = (np.arange(20 * 30, dtype=np.uint32).reshape(20, 30) * 109 % 65536).astype(np.uint16)
    grey[0, 0], grey[0, 1] = 65535, 256
    Image.fromarray(grey).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I;16")
    want = torch.from_numpy((grey >> 8).astype(np.uint8))
    img = read_image(tmp_path / "g16.png")
    assert img.dtype == torch.uint8 and img.shape == (3, 20, 30)
    assert torch.equal(img[0], want) and torch.equal(img[1], want) and torch.equal(img[2], want)
    assert int(img.float().std()) > 20  # not clipped to a nearly white image
    # mode "I" (what older Pillow gives for 16-bit PNGs) is read the same way
    Image.fromarray(grey.astype(np.int32)).save(tmp_path / "i32.tif")
    assert Image.open(tmp_path / "i32.tif").mode == "I"
    assert torch.equal(read_image(tmp_path / "i32.tif")[0], want)
    # the dataset and caption readers go through the same reader
    (tmp_path / "g16.txt").write_text("a grey picture")
    assert torch.equal(ImageFolder(tmp_path, extensions=(".png",))[0].image, img)
    assert torch.equal(CaptionFolder(tmp_path)[0].image, img)


def test_segment_reads_a_16_bit_png_rescaled(tmp_path, capsys):
    grey = np.tile(np.linspace(0, 65535, 16).astype(np.uint16), (8, 1))
    Image.fromarray(grey).save(tmp_path / "g16.png")
    assert _segment(str(tmp_path / "g16.png"), "--out", str(tmp_path / "out")) == 0
    px = json.loads(capsys.readouterr().out)["images"][0]["pixels"]
    assert px["thing"] == 8 * 8  # the brighter half; clipping at 255 would have made nearly all pixels equal


# ---------------------------------------------------------------------------------------------- outputs
def test_colliding_image_names_get_distinct_outputs(tmp_path, capsys):
    a = _png(tmp_path / "a" / "x.png", value=10)
    b = _png(tmp_path / "b" / "x.png", value=200)
    c = _png(tmp_path / "c" / "x.jpg", seed=3)
    d = _png(tmp_path / "c" / "x.png", seed=4)
    out = tmp_path / "out"
    assert _segment(str(a), str(b), str(c), str(d), "--out", str(out), "--save-scores") == 0
    printed = json.loads(capsys.readouterr().out)
    stems = [im["output"] for im in printed["images"]]
    assert len(set(stems)) == 4
    assert stems[:2] == ["a_x", "b_x"]
    assert stems[2:] == ["x_jpg", "c_x_png"]
    for s in stems:
        assert (out / f"{s}_labels.png").is_file() and (out / f"{s}_scores.safetensors").is_file()
    # each output belongs to its own image: the all-dark and all-bright inputs differ
    assert not torch.equal(load_file(str(out / "a_x_scores.safetensors"))["labels"],
                           load_file(str(out / "c_x_png_scores.safetensors"))["labels"])
    assert not list(out.glob(".*tmp*"))  # --save-scores goes through the atomic writer
    # a single image keeps its plain stem; the same file twice is refused
    assert _segment(str(a), "--out", str(out)) == 0
    assert json.loads(capsys.readouterr().out)["images"][0]["output"] == "x"
    assert _segment(str(a), str(tmp_path / "a" / ".." / "a" / "x.png"), "--out", str(out)) == 2
    _one_line_error(capsys, "IMAGE", "more than once")


def test_save_scores_uses_the_atomic_writer(tmp_path, monkeypatch, capsys):
    import weakseg.io

    written = []
    real = weakseg.io.save_safetensors
    monkeypatch.setattr(weakseg.io, "save_safetensors",
                        lambda t, p, metadata=None: written.append(p) or real(t, p, metadata))
    img = _png(tmp_path / "x.png")
    assert _segment(str(img), "--out", str(tmp_path / "out"), "--save-scores") == 0
    assert [p.name for p in written] == ["x_scores.safetensors"]


def test_out_naming_a_file_is_refused(tmp_path, capsys):
    img = _png(tmp_path / "x.png")
    f = tmp_path / "taken"
    f.write_text("keep me")
    LOADS["count"] = 0
    assert _segment(str(img), "--out", str(f)) == 2
    _one_line_error(capsys, "--out", str(f))
    assert LOADS["count"] == 0 and f.read_text() == "keep me"
    assert main(["eval", "--method", "test-cli-probe", "--dataset", "toyworld", "--limit", "1", "--out", str(f)]) == 2
    _one_line_error(capsys, "--out", "existing file")


# ---------------------------------------------------------------------------------------------- classes
def test_class_lists(tmp_path, capsys):
    img = _png(tmp_path / "x.png")
    assert main(["segment", str(img), "--method", "test-cli-probe", "--classes", "cat,dog,cat", "--out",
                 str(tmp_path / "o")]) == 2
    _one_line_error(capsys, "--classes", "duplicate", "cat")
    assert main(["segment", str(img), "--method", "test-cli-probe", "--classes", "Cat,cat", "--out",
                 str(tmp_path / "o")]) == 2
    _one_line_error(capsys, "--classes", "Cat/cat")
    assert main(["segment", str(img), "--method", "test-cli-probe", "--classes", "cat,background,dog", "--out",
                 str(tmp_path / "o")]) == 0
    assert json.loads(capsys.readouterr().out)["class_names"] == ["background", "cat", "dog"]
    assert main(["segment", str(img), "--method", "test-cli-probe", "--classes", "cat,background", "--no-background",
                 "--out", str(tmp_path / "o")]) == 2
    _one_line_error(capsys, "--classes", "--no-background")
    from weakseg.eval.arguments import class_names_arg as _class_names_arg

    assert _class_names_arg("cat,background") == ["background", "cat"]
    with pytest.raises(ValueError, match="duplicate class name"):
        _class_names_arg("cat,dog,dog")


# ---------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize("suffix,text", [(".yaml", "steps: [1, 2\n"), (".toml", "steps = = 3\n"),
                                         (".json", '{"steps": 3,}')])
def test_malformed_config_files_name_the_file(tmp_path, capsys, suffix, text):
    img = _png(tmp_path / "x.png")
    cfg = tmp_path / f"c{suffix}"
    cfg.write_text(text)
    assert _segment(str(img), "--config", str(cfg), "--out", str(tmp_path / "o")) == 2
    _one_line_error(capsys, str(cfg), "malformed")


def test_config_value_types_are_checked(tmp_path, capsys):
    img = _png(tmp_path / "x.png")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("steps: [1, 2]\n")
    assert _segment(str(img), "--config", str(cfg), "--out", str(tmp_path / "o")) == 2
    _one_line_error(capsys, str(cfg), "'steps'", "expects int", "list")
    cfg.write_text("- steps\n- 3\n")
    assert _segment(str(img), "--config", str(cfg), "--out", str(tmp_path / "o")) == 2
    _one_line_error(capsys, str(cfg), "mapping")
    assert _segment(str(img), "--config", str(tmp_path), "--out", str(tmp_path / "o")) == 2
    _one_line_error(capsys, str(tmp_path), "is a directory")
    assert _segment(str(img), "--set", "steps=true", "--out", str(tmp_path / "o")) == 2
    _one_line_error(capsys, "steps", "expects int", "bool")
    cfg.write_text("steps: 4\ninterrupt: false\n")
    m = weakseg.create("test-cli-probe", config_file=cfg, set_options=["device=cpu"])
    assert m.config.steps == 4 and m.config.interrupt is False


@pytest.mark.parametrize("dev", ["cuda:99", "tpu", "cuda"])
def test_unusable_devices(tmp_path, capsys, dev):
    if dev == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    img = _png(tmp_path / "x.png")
    assert _segment(str(img), "--set", f"device={dev}", "--out", str(tmp_path / "o")) == 2
    _one_line_error(capsys, "device", repr(dev))


def test_ctrl_c_is_one_line_and_status_130(tmp_path, capsys):
    img = _png(tmp_path / "x.png")
    assert _segment(str(img), "--set", "interrupt=true", "--out", str(tmp_path / "o")) == 130
    assert _one_line_error(capsys, "interrupted") == "weakseg segment: interrupted"


def test_unknown_dataset_lists_the_known_ones(capsys):
    assert main(["eval", "--method", "test-cli-probe", "--dataset", "nope"]) == 2
    _one_line_error(capsys, "--dataset", "'nope'", "voc", "toyworld")
    assert main(["train", "diclip", "--dataset", "nope", "--out", "/tmp/never"]) == 2
    _one_line_error(capsys, "--dataset", "'nope'", "ade20k")


def test_a_directory_where_a_file_is_expected_and_the_reverse(tmp_path, capsys):
    assert main(["bank", "info", str(tmp_path)]) == 2
    _one_line_error(capsys, str(tmp_path), "is a directory")
    f = tmp_path / "voc.tar"
    f.write_bytes(b"\0" * 10)
    assert main(["eval", "--method", "test-cli-probe", "--dataset", "voc", "--root", str(f)]) == 2
    _one_line_error(capsys, "--root", str(f), "is a file")
    assert main(["bank", "build", "--pseudo-masks", str(tmp_path), "--dataset", "toyworld", "--out", str(tmp_path)]) == 2
    _one_line_error(capsys, "--out", "is a directory")


# ---------------------------------------------------------------------------------------------- hub
def test_hub_names_fail_fast_without_network(tmp_path, capsys, monkeypatch):
    from weakseg.backbones import hub

    for var in ("HF_HUB_OFFLINE", "HF_ENDPOINT", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    probes = []
    monkeypatch.setattr(hub, "_reachable", None)
    monkeypatch.setattr(hub, "_probe", lambda host, port, timeout: probes.append((host, port)) or False)
    img = _png(tmp_path / "x.png")
    for _ in range(2):
        assert main(["segment", str(img), "--method", "iseg", "--classes", "cat", "--out", str(tmp_path / "o"),
                     "--set", "model=someorg/some-model", "tagger=all"]) == 2
        _one_line_error(capsys, "someorg/some-model", "unreachable", "HF_HUB_OFFLINE", "local directory",
                        "model='someorg/some-model'", "preset=toy")  # the setting that named it, the offline way
    assert probes == [("huggingface.co", 443)]  # checked once per process
    # an export with no model named stops at once, naming the setting behind the default model
    assert main(["export", "synseg", "--format", "onnx", "--out", str(tmp_path / "e"), "--classes", "cat,dog"]) == 2
    _one_line_error(capsys, "ViT-B-16", "unreachable", "clip_model='ViT-B-16'", "preset=toy")
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    assert hub._endpoint() == ("proxy.example", 3128)  # behind a proxy, the proxy is what must answer
    from weakseg.backbones.clip import CLIPBackbone

    with pytest.raises(hub.HubUnavailableError, match="HF_HUB_OFFLINE"):
        CLIPBackbone.from_pretrained("ViT-B-16", pretrained="openai")
    with pytest.raises(hub.HubUnavailableError, match="HF_HUB_OFFLINE"):
        from weakseg.backbones.features import DINOv2Features

        DINOv2Features.from_pretrained("facebook/dinov2-small")


def test_hub_failures_under_offline_mode_are_one_line(tmp_path, capsys, monkeypatch):
    from weakseg.backbones import hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub, "_probe", lambda *a: pytest.fail("no network probe under HF_HUB_OFFLINE"))
    monkeypatch.setattr(hub, "_reachable", None)
    img = _png(tmp_path / "x.png")
    assert main(["segment", str(img), "--method", "iseg", "--classes", "cat", "--out", str(tmp_path / "o"),
                 "--set", "model=someorg/some-model", "tagger=all", f"cache_dir={tmp_path / 'hub'}"]) == 2
    _one_line_error(capsys, "someorg/some-model", "HF_HUB_OFFLINE is set")


def test_probe_is_bounded_in_time(monkeypatch):
    """The reachability probe gives up after its timeout even when name resolution hangs."""
    import time

    from weakseg.backbones import hub

    def hang(*a, **k):
        time.sleep(5)
        raise OSError("never")

    monkeypatch.setattr(hub.socket, "create_connection", hang)
    t0 = time.perf_counter()
    assert hub._probe("huggingface.co", 443, 0.3) is False
    assert time.perf_counter() - t0 < 2


# ------------------------------------------------------------------- issue 22: what a new user hits, one line each
def _garbage(path):
    path.write_bytes(b"not a safetensors file" * 8)
    return str(path)


@pytest.mark.parametrize("method, sets, words", [
    # missing weights (offline): a model spec naming a folder that is not there, or an unknown tiny variant
    ("iseg", ["model=/no/such/sd"], ["'/no/such/sd' does not exist", "diffusers"]),
    ("iseg", ["model=tiny:sdxl"], ["tiny:sd15"]),
    ("synseg", ["preset=tiny", "clip_model=/no/such/clip"], ["/no/such/clip"]),
    ("moduseg", ["backbone=nope"], ["ModuSegConfig.backbone", "dinov2", "clip-dense"]),
    # corrupt bank, cache, trained head, training checkpoint: the argument and the file are named
    ("moduseg", ["backbone=clip-dense", "backbone_model=tiny", "proposer=superpixel", "bank={bad}"],
     ["feature bank", "bad.safetensors", "not a readable safetensors file"]),
    ("diclip", ["preset=tiny", "cache={bad}"], ["cache", "bad.safetensors", "not a readable safetensors file"]),
    ("diclip", ["preset=tiny", "mode=head", "checkpoint={bad}"], ["checkpoint", "bad.safetensors"]),
    ("synseg", ["preset=tiny", "checkpoint={bad}"], ["SynSegConfig.checkpoint", "bad.safetensors"]),
])
def test_bad_models_and_files_are_one_line_naming_the_setting(tmp_path, capsys, method, sets, words):
    img = _png(tmp_path / "a.png", size=(64, 64))
    bad = _garbage(tmp_path / "bad.safetensors")
    rc = main(["segment", str(img), "--method", method, "--classes", "cat", "--out", str(tmp_path / "o"),
               "--set", *[s.format(bad=bad) for s in sets]])
    assert rc == 2
    _one_line_error(capsys, *words)
