"""``masked_area_pool``: soft-masked average pooling of patch features.

Contract (docs/design.md, op 3): features (B, C, h, w) on the patch grid, masks
(B, M, H, W) at pixel resolution (bool/uint8: nonzero is foreground; float in
[0, 1]). Patch weights w = adaptive_avg_pool2d(mask, (h, w)) are the covered
fraction of each patch (ModuSeg's Soft-Masked Feature Aggregation, DiCLIP's mask
average pooling); pooled (B, M, C) = sum(w * f) / sum(w) (zeros where
sum(w) = 0), L2-normalised over C when ``normalize``; area (B, M) = sum(w).

The compiled kernels read the masks once to form the (B, M, h*w) weights and
finish with one batched GEMM; nothing of size (B, M, C, h, w) is formed.
Differentiable with respect to ``features``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from weakseg.ops._common import check, has_library_op, run_op

__all__ = ["masked_area_pool", "masked_area_pool_reference", "patch_weights_reference"]

_EPS_NORM = 1e-12


def _check(features, masks) -> None:
    op = "masked_area_pool"
    for name, t in (("features", features), ("masks", masks)):
        check(isinstance(t, torch.Tensor), op, f"expected {name} to be a tensor, got {type(t).__name__}", TypeError)
    check(features.dim() == 4, op, f"expected features of shape (B, C, h, w), got {tuple(features.shape)}")
    check(masks.dim() == 4, op, f"expected masks of shape (B, M, H, W), got {tuple(masks.shape)}")
    check(features.is_floating_point(), op, f"expected floating-point features, got {features.dtype}", TypeError)
    check(masks.dtype in (torch.bool, torch.uint8) or masks.is_floating_point(), op,
          f"expected masks of dtype bool, uint8 or floating point, got {masks.dtype}", TypeError)
    check(features.device == masks.device, op,
          f"expected features and masks on the same device, got {features.device} and {masks.device}")
    check(features.shape[0] == masks.shape[0], op,
          f"features and masks must have the same batch size, got {features.shape[0]} and {masks.shape[0]}")
    check(features.shape[2] >= 1 and features.shape[3] >= 1, op,
          f"features need a non-empty patch grid, got {tuple(features.shape)}")
    check(masks.shape[2] >= 1 and masks.shape[3] >= 1, op,
          f"masks need a non-empty H x W, got {tuple(masks.shape)}")


def _compute_dtype(features: torch.Tensor) -> torch.dtype:
    return torch.float64 if features.dtype == torch.float64 else torch.float32


def patch_weights_reference(masks: torch.Tensor, h: int, w: int, dtype=torch.float32) -> torch.Tensor:
    """(B, M, h*w) covered fraction of each patch, via adaptive_avg_pool2d."""
    B, M, H, W = masks.shape
    m = masks.to(torch.bool) if masks.dtype == torch.uint8 else masks
    m = m.to(dtype)
    if B * M == 0:
        return m.new_zeros(B, M, h * w)
    return F.adaptive_avg_pool2d(m.reshape(B * M, 1, H, W), (h, w)).reshape(B, M, h * w)


def _pool(features, weights, normalize):
    B, C, h, w = features.shape
    ct = _compute_dtype(features)
    W = weights.to(ct)
    sums = torch.bmm(W, features.reshape(B, C, h * w).to(ct).transpose(1, 2))
    area = W.sum(-1)
    pooled = torch.where((area > 0).unsqueeze(-1), sums / area.clamp_min(1e-30).unsqueeze(-1), sums.new_zeros(()))
    if normalize:
        pooled = pooled / pooled.norm(dim=-1, keepdim=True).clamp_min(_EPS_NORM)
    return pooled.to(features.dtype), area


def masked_area_pool_reference(features: torch.Tensor, masks: torch.Tensor, normalize: bool = True):
    """Pure-PyTorch soft-masked area pooling; same contract as :func:`masked_area_pool`."""
    _check(features, masks)
    weights = patch_weights_reference(masks, features.shape[2], features.shape[3])
    return _pool(features, weights, normalize)


def masked_area_pool(features: torch.Tensor, masks: torch.Tensor, normalize: bool = True):
    """Soft-masked average pooling of (B, C, h, w) features under (B, M, H, W) masks -> (pooled, area)."""
    _check(features, masks)
    return run_op("masked_area_pool", masked_area_pool_reference, features.device, features, masks, bool(normalize))


if has_library_op("masked_area_pool"):

    @torch.library.register_fake("weakseg::masked_area_pool")
    def _fake(features, masks, normalize=True):
        B, C = features.shape[0], features.shape[1]
        M = masks.shape[1]
        pooled = features.new_empty((B, M, C))
        area = features.new_empty((B, M), dtype=_compute_dtype(features))
        return pooled, area

    def _setup_context(ctx, inputs, output):
        features, masks, normalize = inputs
        ctx.save_for_backward(features, masks)
        ctx.normalize = normalize

    def _backward(ctx, grad_pooled, grad_area):
        features, masks = ctx.saved_tensors
        if grad_pooled is None or not ctx.needs_input_grad[0]:
            return None, None, None
        B, C, h, w = features.shape
        ct = _compute_dtype(features)
        W = patch_weights_reference(masks, h, w, dtype=ct)                  # (B, M, hw)
        area = W.sum(-1, keepdim=True)                                      # (B, M, 1)
        g = grad_pooled.to(ct)
        if ctx.normalize:
            # pooled = u / max(|u|, eps), u = sums / area.
            sums = torch.bmm(W, features.reshape(B, C, h * w).to(ct).transpose(1, 2))
            u = torch.where(area > 0, sums / area.clamp_min(1e-30), sums.new_zeros(()))
            norm = u.norm(dim=-1, keepdim=True)
            p = u / norm.clamp_min(_EPS_NORM)
            g = torch.where(norm > _EPS_NORM, (g - p * (p * g).sum(-1, keepdim=True)) / norm.clamp_min(_EPS_NORM),
                            g / _EPS_NORM)
        g_s = torch.where(area > 0, g / area.clamp_min(1e-30), g.new_zeros(()))
        grad_f = torch.bmm(W.transpose(1, 2), g_s)                          # (B, hw, C)
        return grad_f.transpose(1, 2).reshape(B, C, h, w).to(features.dtype), None, None

    torch.library.register_autograd("weakseg::masked_area_pool", _backward, setup_context=_setup_context)
