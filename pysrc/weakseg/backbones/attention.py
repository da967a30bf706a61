"""Attention capture for diffusers UNets: record what the segmentation methods read, nothing more.

A :class:`LayerCapture` names some attention layers of a ``UNet2DConditionModel`` (by the names of
``unet.attn_processors``, with or without the trailing ``.processor``; a ``*?[`` glob; or ``re:<regex>``,
matched in full) and says what to keep of each:

- ``store="probs"``: the attention probabilities of the selected heads, (B, h_sel, P, T) float32, where
  P = query tokens (the latent grid, row-major) and T = key tokens (77 text tokens for cross-attention,
  P for self-attention). Rows sum to 1. The latest UNet call wins.
- ``store="qk"``: only the query and key of the selected heads after the head split, each
  (B, h_sel, P, d) in the model's dtype, plus the scale d^-1/2: ``softmax(q kᵀ · scale)`` are the probs.
  No probability matrix is formed (iSeg/DiCLIP's refinement recomputes it; ``refine_propagate_qk``).
  The latest UNet call wins.
- ``store="mean"``: a running mean over the selected heads, kept in ONE float32 buffer (B, P, T) per
  layer (``group="layer"``) or per (kind, resolution) shared by every layer of that resolution that the
  capture matches (``group="resolution"``, DiffSegmenter's per-resolution averaging). The buffer is
  updated in place head by head, so a capture of 5 layers x 8 heads at 64x64 holds one 4096x4096 map,
  not 40. Every (layer, head) map counts once; the mean also runs over repeated UNet calls until
  :meth:`AttentionStore.reset`.

Probabilities are ``softmax(q kᵀ · d^-1/2)`` computed in float32 (the scale scaled-dot-product attention
uses); an attention mask, if the UNet passes one, is applied as the default processor applies it. The
layer's output is computed exactly as diffusers' default ``AttnProcessor2_0`` computes it (scaled dot-product
attention), so a capture never changes the UNet's result — unless the spec sets ``reuse=True`` (store
"probs" or "mean" of every head, cond_only False): then the output is ``probs @ v`` from the recorded
float32 probabilities, equal to SDPA up to float rounding, and every map is formed once per layer (as in
the references' processors) instead of once for the output and once for the record. ``cond_only=True``
keeps only the second half of the batch (the conditional half of a classifier-free-guidance batch
``[uncond, cond]``).

Kinds: layers named ``...attn1`` are self-attention, ``...attn2`` cross-attention.

Install with :func:`install_capture` (a context manager that puts :class:`CaptureProcessor` on the
matched layers only and restores the original processors on exit), usually through
``StableDiffusionBackbone.capture``.
"""

from __future__ import annotations

import fnmatch
import math
import re
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F

__all__ = ["LayerCapture", "CaptureProcessor", "AttentionStore", "install_capture", "resolve_layers",
           "attention_layer_info", "STORES", "GROUPS"]

STORES = ("probs", "qk", "mean")
GROUPS = ("layer", "resolution")
_PROC_SUFFIX = ".processor"


