"""Helpers shared by the op wrappers: dispatch to the compiled op or the reference."""

from __future__ import annotations

from typing import Callable

import torch

from weakseg.core import is_int
from weakseg.ops import extension as _ext


@torch.compiler.assume_constant_result
def _has_kernel(name: str, device_type: str) -> bool:
    # A constant for torch.compile, which cannot trace the dispatcher query itself.
    return _ext.has_kernel(name, device_type)


def run_op(name: str, reference: Callable, device: torch.device, *args):
    """Call ``torch.ops.weakseg.<name>`` when it has a kernel for ``device``, else the reference."""
    if _has_kernel(name, device.type):
        return getattr(torch.ops.weakseg, name)(*args)
    _ext.warn_fallback(name, device.type)
    return reference(*args)


def pair(value, name: str, op: str) -> tuple[int, int]:
    """An int or a pair of ints as a (kh, kw) tuple, with a clear error otherwise."""
    items = [value, value] if isinstance(value, int) else value
    ok = isinstance(items, (tuple, list)) and len(items) == 2
    ok = ok and all(is_int(v) for v in items)
    if not ok:
        raise TypeError(f"weakseg.{op}: {name} must be an int or a pair of ints, got {value!r}")
    return (items[0], items[1])


def check(cond: bool, op: str, message: str, exc=ValueError) -> None:
    """Raise ``exc('weakseg.<op>: <message>')`` unless ``cond``."""
    if not cond:
        raise exc(f"weakseg.{op}: {message}")


def has_library_op(name: str) -> bool:
    """Whether the schema ``weakseg::<name>`` is registered (the extension is loaded)."""
    return _ext.HAS_EXT and hasattr(torch.ops.weakseg, name)


def has_values(*tensors: torch.Tensor) -> bool:
    """Whether the wrappers may read the values of ``tensors`` in Python (for the checks that look at
    data, like an index range): not while torch.compile traces, nor for fake or meta tensors (the
    compiled ops check the values themselves when they run)."""
    if torch.compiler.is_compiling():
        return False
    from torch._subclasses.fake_tensor import is_fake

    return not any(t.is_meta or is_fake(t) for t in tensors)
