"""Assertions shared by the op test modules."""

import contextlib

import pytest


def assert_raises_naming(call, exc, words):
    """``call()`` raises ``exc`` whose message names every one of ``words``."""
    with pytest.raises(exc) as e:
        call()
    for w in words:
        assert w in str(e.value), f"{w!r} not in {str(e.value)!r}"


def diclip_tiny_models():
    """The tiny random (CLIP, SD) pair the DiCLIP tests run on (one thread, as the tests are timed)."""
    import torch

    from weakseg.backbones.clip import CLIPBackbone
    from weakseg.backbones.diffusion import StableDiffusionBackbone

    torch.set_num_threads(1)
    return CLIPBackbone.tiny(seed=0, pos_interp="bilinear"), StableDiffusionBackbone.tiny(seed=0, heads=4)


def make_diclip(models, **kw):
    """A DiCLIP with the "tiny" preset and ``kw`` on the given (clip, sd) pair."""
    from weakseg.methods.diclip import DiCLIP, DiCLIPConfig

    clip, sd = models
    return DiCLIP(DiCLIPConfig.from_dict({"preset": "tiny", **kw}), clip=clip, sd=sd)


@contextlib.contextmanager
def torch_threads(n: int):
    """torch's intra-op thread count for a block (the CPU kernels split their work by at::get_num_threads();
    the tests otherwise run with one)."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)
