"""The compiled extension: loaded, every op registered with CPU kernels, CUDA
kernels compiled whenever the build had nvcc, and the reference fallback."""

import os
import warnings

import pytest
import torch

import weakseg
from weakseg.ops import extension as _ext
from weakseg.ops import OPS


def test_extension_is_loaded():
    assert _ext.HAS_EXT, f"weakseg._C failed to import: {_ext.extension_error()}"


@pytest.mark.parametrize("op", OPS)
def test_cpu_kernel_registered(op):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"weakseg::{op}", "CPU")


@pytest.mark.parametrize("op", OPS)
def test_cuda_kernel_registered_when_built_with_nvcc(op):
    home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    if torch.version.cuda is None or not os.path.exists(os.path.join(home, "bin", "nvcc")):
        pytest.skip("this build environment has no CUDA torch + nvcc")
    assert _ext.built_with_cuda()
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"weakseg::{op}", "CUDA")


def test_fallback_to_reference_warns_once(monkeypatch):
    monkeypatch.setattr(_ext, "has_kernel", lambda op, dev: False)
    monkeypatch.setattr(_ext, "_warned", set())
    mask = torch.ones(5, 5, dtype=torch.bool)
    mask[2, 2] = False
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        out1 = weakseg.ops.erode(mask, 3)
        out2 = weakseg.ops.erode(mask, 3)
    msgs = [str(w.message) for w in rec if issubclass(w.category, RuntimeWarning)]
    assert len(msgs) == 1 and "erode" in msgs[0] and "reference" in msgs[0]
    assert torch.equal(out1, out2)
    assert out1.sum().item() == 25 - 9
