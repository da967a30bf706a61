"""``erode`` and ``erode_labels``: rectangular erosion of binary masks and label maps.

Contract (docs/design.md, ops 1 and 2): masks (..., H, W) bool/uint8 are eroded with a
(kh, kw) rectangle (odd sizes); pixels outside the image count as foreground, so
image borders never erode (OpenCV's default border). ``iterations`` passes of a
k-window equal one pass of a ((k-1)*iterations+1)-window. For uint8 the result
is the window minimum (binary erosion for binary masks, as OpenCV). Label maps:
a pixel keeps its label iff every in-image pixel of its window has the same
label, else ``ignore_index`` (ModuSeg's Semantic Boundary Purification:
3x3 x 20 iterations == 41x41). Any kernel_size / iterations a Python int can
hold is exact: a window larger than the image covers all of it (the wrappers
pass the op that capped window; the compiled op saturates its radius).

The compiled kernels do O(1) work per pixel in the window size (van Herk /
Gil-Werman); the references below are max-pool based and O(k^2).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from weakseg.core import is_int
from weakseg.ops._common import check, has_library_op, pair, run_op

__all__ = ["erode", "erode_labels", "erode_reference", "erode_labels_reference"]

_LABEL_DTYPES = (torch.int64, torch.int32, torch.uint8)


def _radius(kernel_size, iterations, op: str) -> tuple[int, int]:
    kh, kw = pair(kernel_size, "kernel_size", op)
    check(kh >= 1 and kw >= 1 and kh % 2 == 1 and kw % 2 == 1, op,
          f"kernel_size must be odd and positive, got ({kh}, {kw})")
    check(is_int(iterations, 0), op,
          f"iterations must be an int >= 0, got {iterations!r}")
    return (kh // 2) * iterations, (kw // 2) * iterations


def _check_planes(t, name: str, op: str) -> None:
    check(isinstance(t, torch.Tensor), op, f"expected {name} to be a tensor, got {type(t).__name__}", TypeError)
    check(t.dim() >= 2, op, f"expected {name} of shape (..., H, W), got {tuple(t.shape)}")


def _check_mask(mask) -> None:
    _check_planes(mask, "mask", "erode")
    check(mask.dtype in (torch.bool, torch.uint8), "erode",
          f"expected mask of dtype bool or uint8, got {mask.dtype}", TypeError)


def _check_labels(labels, ignore_index) -> None:
    _check_planes(labels, "labels", "erode_labels")
    check(labels.dtype in _LABEL_DTYPES, "erode_labels",
          f"expected labels of dtype int64, int32 or uint8, got {labels.dtype}", TypeError)
    check(is_int(ignore_index), "erode_labels",
          f"ignore_index must be an int, got {ignore_index!r}", TypeError)
    info = torch.iinfo(labels.dtype)
    check(info.min <= ignore_index <= info.max, "erode_labels",
          f"ignore_index {ignore_index} does not fit the labels' dtype {labels.dtype}")


def _window_min(x: torch.Tensor, ry: int, rx: int) -> torch.Tensor:
    """Min over a (2ry+1)x(2rx+1) window with out-of-image pixels ignored, via max-pool."""
    shape = x.shape
    planes = x.reshape(-1, 1, shape[-2], shape[-1]).to(torch.float64)
    # max_pool2d pads with -inf, i.e. the identity of max: exactly "outside ignored".
    out = -F.max_pool2d(-planes, (2 * ry + 1, 2 * rx + 1), stride=1, padding=(ry, rx))
    return out.reshape(shape)


def erode_reference(mask: torch.Tensor, kernel_size, iterations: int = 1) -> torch.Tensor:
    """Pure-PyTorch erosion (max-pool based); same contract as :func:`erode`."""
    _check_mask(mask)
    ry, rx = _radius(kernel_size, iterations, "erode")
    if mask.numel() == 0:
        return torch.empty_like(mask)
    # A window larger than the image reduces over the whole (in-image) extent.
    ry, rx = min(ry, mask.shape[-2]), min(rx, mask.shape[-1])
    return _window_min(mask.to(torch.uint8), ry, rx).to(mask.dtype)


def erode_labels_reference(labels: torch.Tensor, kernel_size, iterations: int = 1,
                           ignore_index: int = 255) -> torch.Tensor:
    """Pure-PyTorch label-map erosion: keep a label iff its window's min equals its max."""
    _check_labels(labels, ignore_index)
    ry, rx = _radius(kernel_size, iterations, "erode_labels")
    if labels.numel() == 0:
        return torch.empty_like(labels)
    ry, rx = min(ry, labels.shape[-2]), min(rx, labels.shape[-1])
    lo = _window_min(labels, ry, rx)
    hi = -_window_min(-labels.to(torch.float64), ry, rx)
    keep = lo == hi
    return torch.where(keep, labels, torch.full_like(labels, ignore_index))


def _effective_window(t: torch.Tensor, kernel_size, iterations, op: str) -> list[int]:
    """The one-pass window equal to ``iterations`` passes of ``kernel_size`` on ``t``'s planes, its radii
    capped at the plane's extent (a larger window covers the same pixels): what the compiled op gets, so
    that any Python int (2**62 + 1, 10**30) is exact and nothing overflows int64."""
    ry, rx = _radius(kernel_size, iterations, op)
    ry, rx = min(ry, t.shape[-2]), min(rx, t.shape[-1])
    return [2 * ry + 1, 2 * rx + 1]


def erode(mask: torch.Tensor, kernel_size, iterations: int = 1) -> torch.Tensor:
    """Binary erosion of (..., H, W) bool/uint8 masks with a rectangle; borders never erode."""
    _check_mask(mask)
    window = _effective_window(mask, kernel_size, iterations, "erode")
    return run_op("erode", erode_reference, mask.device, mask, window, 1)


def erode_labels(labels: torch.Tensor, kernel_size, iterations: int = 1, ignore_index: int = 255) -> torch.Tensor:
    """Label-map erosion: labels survive only where their whole window agrees, else ``ignore_index``."""
    _check_labels(labels, ignore_index)
    window = _effective_window(labels, kernel_size, iterations, "erode_labels")
    return run_op("erode_labels", erode_labels_reference, labels.device, labels, window, 1, ignore_index)


if has_library_op("erode"):

    @torch.library.register_fake("weakseg::erode")
    def _erode_fake(mask, kernel_size, iterations=1):
        return torch.empty_like(mask)

    @torch.library.register_fake("weakseg::erode_labels")
    def _erode_labels_fake(labels, kernel_size, iterations=1, ignore_index=255):
        return torch.empty_like(labels)
