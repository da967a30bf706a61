"""weakseg.io: the atomic writers every cache, checkpoint, report and model file goes through."""

import json
import os
import stat

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, safe_open

from weakseg import io


def _umask():
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if ".tmp" in p.name)


def test_atomic_path_replaces_only_on_success(tmp_path):
    target = tmp_path / "sub" / "report.json"
    io.write_text(target, "old")
    with pytest.raises(RuntimeError, match="boom"):
        with io.atomic_path(target) as tmp:
            assert tmp.parent == target.parent and tmp.suffix == ".json" and tmp != target
            tmp.write_text("half-writ")
            raise RuntimeError("boom")
    assert target.read_text() == "old"          # the reader never sees the half-written file
    assert _leftovers(target.parent) == []      # and the temporary is gone
    with io.atomic_path(target) as tmp:
        tmp.write_text("new")
        assert target.read_text() == "old"      # not replaced before the block ends
    assert target.read_text() == "new" and _leftovers(target.parent) == []
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~_umask()  # not mkstemp's private 0600


def test_write_json_and_text(tmp_path):
    p = io.write_json(tmp_path / "a" / "b.json", {"x": [1, 2], "b": 1}, sort_keys=True)
    assert p.read_text().endswith("\n") and json.loads(p.read_text()) == {"b": 1, "x": [1, 2]}
    assert p.read_text().index('"b"') < p.read_text().index('"x"')
    assert io.write_text(tmp_path / "t.txt", "héllo").read_bytes() == "héllo".encode()


def test_save_safetensors_roundtrip(tmp_path):
    t = torch.arange(12.0).view(3, 4).t()        # non-contiguous input is accepted
    p = io.save_safetensors({"w": t, "i": torch.tensor([1, 2], dtype=torch.int32)}, tmp_path / "m.safetensors",
                            metadata={"format": "test"})
    got = load_file(str(p))
    assert torch.equal(got["w"], t) and got["i"].dtype == torch.int32
    assert stat.S_IMODE(p.stat().st_mode) & 0o044 == 0o044 & ~_umask()  # group/other may read (umask 022)
    with safe_open(str(p), "pt") as f:
        assert f.metadata() == {"format": "test"}
    assert _leftovers(tmp_path) == []


def test_save_safetensors_failure_keeps_old_file(tmp_path):
    p = io.save_safetensors({"w": torch.ones(2)}, tmp_path / "m.safetensors")
    with pytest.raises(Exception):
        io.save_safetensors({"w": "not a tensor"}, p)
    assert torch.equal(load_file(str(p))["w"], torch.ones(2)) and _leftovers(tmp_path) == []


def test_save_png_label_and_rgb(tmp_path):
    lab = np.array([[0, 1], [255, 7]], dtype=np.uint8)
    with Image.open(io.save_png(lab, tmp_path / "l.png")) as im:
        assert im.mode == "L" and np.array_equal(np.asarray(im), lab)
    rgb = np.random.default_rng(0).integers(0, 256, (5, 6, 3), dtype=np.uint8)
    with Image.open(io.save_png(rgb, tmp_path / "c.png")) as im:
        assert im.mode == "RGB" and np.array_equal(np.asarray(im), rgb)
    with pytest.raises(TypeError, match="uint8"):
        io.save_png(lab.astype(np.int64), tmp_path / "x.png")
    with pytest.raises(ValueError, match="shape"):
        io.save_png(np.zeros((2, 2, 2), np.uint8), tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists() and _leftovers(tmp_path) == []


def test_check_weights_names_the_file_and_the_problem():
    from weakseg.core import WeightsFileError, check_weights

    want = {"w": torch.zeros(2, 3), "b": torch.zeros(3), "n": torch.zeros(4, dtype=torch.int64)}
    good = {"w": torch.ones(2, 3), "b": torch.ones(3), "n": torch.arange(4)}
    assert check_weights(good, want, "/x/h.safetensors", "arg") is good
    cases = [({**good, "w": torch.ones(2, 3, dtype=torch.float64)}, "tensor 'w' has dtype float64, expected float32"),
             ({**good, "b": torch.ones(4)}, "tensor 'b' has shape (4,), expected (3,)"),
             ({**good, "b": torch.tensor([0.0, float("nan"), 1.0])}, "tensor 'b' holds NaN or Inf"),
             ({**good, "w": torch.full((2, 3), -float("inf"))}, "tensor 'w' holds NaN or Inf"),
             ({"w": good["w"], "n": good["n"], "bias": good["b"]}, "lacks tensor(s) b, has unexpected tensor(s) bias")]
    for tensors, words in cases:
        with pytest.raises(WeightsFileError) as e:
            check_weights(tensors, want, "/x/h.safetensors", "arg", "retrain")
        msg = str(e.value)
        assert isinstance(e.value, ValueError) and "\n" not in msg
        assert msg.startswith("arg: '/x/h.safetensors' ") and words in msg and msg.endswith("; retrain"), msg


def test_read_safetensors_errors_name_the_file_and_use_the_callers_error(tmp_path):
    from weakseg.core import read_safetensors, read_safetensors_file
    from weakseg.methods.diclip import CacheError, KVCache
    from weakseg.methods.moduseg import BankError, FeatureBank

    good = tmp_path / "good.safetensors"
    io.save_safetensors({"x": torch.arange(3)}, good, metadata={"format": "f", "n": "7"})
    tensors, meta = read_safetensors(good, "arg")
    assert torch.equal(tensors["x"], torch.arange(3)) and meta == {"format": "f", "n": "7"}
    assert read_safetensors_file(good, ("f",), "arg")[1] == {"n": 7}
    with pytest.raises(ValueError, match="format 'f', expected 'g'"):
        read_safetensors_file(good, ("g",), "arg")

    missing = tmp_path / "missing.safetensors"
    with pytest.raises(FileNotFoundError, match=r"arg: no such file .*missing\.safetensors.*; run make-it"):
        read_safetensors(missing, "arg", "run make-it")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")

    class MyError(ValueError):
        pass

    with pytest.raises(MyError, match=r"arg: .*bad\.safetensors' is not a readable safetensors file"):
        read_safetensors(bad, "arg", error=MyError)
    # the methods' own file errors come from the same reader
    with pytest.raises(BankError, match="feature bank: .*not a readable safetensors file"):
        FeatureBank.load(bad)
    with pytest.raises(CacheError, match="cache: .*not a readable safetensors file"):
        KVCache.load(bad)
    with pytest.raises(FileNotFoundError, match="weakseg bank build"):
        FeatureBank.load(missing)
    with pytest.raises(FileNotFoundError, match="weakseg cache build"):
        KVCache.load(missing)
