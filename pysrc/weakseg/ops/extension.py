"""Loading of the compiled extension ``weakseg._C`` and what it provides.

Importing ``weakseg._C`` runs the static registrations of every op in the
``weakseg`` torch library namespace. When it is missing (a source checkout
that was never built, or a build against another torch), the ops fall back to
their pure-PyTorch references with a one-line warning.
"""

from __future__ import annotations

import functools
import warnings

import torch

_error: str | None = None
try:  # pragma: no branch
    from weakseg import _C  # noqa: F401

    HAS_EXT = True
except ImportError as e:  # the package still works, on the references
    HAS_EXT = False
    _error = str(e)

_warned: set[str] = set()


def extension_error() -> str | None:
    """Why the extension could not be imported (None when it is loaded)."""
    return _error


@functools.lru_cache(maxsize=None)
def has_kernel(op: str, device_type: str) -> bool:
    """Whether ``weakseg::<op>`` has a compiled kernel for ``device_type`` ('cpu', 'cuda')."""
    if not HAS_EXT:
        return False
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    if key is None:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"weakseg::{op}", key)


def built_with_cuda() -> bool:
    """Whether the extension was compiled with its CUDA kernels."""
    return HAS_EXT and bool(torch.ops.weakseg._built_with_cuda())


def warn_fallback(op: str, device_type: str) -> None:
    """One warning per (op, device) when an op runs on its Python reference."""
    key = f"{op}:{device_type}"
    if key in _warned:
        return
    _warned.add(key)
    why = f"the compiled extension is missing ({_error})" if not HAS_EXT else f"no compiled {device_type} kernel"
    warnings.warn(f"weakseg.ops.{op}: {why}; using the pure-PyTorch reference", RuntimeWarning, stacklevel=3)
