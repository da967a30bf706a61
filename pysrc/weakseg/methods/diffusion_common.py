"""Pieces the Stable-Diffusion attention methods (iSeg, DiffSegmenter) share: building a prompt
from class names while keeping track of where every class's tokens land, fusing per-resolution
cross-attention maps into one grid, and reading per-class maps out of the token maps.

Token positions follow the text encoder's input: position 0 is the start-of-text token, so in
``"a photograph of dog and cat"`` the prefix takes positions 1-3 and ``dog`` is at 4 (iSeg's "first
class starts at 4"). Names may be several words and every word may be several BPE tokens; the
bookkeeping counts real tokens (``tokenizer(piece, add_special_tokens=False)``) and checks the result
against the tokenized prompt, so multi-token names never shift the classes after them.

specs/diffsegmenter_iseg.md §1 (prompts, token indices) and §2 (fusion across resolutions).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F

__all__ = ["ClassPrompt", "count_tokens", "build_class_prompt", "normalize_token_maps", "fuse_cross_attention",
           "select_token_maps"]

NORMS = ("sum", "minmax", "none")
ORDERS = ("norm-resize", "resize-norm")


@dataclass(frozen=True)
class ClassPrompt:
    """A prompt and where its classes are.

    text: the prompt. names: the class names as written in it. class_tokens: per class, the
    positions (in the tokenized prompt, 0 = start-of-text) of all of its tokens. selected: per class,
    the positions whose maps stand for the class (a subset of ``class_tokens``, see ``select_words``
    of :func:`build_class_prompt`).
    """

    text: str
    names: tuple[str, ...]
    class_tokens: tuple[tuple[int, ...], ...]
    selected: tuple[tuple[int, ...], ...]

    @property
    def selected_flat(self) -> list[int]:
        """Every selected position once, sorted (iSeg re-weights these embedding rows by γ)."""
        return sorted({i for sel in self.selected for i in sel})


def count_tokens(tokenizer, text: str) -> int:
    """Number of BPE tokens of ``text`` without the start/end tokens."""
    return len(tokenizer(text, add_special_tokens=False).input_ids) if text.strip() else 0


def build_class_prompt(tokenizer, names: Sequence[str], *, prefix: str = "a photograph of ", joiner: str = " and ",
                       suffix: str = "", select_words: Mapping[str, Sequence[int]] | None = None,
                       max_length: int | None = None) -> ClassPrompt:
    """``prefix + joiner.join(names) + suffix`` with per-class token positions.

    ``prefix`` and ``joiner`` must end / start at word boundaries (spaces), so BPE does not merge
    across pieces (checked against the tokenized prompt; a mismatch raises). ``select_words``: name ->
    indices of the words (``name.split()``) whose tokens give the class map (iSeg: ``"potted plant"``
    -> [1], the tokens of "plant"); names not listed use all their tokens. Every class token must fit
    before the end-of-text token of a ``max_length`` sequence (default: the tokenizer's
    ``model_max_length``, 77), else ValueError naming the classes that were cut.
    """
    names = [str(n) for n in names]
    for n in names:
        if not n.strip():
            raise ValueError(f"build_class_prompt: class names must be non-empty, got {names!r}")
    select_words = dict(select_words or {})
    max_length = int(max_length or tokenizer.model_max_length)
    text = prefix + joiner.join(names) + suffix
    pos = 1 + count_tokens(tokenizer, prefix)
    n_join = count_tokens(tokenizer, joiner)
    class_tokens, selected = [], []
    for i, name in enumerate(names):
        words = name.split()
        counts = [count_tokens(tokenizer, w) for w in words]
        start = pos
        toks = tuple(range(start, start + sum(counts)))
        chosen = select_words.get(name)
        if chosen is None:
            sel = toks
        else:
            chosen = [int(w) for w in chosen]
            bad = [w for w in chosen if not -len(words) <= w < len(words)]
            if bad or not chosen:
                raise ValueError(f"build_class_prompt: select_words[{name!r}] = {list(select_words[name])} must be "
                                 f"non-empty word indices into {words}")
            offsets = [sum(counts[:w]) for w in range(len(words))]
            sel = tuple(sorted({start + offsets[w] + j for w in chosen for j in range(counts[w])}))
        class_tokens.append(toks)
        selected.append(sel)
        pos = start + len(toks) + (n_join if i + 1 < len(names) else 0)
    cut = [n for n, toks in zip(names, class_tokens) if toks and toks[-1] >= max_length - 1]
    if cut:
        raise ValueError(f"build_class_prompt: the prompt is longer than the text encoder's {max_length} tokens and "
                         f"cuts the class(es) {cut}: {text!r}; use fewer candidate classes or a shorter prompt")
    ids = tokenizer(text, add_special_tokens=True).input_ids
    for name, toks in zip(names, class_tokens):
        want = tokenizer(name, add_special_tokens=False).input_ids
        if [ids[i] if i < len(ids) else None for i in toks] != want:
            raise ValueError(f"build_class_prompt: class {name!r} is not at token positions {list(toks)} of {text!r} "
                             f"(BPE merged across pieces; prefix and joiner must end and start at word boundaries)")
    return ClassPrompt(text, tuple(names), tuple(class_tokens), tuple(selected))


def normalize_token_maps(maps: torch.Tensor, mode: str = "sum", eps: float = 0.0) -> torch.Tensor:
    """(B, T, h, w) -> each (b, t) map normalised over its pixels: "sum" divides by the sum (iSeg),
    "minmax" maps to [0, 1] (DiffSegmenter), "none" returns the maps. ``eps`` is added to the
    denominator (0: a zero map gives NaN for "sum", as the reference code would). "minmax" is
    :func:`weakseg.methods.common.minmax_per_class` (no eps; a range at the rounding level of the values
    gives 0)."""
    if mode not in NORMS:
        raise ValueError(f"normalize_token_maps: mode must be one of {', '.join(NORMS)}, got {mode!r}")
    if maps.dim() < 3:
        raise ValueError(f"normalize_token_maps: expected maps (..., h, w), got {tuple(maps.shape)}")
    if mode == "none":
        return maps
    flat = maps.flatten(-2)
    if mode == "sum":
        return (flat / (flat.sum(-1, keepdim=True) + eps)).view_as(maps)
    from weakseg.methods.common import minmax_per_class

    return minmax_per_class(flat.reshape(1, -1, flat.shape[-1]), eps).view_as(maps)


def fuse_cross_attention(maps: Mapping[object, torch.Tensor], weights: Mapping[object, float],
                         size: tuple[int, int], norm: str = "sum", order: str = "norm-resize") -> torch.Tensor:
    """Weighted sum of per-resolution token maps on one grid.

    maps: key (e.g. the resolution 16, 32) -> (B, T, h, w) head-averaged cross-attention maps (one
    column per text token). weights: key -> weight; keys with weight 0 or missing are skipped.
    Each map is normalised per token (``norm``, see :func:`normalize_token_maps`) and bilinearly
    resized to ``size`` (align_corners=False): ``order="norm-resize"`` normalises first (iSeg: sum 1
    per token, then upsample, weights {16: 0.7, 32: 0.3}); ``"resize-norm"`` upsamples first
    (DiffSegmenter: upsample to 64x64, min-max, weights [0.3, 0.5, 0.1, 0.1] for 8/16/32/64).
    Returns (B, T, *size) float32.
    """
    if order not in ORDERS:
        raise ValueError(f"fuse_cross_attention: order must be one of {', '.join(ORDERS)}, got {order!r}")
    used = [k for k in maps if float(weights.get(k, 0.0)) != 0.0]
    if not used:
        raise ValueError(f"fuse_cross_attention: no map has a non-zero weight (maps {list(maps)}, weights "
                         f"{dict(weights)})")
    shapes = {tuple(maps[k].shape[:2]) for k in used}
    if len(shapes) != 1 or any(maps[k].dim() != 4 for k in used):
        raise ValueError(f"fuse_cross_attention: expected (B, T, h, w) maps agreeing on B and T, got "
                         f"{ {k: tuple(maps[k].shape) for k in used} }")
    size = (int(size[0]), int(size[1]))
    out = None
    for k in used:
        m = maps[k].float()
        if order == "norm-resize":
            m = normalize_token_maps(m, norm)
        if tuple(m.shape[-2:]) != size:
            m = F.interpolate(m, size=size, mode="bilinear", align_corners=False)
        if order == "resize-norm":
            m = normalize_token_maps(m, norm)
        m = float(weights[k]) * m
        out = m if out is None else out + m
    return out


def select_token_maps(maps: torch.Tensor, selections: Sequence[Sequence[Sequence[int]]]) -> torch.Tensor:
    """Per-class maps from token maps: class j of item b is the mean of the token columns
    ``selections[b][j]``.

    maps: (B, T, ...) (token axis 1). selections: one list of classes per batch item, each a list of
    token positions. Items with fewer classes than the largest are padded with zero maps. Returns
    (B, K_max, ...) in maps' dtype.
    """
    if maps.dim() < 2:
        raise ValueError(f"select_token_maps: expected maps (B, T, ...), got {tuple(maps.shape)}")
    B, T = maps.shape[:2]
    if len(selections) != B:
        raise ValueError(f"select_token_maps: {len(selections)} selection lists for a batch of {B}")
    K = max((len(s) for s in selections), default=0)
    out = maps.new_zeros((B, K) + tuple(maps.shape[2:]))
    for b, classes in enumerate(selections):
        for j, idx in enumerate(classes):
            idx = [int(i) for i in idx]
            if not idx or min(idx) < -T or max(idx) >= T:
                raise IndexError(f"select_token_maps: token positions {idx} of class {j} (item {b}) must be a "
                                 f"non-empty list within [0, {T})")
            out[b, j] = maps[b, idx].mean(0)
    return out
