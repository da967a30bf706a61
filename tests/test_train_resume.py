"""Training checkpoints: a run killed after a checkpoint and resumed equals the uninterrupted run bit for bit
(SynSeg and DiCLIP, with a dataset that draws from the global random streams), log.jsonl has no repeated
steps, and a checkpoint whose optimizer state or random streams are broken is refused naming the file."""

import dataclasses
import json
import random

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from tests._helpers import assert_raises_naming, diclip_tiny_models, make_diclip
from weakseg.core import WeightsFileError
from weakseg.train import common


class Killed(Exception):
    """Stands in for a kill (Ctrl-C, a lost node) after a checkpoint."""


def kill_after(monkeypatch, module, at: int) -> None:
    """Make ``module``'s loop die right after the bookkeeping of step ``at``."""

    def after_step(rec, step, *args):
        common.after_step(rec, step, *args)
        if step == at:
            raise Killed

    monkeypatch.setattr(module, "after_step", after_step)


class GlobalNoise:
    """A dataset whose items take a shift drawn from torch's, Python's and numpy's global streams (as a user's
    augmentation might), so a resumed run matches only if those streams are restored."""

    def __init__(self, base):
        self.base = base

    def __len__(self):
        return len(self.base)

    def __getattr__(self, name):  # captions / keys / class_names of the wrapped dataset
        return getattr(self.base, name)

    def __getitem__(self, i):
        s = self.base[i]
        shift = int(torch.randint(0, 3, ())) + random.randrange(3) + int(np.random.randint(3))
        return dataclasses.replace(s, image=(s.image.int() + 20 * shift).clamp(0, 255).to(torch.uint8))


def seed_all(seed):
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def log_steps(path):
    return [json.loads(x)["step"] for x in path.read_text().splitlines()]


def assert_same_files(a, b):
    ta, tb = load_file(str(a)), load_file(str(b))
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k


def run_killed_and_resumed(train, loop_module, monkeypatch, tmp_path, kill_at):
    """(uninterrupted result, result of the resumed call): the second run dies after step ``kill_at`` and is
    resumed in a 'process' whose global streams were reseeded."""
    seed_all(0)
    full = train(tmp_path / "a")
    seed_all(0)
    with monkeypatch.context() as mp:
        kill_after(mp, loop_module, kill_at)
        with pytest.raises(Killed):
            train(tmp_path / "b")
    assert log_steps(tmp_path / "b" / "log.jsonl") == list(range(1, kill_at + 1))
    seed_all(12345)
    rest = train(tmp_path / "b")
    # no repeated steps, the same lines; the same weights, optimizer state and random streams
    assert (tmp_path / "b" / "log.jsonl").read_text() == (tmp_path / "a" / "log.jsonl").read_text()
    assert log_steps(tmp_path / "b" / "log.jsonl") == list(range(1, full["step"] + 1))
    assert_same_files(tmp_path / "a" / "model.safetensors", tmp_path / "b" / "model.safetensors")
    assert_same_files(tmp_path / "a" / "last.safetensors", tmp_path / "b" / "last.safetensors")
    return full, rest


def test_synseg_killed_and_resumed_equals_uninterrupted(tmp_path, monkeypatch):
    from weakseg.backbones.clip import CLIPBackbone
    from weakseg.toy.world import ToyCaptions
    from weakseg.methods.synseg import SynSeg, SynSegConfig
    from weakseg.train import synseg as loop

    torch.set_num_threads(1)
    clip = CLIPBackbone.tiny(seed=0)
    data = GlobalNoise(ToyCaptions(num_scenes=10))
    cfg = loop.SynSegTrainConfig(iterations=7, batch_size=3, save_every=3, log_every=1, seed=3)

    def train(out):
        return loop.train_synseg(SynSeg(SynSegConfig.from_dict({"preset": "tiny"}), clip=clip), data, out, cfg,
                                 progress=False)

    full, rest = run_killed_and_resumed(train, loop, monkeypatch, tmp_path, kill_at=5)
    assert rest["step"] == 7 and [x["loss"] for x in rest["losses"]] == [x["loss"] for x in full["losses"][3:]]


