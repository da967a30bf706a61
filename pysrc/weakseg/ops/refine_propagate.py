"""``refine_propagate``: iSeg's entropy-reduced self-attention and its N-step
propagation of class maps (also DiCLIP's random walk on SD attention and
DiffSegmenter's single product); ``refine_propagate_qk`` does the same from the
per-head queries and keys of the self-attention layer.

Contract (docs/design.md, op 5), in the reference code's order, for attention
``attn`` (B, P, P) with rows = queries and maps (B, P, K)::

    T  = attn / colmax(attn)                  # column max over the queries
    T  = T + ent * log10(e * T)  where T > 0  # 0 stays 0
    T  = max(T, 0)
    Pm = T / rowsum(T)
    C  = maps - colmin(maps);  C = C / colsum(C)
    repeat steps times:  C = Pm @ C;  C = C - colmin(C);  C = C / colsum(C)

Columns whose sum is 0 stay 0. Entries <= 0 contribute nothing, and a column
of ``attn`` without a positive entry is all zero in T (the reference would
divide by 0); a row of T that the clamp empties is a zero row of Pm. The result
is float32 (float64 for float64 input).

The compiled kernels keep one P x P buffer, T' (the clamped T), and its row
sums r: each step is one GEMM (T' C) / r followed by the exact per-step
normalisation, so no chain of P x P temporaries is built.

``refine_propagate_qk(q, k, maps, ent, steps, scale)`` takes q, k (B, heads, P,
d) and uses the head-mean softmax attention ``mean_h softmax(q_h k_h^T * scale)``
(``scale`` defaults to d ** -0.5). On CUDA it never forms a P x P float32
matrix: the logits are recomputed block by block and T' is held in bf16, so it
matches the float32 path within bf16 rounding. It returns float32 on CUDA.
"""

from __future__ import annotations

import math

import torch

from weakseg.core import is_int
from weakseg.ops._common import check, has_library_op, run_op

__all__ = ["refine_propagate", "refine_propagate_qk", "refine_propagate_reference", "refine_propagate_qk_reference",
           "head_mean_attention"]


def _check_common(maps, B, P, other, other_name, ent, steps, op):
    check(isinstance(maps, torch.Tensor), op, f"expected maps to be a tensor, got {type(maps).__name__}", TypeError)
    check(maps.dim() == 3, op, f"expected maps of shape (B, P, K), got {tuple(maps.shape)}")
    check(maps.is_floating_point(), op, f"expected floating-point maps, got {maps.dtype}", TypeError)
    check(maps.device == other.device, op,
          f"expected {other_name} and maps on the same device, got {other.device} and {maps.device}")
    check(maps.shape[0] == B and maps.shape[1] == P, op,
          f"maps must be (B, P, K) = ({B}, {P}, K) to match {other_name}, got {tuple(maps.shape)}")
    check(isinstance(ent, (int, float)) and not isinstance(ent, bool) and math.isfinite(ent) and ent >= 0, op,
          f"ent must be a finite number >= 0, got {ent!r}")
    check(is_int(steps, 0), op,
          f"steps must be an int >= 0, got {steps!r}")


def _check(attn, maps, ent, steps) -> None:
    op = "refine_propagate"
    check(isinstance(attn, torch.Tensor), op, f"expected attn to be a tensor, got {type(attn).__name__}", TypeError)
    check(attn.dim() == 3 and attn.shape[1] == attn.shape[2], op,
          f"expected attn of shape (B, P, P), got {tuple(attn.shape)}")
    check(attn.is_floating_point(), op, f"expected floating-point attn, got {attn.dtype}", TypeError)
    _check_common(maps, attn.shape[0], attn.shape[1], attn, "attn", ent, steps, op)


def _check_qk(q, k, maps, ent, steps, scale) -> None:
    op = "refine_propagate_qk"
    for name, t in (("q", q), ("k", k)):
        check(isinstance(t, torch.Tensor), op, f"expected {name} to be a tensor, got {type(t).__name__}", TypeError)
    check(q.dim() == 4, op, f"expected q of shape (B, heads, P, d), got {tuple(q.shape)}")
    check(k.shape == q.shape, op, f"expected k of the same shape as q {tuple(q.shape)}, got {tuple(k.shape)}")
    check(q.is_floating_point() and k.is_floating_point(), op,
          f"expected floating-point q and k, got {q.dtype} and {k.dtype}", TypeError)
    check(q.device == k.device, op, f"expected q and k on the same device, got {q.device} and {k.device}")
    check(q.shape[1] >= 1, op, f"q and k need at least one head, got {tuple(q.shape)}")
    check(q.shape[3] >= 1, op, f"q and k need a head dimension d >= 1, got {tuple(q.shape)}")
    _check_common(maps, q.shape[0], q.shape[2], q, "q", ent, steps, op)
    check(isinstance(scale, (int, float)) and not isinstance(scale, bool) and math.isfinite(scale), op,
          f"scale must be a finite number, got {scale!r}")


