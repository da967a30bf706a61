"""Atomic file writes (the one place where weakseg writes a file that a reader may see half-written) and
the one image reader (:func:`read_image`, :func:`check_image_file`).

Every write goes to a temporary file in the target's folder (so the final rename never crosses a file
system) and is renamed over the target with :func:`os.replace` only after it was written completely; on
any error the temporary file is removed and the target is left as it was. Readers therefore see either
the old file or the whole new one, and an interrupted job (Ctrl-C, a killed worker) never leaves a
truncated cache entry, checkpoint, report or model file behind.

Images are read by :func:`read_image` only (the CLI, the dataset readers and the caption readers), so every
input gets the same conversion to RGB uint8 (16-bit images are rescaled, not clipped) and the same one-line
:class:`ImageReadError` for truncated, unidentifiable or oversized ("decompression bomb") files.
"""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

__all__ = ["atomic_path", "write_text", "write_bytes", "write_json", "save_safetensors", "save_png", "read_image",
           "check_image_file", "ImageReadError", "hash_file"]


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


# ---------------------------------------------------------------------------------------------- reading
def hash_file(h, path: str | os.PathLike):
    """Feed the bytes of ``path`` to the hashlib object ``h`` in 1 MiB blocks; returns ``h``."""
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h


def state_digest(*modules) -> str:
    """sha256 (hex) over the names, dtypes, shapes and bytes of every tensor of ``modules``' state dicts, in
    order: the key of a cache derived from those weights."""
    import hashlib

    import torch

    h = hashlib.sha256()
    for i, mod in enumerate(modules):
        for name, t in sorted(mod.state_dict().items()):
            t = t.detach().cpu().contiguous()
            h.update(f"{i}:{name}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class ImageReadError(ValueError):
    """An image file that exists but cannot be decoded (truncated, not an image, too large)."""


def _open_checked(source, what: str):
    """Open ``source`` (a path or bytes) with Pillow, turning its decompression-bomb warning into an error
    and every decoding failure into :class:`ImageReadError`; ``what`` names the input in the message."""
    import io as _io
    import warnings

    from PIL import Image

    data = _io.BytesIO(source) if isinstance(source, (bytes, bytearray, memoryview)) else source
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return Image.open(data)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageReadError(f"{what}: refused as a possible decompression bomb ({e})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:  # UnidentifiedImageError is an OSError
        if isinstance(e, (FileNotFoundError, IsADirectoryError, PermissionError)):
            raise
        raise ImageReadError(f"{what}: not a readable image ({type(e).__name__}: {e})") from None


def _check_path(path: str | os.PathLike, what: str) -> Path:
    p = Path(path)
    if p.is_dir():
        raise ImageReadError(f"{what}: {str(p)!r} is a directory, expected an image file")
    if not p.is_file():
        raise FileNotFoundError(f"{what}: no such file {str(p)!r}")
    if not os.access(p, os.R_OK):
        raise ImageReadError(f"{what}: {str(p)!r} is not readable (permission denied)")
    return p


def check_image_file(path: str | os.PathLike, what: str = "image") -> tuple[int, int]:
    """Check, without decoding the pixels, that ``path`` is a readable image file whose header Pillow
    understands and whose size is below Pillow's decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``);
    for PNGs the chunk checksums are verified too (which catches most truncations). Returns (width,
    height). Raises FileNotFoundError or :class:`ImageReadError` naming ``what`` and the path."""
    p = _check_path(path, what)
    im = _open_checked(p, f"{what} {str(p)!r}")
    try:
        size = im.size
        im.verify()
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageReadError(f"{what} {str(p)!r}: not a readable image ({type(e).__name__}: {e})") from None
    finally:
        im.close()
    return size


def read_image(source: str | os.PathLike | bytes, what: str = "image"):
    """An image file (a path, or its bytes) as a (3, H, W) uint8 RGB tensor.

    16-bit images (grey modes ``I;16*`` and ``I``, whose values are taken as 0..65535) keep their high byte
    (``v >> 8``), as Pillow does itself for 16-bit RGB PNGs, instead of being clipped at 255 by
    ``convert("RGB")``; every other mode goes through ``convert("RGB")`` (palette, grey, CMYK, alpha
    dropped). Raises FileNotFoundError for a missing path and :class:`ImageReadError` (a ValueError) for a
    directory, a truncated or unidentifiable file or a decompression bomb, naming ``what`` and the path."""
    import numpy as np
    import torch

    if isinstance(source, (bytes, bytearray, memoryview)):
        label = what
    else:
        source = _check_path(source, what)
        label = f"{what} {str(source)!r}"
    im = _open_checked(source, label)
    try:
        with im:
            if im.mode.startswith("I;16") or im.mode == "I":
                grey = np.asarray(im).astype(np.int64)
                arr = np.repeat((np.clip(grey, 0, 65535) >> 8).astype(np.uint8)[..., None], 3, axis=2)
            else:
                arr = np.array(im.convert("RGB"))
    except (OSError, SyntaxError, ValueError, EOFError) as e:  # truncated data surfaces only when decoding
        raise ImageReadError(f"{label}: not a readable image ({type(e).__name__}: {e})") from None
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).contiguous()
