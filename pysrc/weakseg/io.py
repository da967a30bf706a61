"""Atomic file writes: the one place where weakseg writes a file that a reader may see half-written.

Every write goes to a temporary file in the target's folder (so the final rename never crosses a file
system) and is renamed over the target with :func:`os.replace` only after it was written completely; on
any error the temporary file is removed and the target is left as it was. Readers therefore see either
the old file or the whole new one, and an interrupted job (Ctrl-C, a killed worker) never leaves a
truncated cache entry, checkpoint, report or model file behind.
"""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

__all__ = ["atomic_path", "write_text", "write_bytes", "write_json", "save_safetensors", "save_png"]


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary path next to ``path`` (hidden, same suffix, so writers that look at the
    suffix still work); when the block ends without an error it replaces ``path`` atomically, otherwise it
    is deleted. The parent folder is created if needed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        # mkstemp (and safetensors' writer) make private 0600 files; give the result the usual permissions
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; returns ``path``."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns ``path``."""
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 2, **kwargs) -> Path:
    """Write ``obj`` as JSON (followed by a newline) to ``path`` atomically; ``kwargs`` go to
    :func:`json.dumps` (``sort_keys``, ``default``...)."""
    return write_text(path, json.dumps(obj, indent=indent, **kwargs) + "\n")


def save_safetensors(tensors: Mapping[str, Any], path: str | os.PathLike,
                     metadata: Mapping[str, str] | None = None) -> Path:
    """Save ``tensors`` (detached, moved to the CPU, made contiguous) as a safetensors file at ``path``
    atomically, with string ``metadata``."""
    from safetensors.torch import save_file

    flat = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(flat, str(tmp), metadata=dict(metadata) if metadata is not None else None)
    return Path(path)


def save_png(arr, path: str | os.PathLike) -> Path:
    """Write a uint8 array (H x W label / grey map, saved as mode "L", or H x W x 3 RGB) as a PNG at
    ``path`` atomically."""
    import numpy as np
    from PIL import Image

    arr = np.asarray(arr)
    if arr.dtype != np.uint8:
        raise TypeError(f"save_png: arr must be a uint8 array, got dtype {arr.dtype}")
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (3, 4)):
        raise ValueError(f"save_png: arr must be H x W or H x W x 3/4, got shape {tuple(arr.shape)}")
    im = Image.fromarray(np.ascontiguousarray(arr))
    with atomic_path(path) as tmp:
        im.save(tmp, format="PNG")
    return Path(path)