def _default_scale(q, scale):
    """``scale``, or d ** -0.5 when it is None and q is (B, heads, P, d) with d >= 1 (otherwise the
    check names what is wrong with q)."""
    if scale is None and isinstance(q, torch.Tensor) and q.dim() == 4 and q.shape[-1] >= 1:
        return float(q.shape[-1] ** -0.5)
    return scale


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _colnorm(c: torch.Tensor) -> torch.Tensor:
    c = c - c.amin(dim=1, keepdim=True)
    s = c.sum(dim=1, keepdim=True)
    return torch.where(s > 0, c / torch.where(s > 0, s, 1), torch.zeros_like(c))


def refine_propagate_reference(attn, maps, ent: float, steps: int):
    """The eager sequence of the reference code (fp32, or fp64 for fp64 input); same contract."""
    _check(attn, maps, ent, steps)
    dt = _compute_dtype(attn)
    a = attn.to(dt)
    if a.shape[1] == 0:
        return torch.zeros(maps.shape, dtype=dt, device=maps.device)
    cmax = a.amax(dim=1, keepdim=True)  # per key column, over the queries
    t = torch.where(cmax > 0, a / torch.where(cmax > 0, cmax, 1), torch.zeros_like(a))
    t = torch.where(t > 0, t + ent * torch.log10(math.e * t), t)
    t = t.clamp_min(0)
    rs = t.sum(dim=2, keepdim=True)
    pm = torch.where(rs > 0, t / torch.where(rs > 0, rs, 1), torch.zeros_like(t))
    c = _colnorm(maps.to(dt))
    for _ in range(steps):
        c = _colnorm(pm @ c)
    return c


def head_mean_attention(q, k, scale: float | None = None):
    """mean over heads of softmax(q k^T * scale): (B, H, P, d) x 2 -> (B, P, P) in q's compute dtype."""
    check(q.shape[-1] >= 1, "head_mean_attention", f"q and k need a head dimension d >= 1, got {tuple(q.shape)}")
    dt = _compute_dtype(q)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return torch.softmax((q.to(dt) @ k.to(dt).transpose(-1, -2)) * scale, dim=-1).mean(dim=1)


def refine_propagate_qk_reference(q, k, maps, ent: float, steps: int, scale: float | None = None):
    """Builds the head-mean softmax attention, then :func:`refine_propagate_reference`."""
    scale = _default_scale(q, scale)
    _check_qk(q, k, maps, ent, steps, scale)
    return refine_propagate_reference(head_mean_attention(q, k, scale), maps, ent, steps)


def refine_propagate(attn, maps, ent: float = 0.015, steps: int = 10):
    """Entropy-reduced attention + ``steps`` normalised propagation steps of ``maps`` -> (B, P, K)."""
    _check(attn, maps, ent, steps)
    return run_op("refine_propagate", refine_propagate_reference, attn.device, attn, maps, float(ent), int(steps))


def refine_propagate_qk(q, k, maps, ent: float = 0.015, steps: int = 10, scale: float | None = None):
    """:func:`refine_propagate` on ``mean_h softmax(q_h k_h^T * scale)`` without storing it in float32."""
    scale = _default_scale(q, scale)
    _check_qk(q, k, maps, ent, steps, scale)
    return run_op("refine_propagate_qk", refine_propagate_qk_reference, q.device, q, k, maps, float(ent), int(steps),
                  float(scale))


if has_library_op("refine_propagate"):

    @torch.library.register_fake("weakseg::refine_propagate")
    def _fake(attn, maps, ent, steps):
        return maps.new_empty(maps.shape, dtype=_compute_dtype(attn))

    @torch.library.register_fake("weakseg::refine_propagate_qk")
    def _fake_qk(q, k, maps, ent, steps, scale):
        dt = torch.float32 if q.device.type == "cuda" else _compute_dtype(q)
        return maps.new_empty(maps.shape, dtype=dt)
