"""Core interfaces (registries, configs, create, SegmentationOutput) and the CLI."""

import json
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch

import weakseg
from weakseg.cli import main
from weakseg.core import MethodConfig, Registry, SegmentationOutput, check_images, parse_set_options
from weakseg.ops import OPS


@dataclass
class _EchoConfig(MethodConfig):
    threshold: float = 0.5
    name: str = "x"


class _Echo:
    """A minimal Segmenter: class c scores = mean intensity of channel c % 3."""

    def __init__(self, config):
        self.config = config

    def segment(self, images, class_names, image_labels=None):
        ims = check_images(images)
        x = torch.stack(ims).float() / 255
        scores = torch.stack([x[:, i % 3] for i in range(len(class_names))], 1)
        labels = scores.argmax(1)
        labels[scores.max(1).values < self.config.threshold] = 255
        return SegmentationOutput(scores, labels, list(class_names))


@pytest.fixture
def echo_registered():
    name = "_test_echo"
    if name not in weakseg.METHODS:
        weakseg.METHODS.register(name, config=_EchoConfig)(_Echo)
    return name


def test_create_with_overrides_and_files(echo_registered, tmp_path):
    seg = weakseg.create(echo_registered, threshold=0.25)
    assert isinstance(seg, weakseg.Segmenter) and seg.config.threshold == 0.25
    cfg = tmp_path / "c.toml"
    cfg.write_text('threshold = 0.75\nname = "from-file"\n')
    seg = weakseg.create(echo_registered, config_file=cfg, set_options=["threshold=0.9"])
    assert seg.config.threshold == 0.9 and seg.config.name == "from-file"
    img = torch.zeros(1, 3, 4, 5, dtype=torch.uint8)
    img[0, 1] = 255
    out = seg.segment(img, ["a", "b"])
    assert out.scores.shape == (1, 2, 4, 5) and (out.labels == 1).all()


def test_config_errors(echo_registered, tmp_path):
    with pytest.raises(ValueError, match="unknown option.*nope"):
        weakseg.create(echo_registered, nope=1)
    with pytest.raises(KeyError, match="unknown method 'no-such'"):
        weakseg.create("no-such")
    with pytest.raises(FileNotFoundError):
        weakseg.create(echo_registered, config_file=tmp_path / "missing.toml")
    with pytest.raises(ValueError, match="key=value"):
        parse_set_options(["threshold"])
    assert parse_set_options(["a=1", "b=[1,2]", "c=hello", "name=3"], _EchoConfig) == \
        {"a": 1, "b": [1, 2], "c": "hello", "name": "3"}


def test_registry_rejects_duplicates():
    r = Registry("thing")
    r.register("a")(int)
    with pytest.raises(ValueError, match="already registered"):
        r.register("a")(float)
    assert r.names() == ["a"] and "a" in r


def test_segmentation_output_and_images_are_checked():
    with pytest.raises(ValueError, match="scores .* labels"):
        SegmentationOutput(torch.zeros(1, 2, 4, 4), torch.zeros(1, 4, 5, dtype=torch.long), ["a", "b"])
    with pytest.raises(ValueError, match="2 score channels for 1 class names"):
        SegmentationOutput(torch.zeros(1, 2, 4, 4), torch.zeros(1, 4, 4, dtype=torch.long), ["a"])
    with pytest.raises(TypeError, match=r"images\[0\].*uint8"):
        check_images(torch.zeros(1, 3, 4, 4))
    with pytest.raises(ValueError, match=r"images\[0\].*\(3, H, W\)"):
        check_images([torch.zeros(4, 4, dtype=torch.uint8)])


def test_cli_info_json(capsys):
    assert main(["info", "--json"]) == 0
    facts = json.loads(capsys.readouterr().out)
    assert facts["extension"] is True
    assert set(facts["ops"]) == set(OPS)
    assert all(v["cpu"] for v in facts["ops"].values())


