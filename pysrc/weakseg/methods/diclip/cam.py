"""DiCLIP's CAMs on the CLIP token features (docs/specs/diclip.md §1, §3b, §3c).

All functions are plain tensor maths on

* ``feats`` (B, 1 + N, D): the CLIP token features, the original-path CLS first, then the N patch
  tokens of the surgery path (:func:`token_features`);
* text rows ``text`` (K, D) (classes first, then background words) or cache keys (M, D).

Min-max normalisation is over the token axis (dim 1), per class.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["token_features", "minmax_tokens", "surgery_similarity", "surgery_similarity_reference",
           "patch_text_cam", "text_weighted_values", "cache_similarity", "static_cache_cam", "combine_cams",
           "cache_text_rows"]


def token_features(cls: torch.Tensor, patch: torch.Tensor, norm: str = "tokens") -> torch.Tensor:
    """(B, D) CLS embedding + (B, h, w, D) patch features -> (B, 1 + hw, D) float32.

    norm: ``"tokens"`` divides by the L2 norm over the token axis (dim 1), the reference's quirk inherited
    from CLIP Surgery (``generate_clip_fts``); ``"channels"`` L2-normalises each token (the usual
    convention); ``"none"`` leaves them."""
    if norm not in ("tokens", "channels", "none"):
        raise ValueError(f"token_features: norm must be 'tokens', 'channels' or 'none', got {norm!r}")
    if cls.dim() != 2 or patch.dim() != 4 or patch.shape[0] != cls.shape[0] or patch.shape[-1] != cls.shape[-1]:
        raise ValueError(f"token_features: expected cls (B, D) and patch (B, h, w, D), got {tuple(cls.shape)} and "
                         f"{tuple(patch.shape)}")
    f = torch.cat([cls[:, None], patch.flatten(1, 2)], dim=1).float()
    if norm == "tokens":
        return f / f.norm(dim=1, keepdim=True).clamp_min(1e-12)
    if norm == "channels":
        return F.normalize(f, dim=-1)
    return f


def minmax_tokens(x: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """(x - min) / (max - min) along ``dim`` (the tokens); a constant slice becomes 0."""
    lo = x.amin(dim=dim, keepdim=True)
    rng = x.amax(dim=dim, keepdim=True) - lo
    return torch.where(rng > 0, (x - lo) / torch.where(rng > 0, rng, torch.ones_like(rng)), torch.zeros_like(x))


def surgery_similarity(feats: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """CLIP Surgery's feature-surgery similarity (``clip_feature_surgery``) without forming the
    (B, 1+N, K, D) product: G = F Rᵀ; w = softmax(2 G[:, 0]) / mean(·) per image (the CLS row weights
    the K rows); S[n, k] = w_k G[n, k] − mean_k'(w_k' G[n, k']). Returns (B, 1 + N, K) float32."""
    if feats.dim() != 3 or rows.dim() != 2 or feats.shape[-1] != rows.shape[-1]:
        raise ValueError(f"surgery_similarity: expected feats (B, 1 + N, D) and rows (K, D), got "
                         f"{tuple(feats.shape)} and {tuple(rows.shape)}")
    g = feats.float() @ rows.float().T
    prob = (2.0 * g[:, :1]).softmax(dim=-1)
    w = prob / prob.mean(dim=-1, keepdim=True)
    wg = w * g
    return wg - wg.mean(dim=-1, keepdim=True)


def surgery_similarity_reference(feats: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The element-wise form of CLIP Surgery (the test oracle): per image, feats ⊙ rows scaled by w,
    minus the mean over rows, summed over channels."""
    out = []
    for b in range(feats.shape[0]):
        f = feats[b].double()
        r = rows.double()
        prob = (2.0 * (f[:1] @ r.T)).softmax(-1)
        w = prob / prob.mean(-1, keepdim=True)
        prod = f[:, None, :] * r[None, :, :] * w.reshape(1, -1, 1)
        prod = prod - prod.mean(1, keepdim=True)
        out.append(prod.sum(-1))
    return torch.stack(out).float()


def patch_text_cam(feats: torch.Tensor, text: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Eq. 1: surgery similarity of the tokens to the text rows (classes then background words),
    min-max over all 1 + N tokens per row (the CLS token counts in the range), then the patches and the
    first ``num_classes`` rows. Returns cam_pt (B, N, num_classes) in [0, 1]; no ReLU."""
    if not 0 < num_classes <= text.shape[0]:
        raise ValueError(f"patch_text_cam: num_classes must lie in [1, {text.shape[0]}], got {num_classes}")
    s = minmax_tokens(surgery_similarity(feats, text))
    return s[:, 1:, :num_classes]


def cache_text_rows(class_rows: torch.Tensor, background_rows: torch.Tensor) -> torch.Tensor:
    """T21 of §3b: [mean of the background-word rows (not renormalised); the class rows] -> (C + 1, D)."""
    if background_rows.shape[0] == 0:
        raise ValueError("cache_text_rows: the static cache needs at least one background word")
    return torch.cat([background_rows.float().mean(0, keepdim=True), class_rows.float()], dim=0)


def text_weighted_values(keys: torch.Tensor, values: torch.Tensor, text_rows: torch.Tensor) -> torch.Tensor:
    """§3b step 2: W = K T21ᵀ (M, C + 1), −∞ where the one-hot value is 0, softmax over the keys (dim 0):
    every class column becomes a distribution over that class's own keys. A class without keys gets a
    zero column. Returns (M, C + 1) float32."""
    if keys.dim() != 2 or values.dim() != 2 or keys.shape[0] != values.shape[0]:
        raise ValueError(f"text_weighted_values: expected keys (M, D) and values (M, C + 1), got "
                         f"{tuple(keys.shape)} and {tuple(values.shape)}")
    if text_rows.shape != (values.shape[1], keys.shape[1]):
        raise ValueError(f"text_weighted_values: expected text rows ({values.shape[1]}, {keys.shape[1]}), got "
                         f"{tuple(text_rows.shape)}")
    w = keys.float() @ text_rows.float().T
    w = w.masked_fill(values == 0, float("-inf"))
    has = (values != 0).any(dim=0, keepdim=True)
    w = torch.where(has, w, torch.zeros_like(w)).softmax(dim=0)
    return torch.where(has, w, torch.zeros_like(w))


def cache_similarity(feats: torch.Tensor, keys: torch.Tensor, activation: str = "relu", beta: float = 1.0):
    """§3b step 1: the surgery similarity to the keys with the code's ReLU (``activation="relu"``), or the
    paper's Tip-Adapter activation exp(−β(1 − s)) (``"exp"``). (B, 1 + N, M)."""
    s = surgery_similarity(feats, keys)
    if activation == "relu":
        return s.clamp_min(0)
    if activation == "exp":
        return torch.exp(-float(beta) * (1.0 - s))
    raise ValueError(f"cache activation must be 'relu' or 'exp', got {activation!r}")


def static_cache_cam(feats: torch.Tensor, keys: torch.Tensor, text_weights: torch.Tensor, activation: str = "relu",
                     beta: float = 1.0) -> torch.Tensor:
    """§3b steps 1-4: R = S[:, 1:] @ W, min-max per class; cache CAM = minmax(relu(fg · (1 − bg))) with
    bg = column 0. Returns (B, N, C) in [0, 1]."""
    s = cache_similarity(feats, keys, activation, beta)
    r = minmax_tokens(s[:, 1:] @ text_weights.float())
    fg, bg = r[..., 1:], r[..., :1]
    return minmax_tokens((fg * (1 - bg)).clamp_min(0))


def combine_cams(cam_pt: torch.Tensor, extra: torch.Tensor | None, weight: float) -> torch.Tensor:
    """minmax(cam_pt + weight · extra) over the tokens (static: weight 0.5 with the cache CAM; dynamic:
    0.1 with relu of the adapter's foreground logits). ``extra=None`` returns cam_pt."""
    if extra is None:
        return cam_pt
    if extra.shape != cam_pt.shape:
        raise ValueError(f"combine_cams: the extra CAM {tuple(extra.shape)} does not match cam_pt "
                         f"{tuple(cam_pt.shape)}")
    return minmax_tokens(cam_pt + float(weight) * extra)
