import os

# Tests are offline: hub names go to the local cache only (weakseg.backbones.hub makes no network probe).
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci", max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
settings.register_profile("dev", max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

HAS_CUDA = torch.cuda.is_available()
DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])

# Every test parametrised over `device` runs on CUDA where a GPU exists; elsewhere the
# cuda variants are collected and skipped with the reason.
cuda_only = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")


def pytest_generate_tests(metafunc):
    if "device" in metafunc.fixturenames:
        metafunc.parametrize(
            "device",
            ["cpu", pytest.param("cuda", marks=[cuda_only, pytest.mark.cuda])],
        )
