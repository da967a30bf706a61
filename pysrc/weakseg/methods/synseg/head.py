"""What SynSeg trains (docs/specs/synseg.md §1, §2): :class:`SynSegHead` (the reduce Linears, FiLM, the
decoder blocks, the upsampling head, the projector), the Feature Synergy Structure pooling
(:func:`fss_pool`) and the trained head's file (:func:`read_head_file`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from weakseg.core import read_safetensors_file
from weakseg.methods.synseg.config import MODEL_FORMAT

__all__ = ["SynSegHead", "fss_pool", "read_head_file"]


def fss_pool(logits: torch.Tensor, tokens: torch.Tensor, grid: tuple[int, int], norm: str = "mean",
             eps: float = 1e-6) -> torch.Tensor:
    """The synergy pair of each decoder row: logits (R, S, S) (or (..., S, S) with R rows in all), tokens
    (R, h·w, D) -> (R, 2, D) = [foreground; background] features. The sigmoid map is average-pooled to
    the patch grid (m), duplicated as [m; 1 − m] and multiplied with the tokens; ``norm="mean"`` divides
    by the pooled areas (+ eps), ``"hw"`` by h·w (CCAM)."""
    R, N, _ = tokens.shape
    S = logits.shape[-2:]
    m = F.adaptive_avg_pool2d(torch.sigmoid(logits.reshape(R, 1, *S)), grid).flatten(1)
    if m.shape[1] != N:
        raise ValueError(f"fss_pool: the {tuple(grid)} grid has {m.shape[1]} cells for {N} tokens")
    a = torch.stack([m, 1 - m], dim=1)  # (R, 2, N)
    sums = torch.einsum("rpn,rnd->rpd", a, tokens)
    if norm == "mean":
        return sums / (a.sum(-1, keepdim=True) + eps)
    if norm == "hw":
        return sums / N
    raise ValueError(f"norm: expected 'mean' or 'hw', got {norm!r}")


class _FiLM(nn.Module):
    def __init__(self, embed_dim: int, dim: int, kind: str):
        super().__init__()

        def make():
            if kind == "linear":
                return nn.Linear(embed_dim, dim)
            return nn.Sequential(nn.Linear(embed_dim, dim), nn.ReLU(), nn.Linear(dim, dim))

        self.mul, self.add = make(), make()

    def forward(self, a: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.mul(t)[:, None] * a + self.add(t)[:, None]


class SynSegHead(nn.Module):
    """Everything SynSeg trains: the reduce Linears, FiLM, the decoder blocks, the upsampling head and the
    projector. Inputs: the frozen ViT's block outputs (B, 1 + h·w, width) at ``extract_layers`` (in that
    order) and text embeddings (K, E) shared by the batch or (B, K, E) per image."""

    def __init__(self, width: int, embed_dim: int, grid: tuple[int, int], patch: int, *, num_layers: int = 3,
                 reduce_dim: int = 64, heads: int = 4, ffn: int = 2048, activation: str = "relu",
                 film: str = "linear", upsample: str = "simple", projector: str = "linear", seed: int = 0):
        super().__init__()
        if upsample == "complex" and patch % 4:
            raise ValueError(f"upsample='complex' needs a patch size divisible by 4, got {patch}")
        self.grid = (int(grid[0]), int(grid[1]))
        self.patch = int(patch)
        D = reduce_dim
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.reduces = nn.ModuleList([nn.Linear(width, D) for _ in range(num_layers)])
            self.film = _FiLM(embed_dim, D, film)
            self.blocks = nn.ModuleList([nn.TransformerEncoderLayer(D, heads, ffn, dropout=0.0, activation=activation,
                                                                    batch_first=True, norm_first=False)
                                         for _ in range(num_layers)])
            if upsample == "simple":
                self.upsample = nn.ConvTranspose2d(D, 1, kernel_size=patch, stride=patch)
            else:
                k = patch // 4
                self.upsample = nn.Sequential(nn.Conv2d(D, D, 3, padding=1), nn.ReLU(),
                                              nn.ConvTranspose2d(D, D // 2, 4, stride=4), nn.ReLU(),
                                              nn.ConvTranspose2d(D // 2, 1, k, stride=k))
            self.projector = (nn.Linear(D, embed_dim) if projector == "linear" else
                              nn.Sequential(nn.Linear(D, D), nn.GELU(), nn.Linear(D, embed_dim)))

    def decode(self, acts: Sequence[torch.Tensor], text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (logits (B, K, S, S), post-decoder patch tokens (B·K, h·w, D)); row b·K + k = image b, class k."""
        if len(acts) != len(self.reduces):
            raise ValueError(f"acts: expected {len(self.reduces)} layer activations, got {len(acts)}")
        B, T, _ = acts[0].shape
        if text.dim() == 2:
            text = text.unsqueeze(0).expand(B, text.shape[0], text.shape[1])
        K = text.shape[1]
        t = text.reshape(B * K, text.shape[-1]).to(acts[0].dtype)
        a = None
        for i, (h, red, blk) in enumerate(zip(reversed(list(acts)), self.reduces, self.blocks)):
            r = red(h)  # reduce before expanding to B·K rows
            r = r.unsqueeze(1).expand(B, K, T, r.shape[-1]).reshape(B * K, T, r.shape[-1])
            a = r if a is None else r + a
            if i == 0:
                a = self.film(a, t)
            a = blk(a)
        tokens = a[:, 1:]
        gh, gw = self.grid
        x = tokens.transpose(1, 2).reshape(B * K, tokens.shape[-1], gh, gw)
        logits = self.upsample(x)
        return logits.reshape(B, K, logits.shape[-2], logits.shape[-1]), tokens

    def forward(self, acts: Sequence[torch.Tensor], text: torch.Tensor, fss_norm: str = "mean",
                fss_eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training pass: (logits (B, K, S, S), fg (B, K, E), bg (B, K, E)) — FSS pooling + projector."""
        logits, tokens = self.decode(acts, text)
        B, K = logits.shape[:2]
        pair = self.projector(fss_pool(logits, tokens, self.grid, fss_norm, fss_eps))  # (B·K, 2, E)
        pair = pair.reshape(B, K, 2, pair.shape[-1])
        return logits, pair[:, :, 0], pair[:, :, 1]


def read_head_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A trained SynSeg head (safetensors) -> (weights, metadata with "arch")."""
    tensors, info = read_safetensors_file(path, (MODEL_FORMAT, "weakseg-synseg-checkpoint"), "SynSegConfig.checkpoint",
                                          "train one with `weakseg train synseg`")
    return {k: v for k, v in tensors.items() if not k.startswith(("optim.", "rng."))}, info