def test_diclip_killed_and_resumed_equals_uninterrupted(tmp_path, monkeypatch):
    from weakseg.toy.world import ToyWorld
    from weakseg.methods.diclip.cache import CacheBuildConfig, build_cache
    from weakseg.train import diclip as loop

    models = diclip_tiny_models()
    world = ToyWorld(split="train", num_scenes=4)
    cache = tmp_path / "cache.safetensors"
    build_cache(make_diclip(models), world.class_names, cache,
                CacheBuildConfig(source="dataset", fg_centroids=2, bg_centroids=2, batch_size=4), dataset=world,
                progress=False)
    data = GlobalNoise(world)
    cfg = loop.DiCLIPTrainConfig(iterations=5, batch_size=2, warmup_iters=2, save_every=2, log_every=1,
                                 caa_seg_from=3, max_images=4)

    def train(out):
        return loop.train_diclip(make_diclip(models, cache=str(cache)), data, world.class_names, out, cfg,
                                 progress=False)

    full, rest = run_killed_and_resumed(train, loop, monkeypatch, tmp_path, kill_at=3)
    assert rest["step"] == 5 and [x["loss"] for x in rest["losses"]] == [x["loss"] for x in full["losses"][2:]]


# ------------------------------------------------------------------------------------------- checkpoint files

def _trained(tmp_path):
    """(module, AdamW, checkpoint path) after one step of a two-parameter-group toy model."""
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    opt = torch.optim.AdamW([{"params": module[0].parameters()}, {"params": module[1].parameters()}], lr=0.1)
    module(torch.randn(5, 3)).square().sum().backward()
    opt.step()
    path = tmp_path / "last.safetensors"
    common.save_checkpoint(path, module, opt, {"step": 1, "position": 5}, "fmt")
    return module, opt, path


def _fresh():
    module = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    opt = torch.optim.AdamW([{"params": module[0].parameters()}, {"params": module[1].parameters()}], lr=0.1)
    return module, opt


def test_checkpoint_round_trip_restores_state_and_random_streams(tmp_path):
    module, opt, path = _trained(tmp_path)
    after = (torch.rand(4), random.random(), np.random.rand(3))
    seed_all(7)  # a different process state
    m2, o2 = _fresh()
    info = common.load_checkpoint(path, m2, o2, "fmt")
    assert info["step"] == 1 and info["position"] == 5
    for a, b in zip(module.state_dict().values(), m2.state_dict().values()):
        assert torch.equal(a, b)
    for i, st in opt.state_dict()["state"].items():
        for k, v in st.items():
            assert torch.equal(v, o2.state_dict()["state"][i][k]), (i, k)
    again = (torch.rand(4), random.random(), np.random.rand(3))
    assert torch.equal(after[0], again[0]) and after[1] == again[1] and np.array_equal(after[2], again[2])