def test_cli_help_and_entry_point():
    r = subprocess.run([sys.executable, "-m", "weakseg", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "info" in r.stdout and "bench" in r.stdout and "demo" in r.stdout


def test_cli_bench_quick_verifies_and_writes(tmp_path, capsys):
    assert main(["bench", "--quick", "--ops", "erode", "knn_vote", "--device", "cpu", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| erode | cpu |" in out and "exact" in out and "labels agree" in out
    data = json.loads((tmp_path / "ops_cpu_quick.json").read_text())
    impls = {(r["op"], r["impl"]) for r in data["rows"]}
    assert ("erode", "weakseg") in impls and ("knn_vote", "reference") in impls
    assert main(["bench", "--ops", "nope"]) == 2


def test_demo_scores_every_entry_with_the_eval_loop(tmp_path):
    """run_demo with injected tiny entries: the report has the issue's schema, its figures are those of the
    per-method metrics written by the eval loop, and the overlays exist."""
    from weakseg.core import DemoEntry
    from weakseg.demo import run_demo
    from weakseg.methods.iseg import ISeg, ISegConfig
    from weakseg.backbones.diffusion import StableDiffusionBackbone

    sd = StableDiffusionBackbone.tiny(seed=0, layout="sd21", heads=4)
    calls = []

    def factory(work_dir, progress):
        calls.append(work_dir)
        mk = lambda **kw: ISeg(ISegConfig(model="tiny", size=64, tagger="all", cluster_iterations=2, **kw), backbone=sd)
        return DemoEntry(method=mk(steps=2), baseline=mk(baseline=True), note="raw cross-attention")

    report = run_demo(tmp_path / "demo", num_images=3, entries={"iseg": factory}, overlays=2, progress=False)
    assert calls == [tmp_path / "demo" / "work" / "iseg"]
    assert report["dataset"] == "toyworld" and report["num_images"] == 3
    r = report["methods"]["iseg"]
    on_disk = json.loads((tmp_path / "demo" / "report.json").read_text())
    assert on_disk["methods"]["iseg"]["miou"] == r["miou"]
    m = json.loads((tmp_path / "demo" / "iseg" / "metrics.json").read_text())
    b = json.loads((tmp_path / "demo" / "iseg" / "baseline" / "metrics.json").read_text())
    assert r["miou"] == m["percent"]["miou_all"] and r["baseline_miou"] == b["percent"]["miou_all"]
    assert m["num_images"] == 3 and m["image_labels_given"] and r["seconds_per_image"] > 0
    assert len(list((tmp_path / "demo" / "iseg" / "overlays").glob("*.png"))) == 2
    md = (tmp_path / "demo" / "report.md").read_text()
    assert "| iseg |" in md and "raw cross-attention" in md


def test_demo_rejects_bad_arguments(tmp_path):
    from weakseg.demo import run_demo, toy_demo_methods

    with pytest.raises(ValueError, match="num_images"):
        run_demo(tmp_path, num_images=0, entries={"x": None})
    with pytest.raises(ValueError, match="unknown method"):
        toy_demo_methods(["no-such-method"])
    with pytest.raises(ValueError, match="no method"):
        run_demo(tmp_path, num_images=1, entries={})
    def missing(w, p):
        raise FileNotFoundError("toy weights not found at /x; train them with `python -m weakseg.toy.train`")

    with pytest.raises(FileNotFoundError, match="no method could run.*weakseg.toy.train"):
        run_demo(tmp_path / "m", num_images=1, entries={"x": missing}, progress=False)
    report = json.loads((tmp_path / "m" / "report.json").read_text())
    assert "weakseg.toy.train" in report["skipped"]["x"] and report["methods"] == {}
    with pytest.raises(TypeError, match="DemoEntry"):
        run_demo(tmp_path, num_images=1, entries={"x": lambda w, p: object()}, progress=False)

def test_malformed_safetensors_metadata_names_the_file(tmp_path):
    """Issue 25: a metadata entry that is not JSON is a ValueError naming the file, not a bare JSONDecodeError."""
    from weakseg.core import read_safetensors_file
    from weakseg.io import save_safetensors

    p = tmp_path / "head.safetensors"
    save_safetensors({"w": torch.zeros(2)}, p, metadata={"format": "test-head", "class_names": "[\"a\", "})
    with pytest.raises(ValueError, match="checkpoint.*head.safetensors.*malformed metadata"):
        read_safetensors_file(p, ["test-head"], "checkpoint")
    save_safetensors({"w": torch.zeros(2)}, p, metadata={"format": "test-head", "class_names": "[\"a\"]"})
    assert read_safetensors_file(p, ["test-head"], "checkpoint")[1] == {"class_names": ["a"]}


def test_set_and_file_values_are_type_checked():
    """Issue 25: a bool is not an int, a list is not an int (the error names the key and the type), a string
    field keeps the raw text, and a YAML 1.1 number string is read as a float."""
    from weakseg.core import check_device, check_option_types

    @dataclass
    class Typed(MethodConfig):
        steps: int = 1
        rate: float = 0.5
        name: str | None = None
        sizes: tuple[int, ...] = (1,)

    assert parse_set_options(["steps=3", "rate=2", "name=2024", "sizes=[2, 3]"], Typed) == \
        {"steps": 3, "rate": 2, "name": "2024", "sizes": [2, 3]}
    assert parse_set_options(["name=null"], Typed) == {"name": None}
    for bad, want in [("steps=true", "expects int, got True (bool)"), ("steps=[1]", "expects int"),
                      ("rate=false", "expects float"), ("sizes=[1, true]", "expects a list")]:
        with pytest.raises(ValueError, match=want.replace("(", r"\(").replace(")", r"\)")):
            parse_set_options([bad], Typed)
    assert check_option_types({"rate": "1e-3", "steps": 2}, Typed, "config file c.yaml") == {"rate": 1e-3, "steps": 2}
    with pytest.raises(ValueError, match=r"config file c.yaml: option 'steps' expects int, got \[1, 2\] \(list\)"):
        check_option_types({"steps": [1, 2]}, Typed, "config file c.yaml")
    assert check_device("cpu").type == "cpu"
    with pytest.raises(ValueError, match="unknown device 'gpu0'"):
        check_device("gpu0")
    with pytest.raises(ValueError, match="cuda:99"):
        check_device("cuda:99")


def test_is_int_is_the_shared_count_check():
    """``weakseg.core.is_int``: the one check behind the configs' and ops' "an int >= N" errors."""
    from weakseg.core import is_int

    assert is_int(0) and is_int(-3) and is_int(5, 1) and is_int(0, 0)
    assert not is_int(0, 1) and not is_int(-1, 0)
    for bad in (True, False, 1.0, "1", None, [1]):
        assert not is_int(bad) and not is_int(bad, 0)


_KNN_ARGS = lambda: (torch.randn(2, 3), torch.randn(4, 3), torch.zeros(4, dtype=torch.long))


@pytest.mark.parametrize("module, name, args, kwargs, want", [
    ("weakseg.ops", "knn_vote", lambda: (*_KNN_ARGS(), True, 2), {}, "k must be"),
    ("weakseg.demo", "run_demo", lambda: ("unused",), {"num_images": True}, "num_images"),
    ("weakseg.demo", "run_demo", lambda: ("unused",), {"overlays": False}, "overlays"),
    ("weakseg.methods.diclip.modules", "KVAdapter", lambda: (torch.randn(4, 3), torch.randn(4, 2)),
     {"prompts": True}, "prompts"),
    ("weakseg.toy.world", "ToyWorld", lambda: (), {"size": True}, "size"),
    ("weakseg.toy.signal", "sd_attention_iou", lambda: (None,), {"input_size": True}, "input_size"),
    ("weakseg.toy.train", "load_scene_cache", lambda: ("unused",), {"num_scenes": True}, "num_scenes"),
    ("weakseg.toy.train", "train_hires", lambda: (None,) * 6, {"input_size": True}, "input_size"),
], ids=["knn_vote-k", "demo-num_images", "demo-overlays", "kvadapter-prompts", "toyworld-size",
        "signal-input_size", "scene_cache-num_scenes", "hires-input_size"])
def test_count_arguments_reject_bools(module, name, args, kwargs, want):
    """A bool is not a count: these "an int >= N" checks use ``is_int`` too, so True/False get the argument's
    own error instead of being read as 1/0."""
    import importlib

    fn = getattr(importlib.import_module(module), name)
    with pytest.raises(ValueError, match=want):
        fn(*args(), **kwargs)
