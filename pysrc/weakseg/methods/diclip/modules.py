"""DiCLIP's trained parts and their losses (docs/specs/diclip.md §3c, §5): the dynamic key-value adapter,
the segmentation head over frozen CLIP layers, the class-balanced CE and the affinity loss.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from weakseg.core import is_int

__all__ = ["KVAdapter", "SegHead", "balanced_seg_loss", "affinity_loss", "affinity_labels", "radius_mask"]


class KVAdapter(nn.Module):
    """The dynamic adapter: ``fc1`` Linear(D -> M + P), ReLU, Dropout, ``fc2`` Linear(M + P -> C + 1), Dropout.

    Initialisation (the code): rows 0..M−1 of ``fc1.weight`` are the cache keys, the P prompt rows
    trunc-normal (std 1, cut at ±2); ``fc2.weight`` = [one-hot values; trunc-normal]ᵀ; biases keep
    PyTorch's default init. Paper variants: ``zero_bias=True`` (biases 0) and ``fc2_values`` (e.g. the
    text-weighted values) in place of the one-hot values. ``seed`` makes the random parts deterministic
    without touching the global RNG."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, prompts: int = 92, dropout: float = 0.1,
                 zero_bias: bool = False, fc2_values: torch.Tensor | None = None, seed: int | None = 0):
        super().__init__()
        if keys.dim() != 2 or values.dim() != 2 or keys.shape[0] != values.shape[0]:
            raise ValueError(f"KVAdapter: expected keys (M, D) and values (M, C + 1), got {tuple(keys.shape)} and "
                             f"{tuple(values.shape)}")
        if not is_int(prompts, 0):
            raise ValueError(f"KVAdapter: prompts must be an int >= 0, got {prompts!r}")
        M, D = keys.shape
        C1 = values.shape[1]
        self.num_keys, self.num_prompts = M, prompts
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
            self.fc1 = nn.Linear(D, M + prompts)
            self.fc2 = nn.Linear(M + prompts, C1)
            extra1 = nn.init.trunc_normal_(torch.empty(prompts, D), std=1.0)
            extra2 = nn.init.trunc_normal_(torch.empty(prompts, C1), std=1.0)
        v = values if fc2_values is None else fc2_values
        if v.shape != values.shape:
            raise ValueError(f"KVAdapter: fc2_values {tuple(v.shape)} must match values {tuple(values.shape)}")
        with torch.no_grad():
            self.fc1.weight.copy_(torch.cat([keys.float(), extra1]))
            self.fc2.weight.copy_(torch.cat([v.float(), extra2]).T)
            if zero_bias:
                self.fc1.bias.zero_()
                self.fc2.bias.zero_()
        self.drop = nn.Dropout(dropout)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, N, D) -> logits (B, N, C + 1) (column 0 = background)."""
        return self.drop(self.fc2(self.drop(F.relu(self.fc1(tokens)))))


class _QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class _Block(nn.Module):
    """Pre-LN transformer block: x + attn(ln(x)); x + mlp(ln(x)) with a 4x QuickGELU MLP."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict(c_fc=nn.Linear(width, 4 * width), gelu=_QuickGELU(),
                                             c_proj=nn.Linear(4 * width, width)))

    def forward(self, x):
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class SegHead(nn.Module):
    """The segmentation head over L frozen CLIP layers (WeCLIP/ExCEL's segformer head + TransDecoder):
    per layer an MLP (width -> dim, ReLU, dim -> dim), concatenated (L·dim), a 1x1 conv to ``dim``,
    Dropout2d, ``blocks`` pre-LN transformer blocks (``heads`` heads, MLP 4x, QuickGELU), a 1x1 conv to
    ``num_classes`` logits on the patch grid. ``forward`` also returns ``attn_pred`` (B, P, P) =
    sigmoid(3 · (cos-affinity of the fused features − its mean per image))."""

    def __init__(self, in_width: int, num_layers: int, num_classes: int, dim: int = 256, blocks: int = 3,
                 heads: int = 8, dropout: float = 0.1, seed: int | None = 0):
        super().__init__()
        if dim % heads:
            raise ValueError(f"SegHead: dim={dim} must be a multiple of heads={heads}")
        self.num_layers, self.num_classes = int(num_layers), int(num_classes)
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
            self.mlps = nn.ModuleList(nn.Sequential(nn.Linear(in_width, dim), nn.ReLU(), nn.Linear(dim, dim))
                                      for _ in range(num_layers))
            self.fuse = nn.Conv2d(dim * num_layers, dim, 1)
            self.dropout = nn.Dropout2d(dropout)
            self.blocks = nn.ModuleList(_Block(dim, heads) for _ in range(blocks))
            self.classifier = nn.Conv2d(dim, num_classes, 1)

    def forward(self, layers, grid: tuple[int, int]):
        """layers: L tensors (B, N, width) (patch tokens, CLS dropped) or (B, 1 + N, width) (CLS dropped
        here). Returns (logits (B, C, h, w), attn_pred (B, N, N))."""
        if len(layers) != self.num_layers:
            raise ValueError(f"SegHead: expected {self.num_layers} layers, got {len(layers)}")
        h, w = grid
        feats = []
        for mlp, x in zip(self.mlps, layers):
            if x.shape[1] == h * w + 1:
                x = x[:, 1:]
            feats.append(mlp(x.float()))
        x = torch.cat(feats, dim=-1)  # (B, N, L·dim)
        B, N, _ = x.shape
        x = x.transpose(1, 2).reshape(B, -1, h, w)
        x = self.dropout(self.fuse(x))
        t = x.flatten(2).transpose(1, 2)
        for blk in self.blocks:
            t = blk(t)
        f = F.normalize(t, dim=-1)
        aff = f @ f.transpose(1, 2)
        attn_pred = torch.sigmoid(3.0 * (aff - aff.mean(dim=(1, 2), keepdim=True)))
        logits = self.classifier(t.transpose(1, 2).reshape(B, -1, h, w))
        return logits, attn_pred