@pytest.mark.parametrize("tamper, words", [
    (lambda t: t.update({"optim.0.exp_avgX": t.pop("optim.0.exp_avg")}),
     ["lacks tensor(s) optim.0.exp_avg", "unexpected tensor(s) optim.0.exp_avgX"]),
    (lambda t: t.pop("optim.3.exp_avg_sq"), ["lacks tensor(s) optim.3.exp_avg_sq"]),
    (lambda t: t.pop("optim.2.step"), ["optim.2.step"]),
    (lambda t: t.update({"optim.1.exp_avg": torch.full((4,), float("nan"))}), ["'optim.1.exp_avg'", "NaN"]),
    (lambda t: t.update({"optim.0.exp_avg": t["optim.0.exp_avg"].double()}), ["'optim.0.exp_avg'", "float64"]),
    (lambda t: t.update({"optim.0.exp_avg_sq": t["optim.0.exp_avg_sq"][:2]}), ["'optim.0.exp_avg_sq'", "shape"]),
    (lambda t: t.update({"optim.1.exp_avg_sq": -t["optim.1.exp_avg_sq"] - 1}), ["'optim.1.exp_avg_sq'", "negative"]),
    (lambda t: t.update({"0.weight": t["0.weight"].to(torch.int32)}), ["'0.weight'", "int32"]),
    (lambda t: t.pop("rng.python"), ["rng.python"]),
])
def test_broken_checkpoint_refused_naming_the_file(tmp_path, tamper, words):
    _, _, path = _trained(tmp_path)
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    tamper(tensors)
    save_file(tensors, str(path), metadata=meta)
    m2, o2 = _fresh()
    assert_raises_naming(lambda: common.load_checkpoint(path, m2, o2, "fmt"), WeightsFileError,
                         [str(path), "--no-resume", *words])


def test_broken_checkpoint_metadata_refused(tmp_path):
    _, _, path = _trained(tmp_path)
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata())
    tensors = load_file(str(path))
    for key, value, words in (("step", None, ["step=None"]), ("position", '"x"', ["position='x'"]),
                              ("rng", '{"python": [3], "numpy": [1]}', ["random-stream"])):
        md = dict(meta)
        if value is None:
            md.pop(key)
        else:
            md[key] = value
        save_file(tensors, str(path), metadata=md)
        m2, o2 = _fresh()
        assert_raises_naming(lambda: common.load_checkpoint(path, m2, o2, "fmt"), WeightsFileError,
                             [str(path), *words])


def test_optimizer_without_state_only_with_a_loss_scaler(tmp_path):
    module, opt = _fresh()  # no step yet: what an fp16 run whose scaler skipped every step so far saves
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
    path = tmp_path / "last.safetensors"
    common.save_checkpoint(path, module, opt, {"step": 1, "position": 2}, "fmt", scaler)
    m2, o2 = _fresh()
    s2 = torch.amp.GradScaler("cpu")
    assert common.load_checkpoint(path, m2, o2, "fmt", scaler=s2)["step"] == 1
    assert s2.get_scale() == 8.0 and not o2.state_dict()["state"]
    assert_raises_naming(lambda: common.load_checkpoint(path, *_fresh(), "fmt"), WeightsFileError,
                         [str(path), "lacks tensor(s) optim.0.exp_avg"])


def test_truncate_log(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (1, 2, 3, 4)) + '{"step": 5, "lo')
    common.truncate_log(log, 2)
    assert log_steps(log) == [1, 2]
    common.truncate_log(log, 0)
    assert log.read_text() == ""
    common.truncate_log(tmp_path / "none.jsonl", 3)
    assert not (tmp_path / "none.jsonl").exists()


def test_cli_resume_from_a_checkpoint_with_renamed_optimizer_state(tmp_path, capsys):
    from PIL import Image

    from weakseg.cli import main

    data = tmp_path / "pairs"
    data.mkdir()
    for i, cap in enumerate(["a red circle on grass", "a blue square on sand"]):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(data / f"{i}.jpg")
        (data / f"{i}.txt").write_text(cap)
    run = tmp_path / "run"
    args = ["train", "synseg", "--data", str(data), "--out", str(run), "--set", "preset=tiny", "--quiet", "--train",
            "batch_size=2"]
    assert main(args + ["iterations=1"]) == 0
    last = run / "last.safetensors"
    from safetensors import safe_open

    with safe_open(str(last), "pt") as f:
        meta = f.metadata()
    tensors = load_file(str(last))
    tensors = {k.replace("exp_avg", "m") if k.startswith("optim.0.") else k: v for k, v in tensors.items()}
    save_file(tensors, str(last), metadata=meta)
    capsys.readouterr()
    assert main(args + ["iterations=2"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(last) in err and "optim.0.exp_avg" in err, err