@dataclass(frozen=True)
class LayerCapture:
    """What to record from the layers matched by ``layers`` (see the module docstring)."""

    layers: str | tuple[str, ...]
    store: str = "probs"
    heads: tuple[int, ...] | None = None
    group: str = "layer"
    cond_only: bool = False
    reuse: bool = False

    def __post_init__(self) -> None:
        layers = (self.layers,) if isinstance(self.layers, str) else tuple(self.layers)
        if not layers or not all(isinstance(p, str) and p for p in layers):
            raise ValueError("LayerCapture: layers must be a non-empty string or sequence of strings, "
                             f"got {self.layers!r}")
        object.__setattr__(self, "layers", layers)
        if self.store not in STORES:
            raise ValueError(f"LayerCapture: store must be one of {', '.join(STORES)}, got {self.store!r}")
        if self.group not in GROUPS:
            raise ValueError(f"LayerCapture: group must be one of {', '.join(GROUPS)}, got {self.group!r}")
        if self.reuse and (self.store == "qk" or self.heads is not None or self.cond_only):
            raise ValueError(f"LayerCapture: reuse=True computes the layer output from the recorded probabilities, "
                             f"so it needs store 'probs' or 'mean' of every head (heads=None) and cond_only=False; "
                             f"got store={self.store!r}, heads={self.heads!r}, cond_only={self.cond_only}")
        if self.group == "resolution" and self.store != "mean":
            raise ValueError(f"LayerCapture: group='resolution' needs store='mean', got store={self.store!r}")
        if self.heads is not None:
            heads = tuple(int(h) for h in self.heads)
            if not heads or len(set(heads)) != len(heads) or min(heads) < 0:
                raise ValueError(f"LayerCapture: heads must be distinct non-negative head indices, got {self.heads!r}")
            object.__setattr__(self, "heads", heads)

    @classmethod
    def coerce(cls, spec: "LayerCapture | Mapping[str, Any] | str") -> list["LayerCapture"]:
        """A LayerCapture; a pattern string (store probs, all heads); or a mapping
        ``{pattern: {"store": ..., "heads": ...}}`` (one LayerCapture per key)."""
        if isinstance(spec, LayerCapture):
            return [spec]
        if isinstance(spec, str):
            return [cls(spec)]
        if isinstance(spec, Mapping):
            out = []
            for pattern, opts in spec.items():
                if not isinstance(opts, Mapping):
                    raise TypeError(f"capture spec {pattern!r}: expected a mapping of options "
                                    f"(store, heads, group, cond_only, reuse), got {type(opts).__name__}")
                out.append(cls(pattern, **dict(opts)))
            return out
        raise TypeError(f"capture spec: expected a LayerCapture, a layer pattern string or a mapping "
                        f"{{pattern: options}}, got {type(spec).__name__}")


@dataclass(frozen=True)
class _LayerInfo:
    name: str
    kind: str  # "self" | "cross"
    heads: int


def _strip(name: str) -> str:
    return name[: -len(_PROC_SUFFIX)] if name.endswith(_PROC_SUFFIX) else name


def attention_layer_info(unet: torch.nn.Module) -> dict[str, _LayerInfo]:
    """Name (without ``.processor``) -> kind and head count, for every attention layer of ``unet``."""
    out = {}
    for full in unet.attn_processors:
        name = _strip(full)
        module = unet.get_submodule(name)
        if name.endswith("attn1"):
            kind = "self"
        elif name.endswith("attn2"):
            kind = "cross"
        else:
            kind = "cross" if getattr(module, "is_cross_attention", False) else "self"
        out[name] = _LayerInfo(name, kind, int(module.heads))
    return out


def _match(pattern: str, names: Sequence[str]) -> list[str]:
    if pattern.startswith("re:"):
        rx = re.compile(pattern[3:])
        return [n for n in names if rx.fullmatch(n)]
    pat = _strip(pattern)
    if any(c in pat for c in "*?["):
        return [n for n in names if fnmatch.fnmatchcase(n, pat)]
    return [n for n in names if n == pat]


def resolve_layers(specs: Sequence[LayerCapture], info: Mapping[str, _LayerInfo]) -> dict[str, LayerCapture]:
    """Layer name -> the spec that captures it. Every pattern must match at least one layer, no layer
    may be matched by two specs, and head indices must exist in every matched layer."""
    names = list(info)
    out: dict[str, LayerCapture] = {}
    for spec in specs:
        for pattern in spec.layers:
            hits = _match(pattern, names)
            if not hits:
                sample = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
                raise ValueError(f"capture: layer pattern {pattern!r} matches no attention layer of the UNet "
                                 f"(names like {sample}; globs with * or 're:<regex>' are accepted)")
            for n in hits:
                if n in out and out[n] is not spec:
                    raise ValueError(f"capture: layer {n!r} is matched by two capture specs ({out[n]} and {spec})")
                if spec.heads is not None and max(spec.heads) >= info[n].heads:
                    raise ValueError(f"capture: heads {list(spec.heads)} out of range for layer {n!r}, "
                                     f"which has {info[n].heads} heads")
                out[n] = spec
    return out


