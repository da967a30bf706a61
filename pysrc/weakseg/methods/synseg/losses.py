"""SynSeg's Multi-Category Contrastive losses (MCCL, docs/specs/synseg.md §3): the bounded cosine
(:func:`bounded_cos`) and the four terms ft, fb, bb, ff (:func:`mccl_losses`).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from weakseg.methods.synseg.config import LOSS_NAMES

__all__ = ["bounded_cos", "mccl_losses"]


def bounded_cos(u: torch.Tensor, v: torch.Tensor, eps: float = 1e-4, mode: str = "bounded"
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(ŝ, s): the raw cosine ``s`` of L2-normalised ``u``, ``v`` over the last axis and its bounded map
    ``ŝ ∈ [ε, 1 − ε]`` ("bounded": ε + (1 − 2ε)(clamp(s, −1, 1) + 1)/2) or CCAM's clamp of ``s`` to
    [5e-4, 0.9995] ("clamp")."""
    s = (F.normalize(u, dim=-1) * F.normalize(v, dim=-1)).sum(-1)
    if mode == "bounded":
        return eps + (1 - 2 * eps) * (s.clamp(-1, 1) + 1) / 2, s
    if mode == "clamp":
        return s.clamp(5e-4, 0.9995), s
    raise ValueError(f"mode: expected 'bounded' or 'clamp', got {mode!r}")


def mccl_losses(fg: torch.Tensor, bg: torch.Tensor, text: torch.Tensor, valid: torch.Tensor | None = None,
                weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0), eps: float = 1e-4, mode: str = "bounded",
                gate: float | None = 0.1) -> dict[str, torch.Tensor]:
    """The four MCCL losses on fg, bg, text (B, K, E) with ``valid`` (B, K) bool (padded categories off).

    Per image n with K_n valid categories and the K_n(K_n − 1) ordered pairs P_n:
    ft = mean_c −log ŝ(f_c, t_c); fb = (1/K_n) Σ_c 1[s(f_c, b_c) > gate] · −log(1 − ŝ(f_c, b_c));
    bb = mean_P −log ŝ(b_c, b_c′); ff = mean_P −log(1 − ŝ(f_c, f_c′)) (0 when K_n < 2). Each term is averaged
    over the images with K_n >= 1. Returns {"loss": Σ λ·term, "ft", "fb", "bb", "ff"}."""
    if fg.shape != bg.shape or fg.shape != text.shape or fg.dim() != 3:
        raise ValueError(f"mccl_losses: expected fg, bg, text of one shape (B, K, E), got {tuple(fg.shape)}, "
                         f"{tuple(bg.shape)}, {tuple(text.shape)}")
    B, K, _ = fg.shape
    if valid is None:
        valid = torch.ones(B, K, dtype=torch.bool, device=fg.device)
    if valid.shape != (B, K):
        raise ValueError(f"valid: expected shape ({B}, {K}), got {tuple(valid.shape)}")
    valid = valid.to(fg.device, torch.bool)
    vf = valid.to(fg.dtype)
    kn = vf.sum(1)
    has = kn > 0
    n_img = has.to(fg.dtype).sum().clamp_min(1)

    ft_hat, _ = bounded_cos(fg, text, eps, mode)
    fb_hat, fb_raw = bounded_cos(fg, bg, eps, mode)
    ft_i = (-torch.log(ft_hat) * vf).sum(1) / kn.clamp_min(1)
    with torch.no_grad():
        g = (fb_raw > gate).to(fg.dtype) if gate is not None else torch.ones_like(fb_raw)
    fb_i = (-torch.log1p(-fb_hat) * g * vf).sum(1) / kn.clamp_min(1)

    pair = valid[:, :, None] & valid[:, None, :] & ~torch.eye(K, dtype=torch.bool, device=fg.device)[None]
    pf = pair.to(fg.dtype)
    npair = pf.sum((1, 2)).clamp_min(1)
    bb_hat, _ = bounded_cos(bg[:, :, None], bg[:, None, :], eps, mode)
    ff_hat, _ = bounded_cos(fg[:, :, None], fg[:, None, :], eps, mode)
    bb_i = (-torch.log(bb_hat) * pf).sum((1, 2)) / npair
    ff_i = (-torch.log1p(-ff_hat) * pf).sum((1, 2)) / npair

    terms = {n: (t * has.to(fg.dtype)).sum() / n_img for n, t in zip(LOSS_NAMES, (ft_i, fb_i, bb_i, ff_i))}
    total = sum(float(w) * terms[n] for w, n in zip(weights, LOSS_NAMES))
    return {"loss": total, **terms}