def _ce_or_zero(logits: torch.Tensor, target: torch.Tensor, ignore_index: int) -> torch.Tensor:
    if not (target != ignore_index).any():
        return logits.sum() * 0.0
    return F.cross_entropy(logits, target, ignore_index=ignore_index)


def balanced_seg_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
    """ExCEL/WeCLIP ``get_seg_loss``: 0.5 · (CE averaged over the background pixels + CE averaged over the
    foreground pixels), 255 ignored. logits (B, C, H, W), labels (B, H, W) at the same size. A part
    without pixels contributes 0 (the code would give NaN)."""
    if logits.shape[-2:] != labels.shape[-2:]:
        logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
    labels = labels.long()
    bg = torch.where(labels == 0, labels, torch.full_like(labels, ignore_index))
    fg = torch.where((labels != 0) & (labels != ignore_index), labels, torch.full_like(labels, ignore_index))
    return 0.5 * (_ce_or_zero(logits, bg, ignore_index) + _ce_or_zero(logits, fg, ignore_index))


def radius_mask(h: int, w: int, radius: int = 8) -> torch.Tensor:
    """(hw, hw) bool: token pairs within ``radius`` along both axes (a square window)."""
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    return ((ys[:, None] - ys[None]).abs() <= radius) & ((xs[:, None] - xs[None]).abs() <= radius)


def affinity_labels(labels: torch.Tensor, grid: tuple[int, int], radius: int = 8, ignore_index: int = 255):
    """Pseudo labels (B, H, W) -> pair labels (B, P, P): nearest-downsampled to ``grid``; 1 for the same
    label, 0 otherwise; 255 for pairs touching an ignored token, the diagonal, and pairs beyond ``radius``."""
    small = F.interpolate(labels[:, None].float(), size=grid, mode="nearest")[:, 0].long().flatten(1)
    aff = (small[:, :, None] == small[:, None, :]).long()
    ign = (small == ignore_index)
    aff = aff.masked_fill(ign[:, :, None] | ign[:, None, :], ignore_index)
    P = small.shape[1]
    aff[:, torch.arange(P), torch.arange(P)] = ignore_index
    far = ~radius_mask(grid[0], grid[1], radius).to(labels.device)
    return aff.masked_fill(far[None], ignore_index)


def affinity_loss(attn_pred: torch.Tensor, aff_labels: torch.Tensor) -> torch.Tensor:
    """0.5 · Σ_pos (1 − p) / (n_pos + 1) + 0.5 · Σ_neg p / (n_neg + 1) (the code's +1 counts)."""
    pos = (aff_labels == 1).to(attn_pred.dtype)
    neg = (aff_labels == 0).to(attn_pred.dtype)
    return 0.5 * (pos * (1 - attn_pred)).sum() / (pos.sum() + 1) + 0.5 * (neg * attn_pred).sum() / (neg.sum() + 1)