def _grid(tokens: int, latent_hw: tuple[int, int] | None) -> tuple[int, int]:
    """(h, w) of a layer with ``tokens`` query tokens: the latent grid halved (rounding up, as the
    UNet's stride-2 convolutions do) until it has that many cells; a square grid if the latent size is
    unknown; (tokens, 1) if neither fits."""
    if latent_hw is not None:
        h, w = latent_hw
        while h * w > tokens:
            h, w = (h + 1) // 2, (w + 1) // 2
        if h * w == tokens:
            return h, w
    r = math.isqrt(tokens)
    return (r, r) if r * r == tokens else (tokens, 1)


def _softmax_rows_(scores: torch.Tensor) -> torch.Tensor:
    """In-place float32 row softmax (no second P x T temporary)."""
    scores.sub_(scores.amax(dim=-1, keepdim=True))
    scores.exp_()
    scores.div_(scores.sum(dim=-1, keepdim=True))
    return scores


class AttentionStore:
    """What a capture recorded. Created by :func:`install_capture`; read it after the UNet call(s).

    - ``probs(name)`` -> (B, h_sel, P, T) float32 (store="probs");
    - ``qk(name)`` -> (q, k), each (B, h_sel, P, d) (store="qk"); ``scale(name)`` -> d^-1/2;
    - ``mean(name)`` -> (B, P, T) float32 running head mean (store="mean", group="layer");
    - ``resolution_mean(kind, res)`` -> (B, P, T) float32 (store="mean", group="resolution"); ``res`` is
      the grid side (int, square) or (h, w); ``resolutions(kind)`` lists the grids recorded;
    - ``count(key)``: how many (layer, head) maps a mean holds; ``grid(name)``: the layer's (h, w);
    - ``stored_bytes()``: bytes held by every recorded tensor; ``reset()`` drops everything.
    """

    #: store="mean": after the first head, maps are formed in row blocks of at most this many bytes
    MEAN_BLOCK_BYTES = 16 << 20

    def __init__(self, plan: Mapping[str, LayerCapture], info: Mapping[str, _LayerInfo]):
        self.plan = dict(plan)
        self.info = {n: info[n] for n in self.plan}
        self.latent_hw: tuple[int, int] | None = None
        self._probs: dict[str, torch.Tensor] = {}
        self._qk: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._scale: dict[str, float] = {}
        self._means: dict[Any, torch.Tensor] = {}
        self._counts: dict[Any, int] = {}
        self._grids: dict[str, tuple[int, int]] = {}

    @property
    def layers(self) -> list[str]:
        return list(self.plan)

    def reset(self) -> None:
        self._probs.clear(), self._qk.clear(), self._means.clear(), self._counts.clear(), self._grids.clear()

    # ------------------------------------------------------------------ recording (called by processors)
    def attend(self, name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               mask: torch.Tensor | None = None) -> torch.Tensor:
        """Record layer ``name`` from its head-split (B, H, P, d) q, k, v and return its attention output
        (B, H, P, d_v) in q's dtype: ``probs @ v`` from the recorded probabilities when the spec says
        ``reuse`` (module docstring), else ``scaled_dot_product_attention``."""
        out = self._record(name, q, k, mask, v)
        if out is None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=False)
        return out

    def _record(self, name: str, q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None,
                v: torch.Tensor | None = None) -> torch.Tensor | None:
        spec = self.plan[name]
        reuse = spec.reuse and v is not None  # the output from the probabilities (every head and item)
        if spec.cond_only:
            if q.shape[0] % 2:
                raise ValueError(f"capture of {name!r}: cond_only=True needs an even batch [uncond, cond], "
                                 f"got batch {q.shape[0]}")
            half = q.shape[0] // 2
            q, k = q[half:], k[half:]
            if mask is not None and mask.shape[0] == 2 * half:
                mask = mask[half:]
        heads = spec.heads
        if heads is not None:
            idx = torch.tensor(heads, device=q.device)
            q, k = q.index_select(1, idx), k.index_select(1, idx)
            if mask is not None and mask.shape[1] > 1:
                mask = mask.index_select(1, idx)
        grid = _grid(q.shape[2], self.latent_hw)
        self._grids[name] = grid
        scale = q.shape[-1] ** -0.5  # what scaled_dot_product_attention applies by default
        self._scale[name] = scale
        if spec.store == "qk":
            self._qk[name] = (q.contiguous(), k.contiguous())
            return None
        if spec.store == "probs":
            probs = self._probs[name] = self._probs_of(q, k, scale, mask)
            return torch.matmul(probs, v.float()).to(q.dtype) if reuse else None
        key = name if spec.group == "layer" else (self.info[name].kind, grid)
        buf = self._means.get(key)
        B, P, T = q.shape[0], q.shape[2], k.shape[2]
        if buf is not None and buf.shape != (B, P, T):
            raise ValueError(f"capture of {name!r}: a running mean of shape {tuple(buf.shape)} cannot take maps of "
                             f"shape {(B, P, T)}; reset() the capture between inputs of different sizes")
        n = self._counts.get(key, 0)
        out = torch.empty((*q.shape[:3], v.shape[-1]), dtype=q.dtype, device=q.device) if reuse else None
        # once the running mean exists, each head's map is formed and added in row blocks of at most
        # MEAN_BLOCK_BYTES, so the mean is the only full (B, P, T) map held (small maps: one block)
        rows = max(1, min(P, self.MEAN_BLOCK_BYTES // max(1, 4 * B * T)))
        for h in range(q.shape[1]):
            m = None if mask is None else mask[:, min(h, mask.shape[1] - 1)]
            if buf is None:
                p = self._probs_of(q[:, h], k[:, h], scale, m)
                if out is not None:
                    out[:, h] = torch.matmul(p, v[:, h].float())
                buf = p
                self._means[key] = buf
            else:
                for r0 in range(0, P, rows):
                    r1 = min(P, r0 + rows)
                    mb = m[..., r0:r1, :] if m is not None and m.dim() >= 2 and m.shape[-2] == P else m
                    p = self._probs_of(q[:, h, r0:r1], k[:, h], scale, mb)
                    if out is not None:
                        out[:, h, r0:r1] = torch.matmul(p, v[:, h].float())
                    buf[:, r0:r1].lerp_(p, 1.0 / (n + 1))  # the running mean in one pass
                    del p
            n += 1
        self._counts[key] = n
        return out

    @staticmethod
    def _probs_of(q: torch.Tensor, k: torch.Tensor, scale: float, mask: torch.Tensor | None) -> torch.Tensor:
        scores = torch.matmul(q.float(), k.float().transpose(-1, -2)).mul_(scale)
        if mask is not None:
            if mask.dtype == torch.bool:
                scores.masked_fill_(~mask, float("-inf"))
            else:
                scores.add_(mask.float())
        return _softmax_rows_(scores)

    # ------------------------------------------------------------------ reading
    def _need(self, name: str, store: str) -> LayerCapture:
        name = _strip(name)
        if name not in self.plan:
            raise KeyError(f"layer {name!r} is not captured; captured layers: {', '.join(self.plan) or 'none'}")
        spec = self.plan[name]
        if spec.store != store:
            raise ValueError(f"layer {name!r} was captured with store={spec.store!r}, not {store!r}")
        return spec

    def _missing(self, name: str) -> KeyError:
        return KeyError(f"layer {name!r} is captured but has recorded nothing yet (run the UNet inside the capture)")

    def probs(self, name: str) -> torch.Tensor:
        self._need(name, "probs")
        try:
            return self._probs[_strip(name)]
        except KeyError:
            raise self._missing(name) from None

    def qk(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        self._need(name, "qk")
        try:
            return self._qk[_strip(name)]
        except KeyError:
            raise self._missing(name) from None

    def scale(self, name: str) -> float:
        try:
            return self._scale[_strip(name)]
        except KeyError:
            raise self._missing(name) from None

    def mean(self, name: str) -> torch.Tensor:
        spec = self._need(name, "mean")
        if spec.group != "layer":
            raise ValueError(f"layer {name!r} is averaged per resolution; read it with resolution_mean(kind, res)")
        try:
            return self._means[_strip(name)]
        except KeyError:
            raise self._missing(name) from None

    def _res_key(self, kind: str, res: int | tuple[int, int]) -> tuple[str, tuple[int, int]]:
        if kind not in ("self", "cross"):
            raise ValueError(f"kind must be 'self' or 'cross', got {kind!r}")
        grid = (int(res), int(res)) if isinstance(res, int) else tuple(int(r) for r in res)
        return kind, grid

    def resolution_mean(self, kind: str, res: int | tuple[int, int]) -> torch.Tensor:
        key = self._res_key(kind, res)
        if key not in self._means:
            have = ", ".join(f"{g[0]}x{g[1]}" for g in self.resolutions(kind)) or "none"
            raise KeyError(f"no per-resolution {kind}-attention mean at {key[1][0]}x{key[1][1]}; recorded: {have}")
        return self._means[key]

    def resolutions(self, kind: str) -> list[tuple[int, int]]:
        return sorted((k[1] for k in self._means if isinstance(k, tuple) and k[0] == kind), reverse=True)

    def count(self, key: str | tuple[str, int | tuple[int, int]]) -> int:
        """Number of (layer, head) maps in the mean of layer ``key`` or resolution ``(kind, res)``."""
        k = _strip(key) if isinstance(key, str) else self._res_key(*key)
        return self._counts.get(k, 0)

    def grid(self, name: str) -> tuple[int, int]:
        try:
            return self._grids[_strip(name)]
        except KeyError:
            raise self._missing(name) from None

    def tensors(self) -> Iterator[torch.Tensor]:
        yield from self._probs.values()
        for q, k in self._qk.values():
            yield q
            yield k
        yield from self._means.values()

    def stored_bytes(self) -> int:
        seen, total = set(), 0
        for t in self.tensors():
            st = t.untyped_storage()
            if st.data_ptr() not in seen:
                seen.add(st.data_ptr())
                total += st.nbytes()
        return total


class CaptureProcessor:
    """A diffusers attention processor that computes the layer as ``AttnProcessor2_0`` does and hands the
    head-split q, k, v to an :class:`AttentionStore` (:meth:`AttentionStore.attend`, which records and
    returns the attention output)."""

    def __init__(self, store: AttentionStore, name: str):
        if not hasattr(F, "scaled_dot_product_attention"):  # pragma: no cover - torch >= 2.0 is required
            raise ImportError("CaptureProcessor needs torch.nn.functional.scaled_dot_product_attention")
        self.store = store
        self.name = name

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 *args, **kwargs) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        hidden_states = self.store.attend(self.name, query, key, value, attention_mask)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        hidden_states = hidden_states / attn.rescale_output_factor
        return hidden_states


@contextmanager
def install_capture(unet: torch.nn.Module, specs: Sequence[LayerCapture | Mapping[str, Any] | str],
                    latent_hw: tuple[int, int] | None = None) -> Iterator[AttentionStore]:
    """Put :class:`CaptureProcessor` on the layers the specs match (every other layer keeps its
    processor) for the duration of the ``with`` block; yields the :class:`AttentionStore`. The original
    processors are restored on exit, also when the block raises."""
    coerced: list[LayerCapture] = []
    for s in specs:
        coerced.extend(LayerCapture.coerce(s))
    if not coerced:
        raise ValueError("capture: expected at least one capture spec")
    info = attention_layer_info(unet)
    plan = resolve_layers(coerced, info)
    store = AttentionStore(plan, info)
    store.latent_hw = latent_hw
    original = dict(unet.attn_processors)
    replaced = {}
    for full, proc in original.items():
        name = _strip(full)
        replaced[full] = CaptureProcessor(store, name) if name in plan else proc
    unet.set_attn_processor(dict(replaced))
    try:
        yield store
    finally:
        unet.set_attn_processor(dict(original))
