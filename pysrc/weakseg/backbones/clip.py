"""CLIP on open_clip: text embeddings with prompt templates, dense patch features, per-block
attention, and DiCLIP's surgery attention with an additive (VCE) bias.

:class:`CLIPBackbone` wraps an ``open_clip`` CLIP model (a ``VisionTransformer`` image tower with
the default ``ResidualAttentionBlock`` blocks, any text tower), its tokenizer and its
normalisation mean/std. The image tower is run block by block over open_clip's own module
weights (``ln_1``, ``attn.in_proj_*`` / ``attn.out_proj``, ``ln_2``, ``mlp``, ``ls_1``/``ls_2``),
so the forward can return attention probabilities and modify attention; without modifications
it computes what ``model.encode_image`` computes.

Surgery (DiCLIP / CLIP Surgery, ``docs/specs/diclip.md`` §1, §2c), for the last ``N`` blocks:

* the *original path* ``x_ori`` runs every block unchanged (attention + MLP); it supplies the CLS
  embedding and the per-block token outputs;
* the *new path* starts as the input to the first surgery block and, in each surgery block, adds
  ``ls_1(out_proj(M @ v_h))`` computed on ``ln_1(x_ori)``; there is no MLP on the new path. Here
  ``S_h = softmax(s q_h q_hᵀ) + 2·softmax(s k_h k_hᵀ)`` (s = head_dim^-0.5), the optional bias
  ``A`` is added to the patch-patch block ``S_h[1:, 1:]`` of every head after the softmaxes (not
  renormalised), and the heads are summed into one matrix ``M = Σ_h S_h`` that every head applies
  to its own values ``v_h``;
* the dense output is ``ln_post(x_new[:, 1:]) @ proj``.

Outputs are never L2-normalised on the image side (DiCLIP's division by the norm over the token
axis is a method-level step); text embeddings always are.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from weakseg.backbones.configs import RANDOM_SEED
from weakseg.backbones.hub import hub_errors, require_hub
from weakseg.backbones.text import resolve_templates
from weakseg.core import BACKBONES, FromSpec, check_images, is_int
from weakseg.io import atomic_path, save_safetensors

__all__ = ["CLIPBackbone", "CLIPOutput", "ClassEmbeddings", "ConvStem", "interpolate_pos_embed"]

_CONFIG_NAME = "open_clip_config.json"
_WEIGHTS_NAME = "open_clip_model.safetensors"
_POS_MODES = ("bicubic", "bilinear", "nearest")


@dataclass
class CLIPOutput:
    """Result of :meth:`CLIPBackbone.forward` for B images on an h×w patch grid.

    cls: (B, D) projected image embedding of the original path (what ``encode_image`` returns at
        the native size), not normalised.
    patch: (B, h, w, D) projected dense features ``ln_post(tokens) @ proj`` of the last layer — of
        the original path when ``surgery_layers == 0``, of the surgery (new) path otherwise; not
        normalised.
    grid: (h, w).
    attn: when ``return_attn``: per block, (B, heads, 1+hw, 1+hw) softmax probabilities of the
        original path (rows = queries, each row sums to 1); index 0 is the CLS token. Else None.
    surgery_attn: when ``return_attn`` and ``surgery_layers > 0``: per surgery block (in order), the
        head-summed surgery matrix M (B, 1+hw, 1+hw), bias included (rows sum to 3·heads without a
        bias). Else None.
    layers: when ``return_layers``: per block, (B, 1+hw, width) raw token outputs of the original
        path (before ``ln_post``). Else None.
    """

    cls: torch.Tensor
    patch: torch.Tensor
    grid: tuple[int, int]
    attn: list[torch.Tensor] | None = None
    surgery_attn: list[torch.Tensor] | None = None
    layers: list[torch.Tensor] | None = None


@dataclass
class ClassEmbeddings:
    """Text embeddings of C classes followed by G background words.

    embeddings: (C + G, D) L2-normalised rows, classes first, then background words.
    names: the C + G names (a synonym group is reported as given).
    is_background: (C + G,) bool, True for the background-word rows.
    """

    embeddings: torch.Tensor
    names: list[str]
    is_background: torch.Tensor

    @property
    def num_classes(self) -> int:
        """C, the number of (foreground) class rows."""
        return int((~self.is_background).sum())

    @property
    def num_background(self) -> int:
        """G, the number of background-word rows."""
        return int(self.is_background.sum())

    @property
    def classes(self) -> torch.Tensor:
        """(C, D) the class rows."""
        return self.embeddings[~self.is_background]

    @property
    def background(self) -> torch.Tensor:
        """(G, D) the background-word rows."""
        return self.embeddings[self.is_background]


def interpolate_pos_embed(pos: torch.Tensor, grid_hw: tuple[int, int], mode: str = "bicubic",
                          src_grid: tuple[int, int] | None = None) -> torch.Tensor:
    """Resize a ViT position embedding to a new patch grid.

    pos: (1 + gh·gw, width), the CLS position first, patches in row-major order on the source grid
    ``src_grid`` (default: square, gh = gw = sqrt(#patches)). grid_hw: the target (h, w).
    mode: ``"bicubic"`` (open_clip's own choice when it resizes checkpoints), ``"bilinear"``
    (DiCLIP / CLIP Surgery) or ``"nearest"``; ``align_corners=False``, no antialiasing.
    Returns (1 + h·w, width) in ``pos``'s dtype; ``pos`` itself when the grid is unchanged. The CLS
    position is kept as is.
    """
    if not isinstance(pos, torch.Tensor) or pos.dim() != 2 or pos.shape[0] < 2:
        shape = tuple(pos.shape) if isinstance(pos, torch.Tensor) else type(pos).__name__
        raise ValueError(f"interpolate_pos_embed: expected pos of shape (1 + patches, width), got {shape}")
    if mode not in _POS_MODES:
        raise ValueError(f"interpolate_pos_embed: mode must be one of {_POS_MODES}, got {mode!r}")
    h, w = _pair(grid_hw, "grid_hw")
    n = pos.shape[0] - 1
    if src_grid is None:
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(f"interpolate_pos_embed: {n} source patches are not a square grid; pass src_grid=(gh, gw)")
        src_grid = (side, side)
    gh, gw = _pair(src_grid, "src_grid")
    if gh * gw != n:
        raise ValueError(f"interpolate_pos_embed: src_grid {gh}x{gw} does not match the {n} patch positions of pos")
    if (gh, gw) == (h, w):
        return pos
    grid = pos[1:].float().reshape(1, gh, gw, -1).permute(0, 3, 1, 2)
    kw = {} if mode == "nearest" else {"align_corners": False}
    grid = F.interpolate(grid, size=(h, w), mode=mode, **kw)
    grid = grid.permute(0, 2, 3, 1).reshape(h * w, -1).to(pos.dtype)
    return torch.cat([pos[:1], grid], dim=0)


def _pair(value, name: str) -> tuple[int, int]:
    items = (value, value) if isinstance(value, int) else value
    ok = isinstance(items, (tuple, list)) and len(items) == 2
    ok = ok and all(is_int(v, 1) for v in items)
    if not ok:
        raise ValueError(f"{name}: expected a positive int or a pair of positive ints (h, w), got {value!r}")
    return int(items[0]), int(items[1])


def split_names(entry, synonym_sep: str | None, what: str) -> tuple[str, list[str]]:
    """A class entry -> (display name, list of synonyms to average)."""
    if isinstance(entry, str):
        parts = [entry] if synonym_sep is None else [p.strip() for p in entry.split(synonym_sep)]
        parts = [p for p in parts if p]
        name = entry
    elif isinstance(entry, Sequence) and entry and all(isinstance(p, str) for p in entry):
        parts = [p.strip() for p in entry if p.strip()]
        name = ",".join(parts)
    else:
        raise TypeError(f"{what}: expected a name string or a non-empty list of synonym strings, got {entry!r}")
    if not parts:
        raise ValueError(f"{what}: empty class name {entry!r}")
    return name, parts


class ConvStem(nn.Module):
    """A convolutional patch embedding for a ViT image tower ("early convolutions", Xiao et al. 2021):
    ``len(channels)`` 3x3 stride-2 convolutions (each followed by a one-group GroupNorm and GELU), then a
    1x1 convolution to the tower's ``width``. It replaces the ``conv1`` patchify layer of an open_clip
    ``VisionTransformer`` (same input, same (B, width, H/p, W/p) output for p = 2**len(channels)); the
    transformer, position embedding, pooling and projection are unchanged, so every token-level code path
    runs as on a standard ViT. Used by the toy world's CLIP, whose tiny tower learns shapes far faster
    with it than with a linear 8x8 patchify (benchmarks/results/toyworld_training_notes.md)."""

    def __init__(self, channels: Sequence[int], width: int):
        super().__init__()
        channels = [int(c) for c in channels]
        if not channels or any(c <= 0 for c in channels):
            raise ValueError(f"ConvStem: channels must be a non-empty list of positive ints, got {channels}")
        layers: list[nn.Module] = []
        cin = 3
        for c in channels:
            layers += [nn.Conv2d(cin, c, 3, stride=2, padding=1, bias=False), nn.GroupNorm(1, c), nn.GELU()]
            cin = c
        layers.append(nn.Conv2d(cin, int(width), 1))
        self.layers = nn.Sequential(*layers)
        self.channels = channels

    @property
    def stride(self) -> int:
        return 2 ** len(self.channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def _install_conv_stem(model: nn.Module, channels: Sequence[int]) -> None:
    vis = model.visual
    p = tuple(vis.patch_size)
    stem = ConvStem(channels, vis.conv1.out_channels)
    if p != (stem.stride, stem.stride):
        raise ValueError(f"conv_stem: {len(stem.channels)} stride-2 convolutions give a stride of {stem.stride}, "
                         f"but the image tower's patch size is {p}; use log2(patch_size) channel entries")
    vis.conv1 = stem


def _load_with_conv_stem(path: Path, full_cfg: dict, channels, weights: list[Path]) -> nn.Module:
    """Rebuild an open_clip CLIP whose patchify is a :class:`ConvStem` (open_clip's own loader does not know
    the stem) and load its safetensors weights strictly."""
    from open_clip.model import CLIP, set_model_preprocess_cfg
    from safetensors.torch import load_file

    st = [w for w in weights if w.suffix == ".safetensors"]
    if not st:
        raise FileNotFoundError(f"from_pretrained: {str(path)!r} has a conv_stem config but no .safetensors weights "
                                f"(expected {_WEIGHTS_NAME})")
    model = CLIP(**full_cfg["model_cfg"])
    _install_conv_stem(model, channels)
    state = load_file(str(st[0]))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"from_pretrained: {str(st[0])!r} does not fit the config in {str(path)!r} ({e})") from None
    if full_cfg.get("preprocess_cfg"):
        set_model_preprocess_cfg(model, full_cfg["preprocess_cfg"])
    return model.eval()


@contextlib.contextmanager
def _quiet_root_log(prefix: str):
    """Drop the root logger's records that start with ``prefix`` inside the block."""
    import logging

    def keep(record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(prefix)

    root = logging.getLogger()
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)


@BACKBONES.register("clip")
class CLIPBackbone(nn.Module, FromSpec):
    """An open_clip CLIP model with dense features, attention access and surgery attention.

    model: an ``open_clip.CLIP`` (or ``CustomTextCLIP``) whose ``visual`` is an open_clip
    ``VisionTransformer`` with default ``ResidualAttentionBlock`` blocks, no attentional pooler and
    ``pool_type`` 'tok' or 'avg'. tokenizer: a callable list[str] -> (n, context_length) token ids
    (open_clip's ``SimpleTokenizer`` when None). model_cfg: the open_clip model config dict (needed by
    :meth:`save_pretrained`). pos_interp: the default position-embedding interpolation of
    :meth:`forward` (``"bicubic"``; DiCLIP uses ``"bilinear"``).
    """

    def __init__(self, model: nn.Module, tokenizer=None, model_cfg: dict | None = None, pos_interp: str = "bicubic"):
        super().__init__()
        import open_clip
        from open_clip.transformer import ResidualAttentionBlock, VisionTransformer

        visual = getattr(model, "visual", None)
        if not isinstance(visual, VisionTransformer):
            raise TypeError(f"CLIPBackbone: expected an open_clip model whose image tower is an open_clip "
                            f"VisionTransformer, got {type(visual).__name__}")
        blocks = visual.transformer.resblocks
        bad = [type(b).__name__ for b in blocks if not isinstance(b, ResidualAttentionBlock)]
        if bad:
            raise TypeError(f"CLIPBackbone: supports the default ResidualAttentionBlock only, the image tower has {bad[0]}")
        if visual.attn_pool is not None or visual.pool_type not in ("tok", "avg"):
            raise TypeError(f"CLIPBackbone: supports pool_type 'tok' or 'avg' without an attentional pooler, got "
                            f"pool_type={visual.pool_type!r}, attn_pool={type(visual.attn_pool).__name__}")
        if pos_interp not in _POS_MODES:
            raise ValueError(f"CLIPBackbone: pos_interp must be one of {_POS_MODES}, got {pos_interp!r}")
        self.model = model.eval()
        self.tokenizer = tokenizer if tokenizer is not None else open_clip.SimpleTokenizer(
            context_length=getattr(model, "context_length", 77))
        self.model_cfg = dict(model_cfg) if model_cfg is not None else None
        self.pos_interp = pos_interp
        mean = getattr(visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN
        std = getattr(visual, "image_std", None) or open_clip.OPENAI_DATASET_STD
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    # ------------------------------------------------------------------ construction / IO
    FAMILY = "clip"
    DEFAULT_SPEC = "ViT-B-16"

    @classmethod
    def _tiny(cls, variant: str | None, *, device="cpu", dtype=None, pos_interp: str = "bicubic",
              pretrained: str | None = None, cache_dir: str | None = None) -> "CLIPBackbone":
        """``tiny``: :meth:`tiny` with seed 0 (``pretrained`` and ``cache_dir`` have nothing to load)."""
        if variant is not None:
            raise ValueError(f"clip: no tiny variant {variant!r}; use tiny")
        return cls.tiny(seed=0, pos_interp=pos_interp, device=device, dtype=dtype)

    @classmethod
    def tiny(cls, seed: int = 0, image_size: int | tuple[int, int] = 64, patch_size: int = 8, width: int = 64,
             layers: int = 3, heads: int = 4, embed_dim: int = 32, text_width: int = 32, text_layers: int = 2,
             text_heads: int = 4, context_length: int = 77, quick_gelu: bool = False,
             ls_init_value: float | None = None, pos_interp: str = "bicubic", conv_stem: Sequence[int] | None = None,
             device="cpu", dtype=None) -> "CLIPBackbone":
        """A random-weight CLIP built by ``open_clip.model.CLIP`` from a small config (deterministic
        for a seed; the global RNG is left untouched). The text tower keeps CLIP's 49408-token
        vocabulary so open_clip's own tokenizer applies. ``conv_stem``: channels of a :class:`ConvStem`
        that replaces the linear patchify (log2(patch_size) entries); saved and restored by
        :meth:`save_pretrained` / :meth:`from_pretrained`."""
        if width % heads:
            raise ValueError(f"tiny: width={width} must be a multiple of heads={heads}")
        from open_clip.model import CLIP, set_model_preprocess_cfg
        from open_clip.transform import PreprocessCfg

        model_cfg = {
            "embed_dim": embed_dim,
            "quick_gelu": quick_gelu,
            "vision_cfg": {"image_size": list(image_size) if isinstance(image_size, tuple) else image_size,
                           "patch_size": patch_size, "width": width, "layers": layers,
                           "head_width": width // heads, "ls_init_value": ls_init_value},
            "text_cfg": {"context_length": context_length, "vocab_size": 49408, "width": text_width,
                         "heads": text_heads, "layers": text_layers, "ls_init_value": ls_init_value},
        }
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = CLIP(**model_cfg)
            if conv_stem is not None:
                _install_conv_stem(model, conv_stem)
            if ls_init_value is not None:  # random layer scales, so tests see them act
                for name, p in model.named_parameters():
                    if name.endswith(".gamma"):
                        p.data.uniform_(0.5, 1.5)
        pp = asdict(PreprocessCfg())
        pp["size"] = image_size
        set_model_preprocess_cfg(model, pp)
        return cls._finish(model, None, model_cfg, pos_interp, device, dtype)

    @property
    def conv_stem(self) -> list[int] | None:
        """The channels of the image tower's :class:`ConvStem`, or None for the standard linear patchify."""
        c1 = self.model.visual.conv1
        return list(c1.channels) if isinstance(c1, ConvStem) else None

    @classmethod
    def _finish(cls, model, tokenizer, model_cfg, pos_interp, device, dtype) -> "CLIPBackbone":
        out = cls(model, tokenizer=tokenizer, model_cfg=model_cfg, pos_interp=pos_interp)
        return out.to(device=device, dtype=dtype) if dtype is not None else out.to(device=device)

    @classmethod
    def from_pretrained(cls, name_or_path: str = "ViT-B-16", *, pretrained: str | None = "openai",
                        cache_dir: str | None = None, device="cpu", dtype=None, pos_interp: str = "bicubic") -> "CLIPBackbone":
        """Load a CLIP through ``open_clip.create_model``.

        name_or_path: a local directory in open_clip's hf-hub layout (``open_clip_config.json`` with
        ``model_cfg`` + a weights file, ``open_clip_model.safetensors`` preferred — what
        :meth:`save_pretrained` writes; also accepted as ``local-dir:<path>``), read without any
        network access; or an ``hf-hub:org/repo`` id; or an open_clip model name such as
        ``"ViT-B-16"`` (``"ViT-B/16"`` works too) with ``pretrained`` = a tag (``"openai"``,
        ``"laion2b_s34b_b88k"``, ...), a checkpoint file, or None for random weights. Tags whose
        weights were trained with QuickGELU get it switched on. Downloads go to ``cache_dir``.
        ``pretrained`` is ignored for directories and hf-hub ids.
        """
        import open_clip

        if not isinstance(name_or_path, (str, os.PathLike)):
            raise TypeError(f"from_pretrained: name_or_path must be a string or path, got {type(name_or_path).__name__}")
        name = os.fspath(name_or_path)
        local = name[len("local-dir:"):] if name.startswith("local-dir:") else name
        if name.startswith("local-dir:") or os.path.isdir(local):
            path = Path(local).expanduser()
            if not path.is_dir():
                raise FileNotFoundError(f"from_pretrained: directory {str(path)!r} not found; expected a folder with "
                                        f"{_CONFIG_NAME} and {_WEIGHTS_NAME}")
            cfg_file = path / _CONFIG_NAME
            if not cfg_file.is_file():
                raise FileNotFoundError(f"from_pretrained: {str(path)!r} has no {_CONFIG_NAME}; expected an open_clip "
                                        f"hf-hub style folder ({_CONFIG_NAME} + {_WEIGHTS_NAME}), e.g. written by "
                                        f"CLIPBackbone.save_pretrained")
            weights = [p for ext in ("*.safetensors", "*.bin", "*.pth") for p in path.glob(ext)]
            if not weights:
                raise FileNotFoundError(f"from_pretrained: {str(path)!r} has {_CONFIG_NAME} but no weights file "
                                        f"(expected {_WEIGHTS_NAME})")
            try:
                full_cfg = json.loads(cfg_file.read_text())
                model_cfg = full_cfg["model_cfg"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"from_pretrained: {str(cfg_file)!r} is not an open_clip config with a 'model_cfg' "
                                 f"entry ({e})") from None
            extra = full_cfg.get("weakseg", {})
            pos_interp = extra.get("pos_interp", pos_interp)
            source = f"local-dir:{path}"
            if extra.get("conv_stem"):
                model = _load_with_conv_stem(path, full_cfg, extra["conv_stem"], weights)
            else:
                model = open_clip.create_model(source, device="cpu")
            tokenizer = open_clip.get_tokenizer(source)
            return cls._finish(model, tokenizer, model_cfg, pos_interp, device, dtype)

        if name.startswith("hf-hub:"):
            from open_clip.pretrained import download_pretrained_from_hf

            require_hub(name, "CLIP model")
            with hub_errors(name, "CLIP model"):
                model = open_clip.create_model(name, cache_dir=cache_dir, device="cpu")
                tokenizer = open_clip.get_tokenizer(name, cache_dir=cache_dir)
                cfg_file = download_pretrained_from_hf(name[len("hf-hub:"):], filename=_CONFIG_NAME,
                                                       cache_dir=cache_dir)
            model_cfg = json.loads(Path(cfg_file).read_text())["model_cfg"]
            return cls._finish(model, tokenizer, model_cfg, pos_interp, device, dtype)

        cleaned = name.replace("/", "-")
        if cleaned not in open_clip.list_models():
            raise FileNotFoundError(f"from_pretrained: {name!r} is neither a local directory nor an open_clip model name "
                                    f"(e.g. 'ViT-B-16'; see open_clip.list_models()) nor an 'hf-hub:' id; a local path "
                                    f"must be a folder with {_CONFIG_NAME} and {_WEIGHTS_NAME}")
        model_cfg = open_clip.get_model_config(cleaned)
        force_quick_gelu = False
        if pretrained:
            tag_cfg = open_clip.get_pretrained_cfg(cleaned, pretrained)
            if not tag_cfg and not os.path.isfile(pretrained):
                tags = open_clip.list_pretrained_tags_by_model(cleaned)
                raise ValueError(f"from_pretrained: pretrained={pretrained!r} is neither a known tag of {cleaned} "
                                 f"({', '.join(tags) or 'none'}) nor a checkpoint file")
            force_quick_gelu = bool(tag_cfg.get("quick_gelu", False)) if tag_cfg else False
        if force_quick_gelu:
            model_cfg["quick_gelu"] = True
        hub = contextlib.nullcontext()
        if pretrained and not os.path.isfile(pretrained):  # a tag: open_clip fetches its weights from the hub
            require_hub(f"{cleaned} ({pretrained})", "CLIP model")
            hub = hub_errors(f"{cleaned} ({pretrained})", "CLIP model")
        with hub:
            model = open_clip.create_model(cleaned, pretrained=pretrained or None, cache_dir=cache_dir, device="cpu",
                                           force_quick_gelu=force_quick_gelu)
            tokenizer = open_clip.get_tokenizer(cleaned, cache_dir=cache_dir)
        return cls._finish(model, tokenizer, model_cfg, pos_interp, device, dtype)

    @classmethod
    def from_config(cls, model: str = "ViT-B-16", *, pretrained: str | None = None, cache_dir: str | None = None,
                    device="cpu", dtype=None, pos_interp: str = "bicubic", seed: int = RANDOM_SEED,
                    **kw) -> "CLIPBackbone":
        """``random:<model>``: the open_clip model ``model`` (an open_clip name such as ``ViT-B-16``,
        ``ViT-L-14``; ``ViT-B/16`` works too) built from open_clip's own config with random weights drawn
        from ``seed`` (the global RNG is left untouched), no download. ``pretrained``: when it names a tag of
        the model (``"openai"``), the architecture switches that the tag implies (QuickGELU) and its
        normalisation mean/std are applied, but nothing is loaded. ``device="meta"`` builds without
        allocating. ``cache_dir`` and other keywords have nothing to load and are ignored."""
        import open_clip

        if not isinstance(model, str) or not model.strip():
            raise ValueError(f"clip: random:<model> needs an open_clip model name, got {model!r}")
        cleaned = model.strip().replace("/", "-")
        if cleaned not in open_clip.list_models():
            vits = [m for m in open_clip.list_models() if m.startswith("ViT-")]
            raise ValueError(f"clip: {model!r} is not an open_clip model name (random:<model>); known ViT models "
                             f"(the image towers CLIPBackbone runs): {', '.join(vits)}")
        model_cfg = open_clip.get_model_config(cleaned)
        tag_cfg = open_clip.get_pretrained_cfg(cleaned, pretrained) if isinstance(pretrained, str) else {}
        quick_gelu = bool(tag_cfg.get("quick_gelu", False))
        if quick_gelu:
            model_cfg["quick_gelu"] = True
        preprocess = {k: tag_cfg[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in tag_cfg}
        meta = torch.device(device).type == "meta"
        with torch.random.fork_rng(devices=[]), (torch.device("meta") if meta else contextlib.nullcontext()):
            torch.manual_seed(int(seed))
            with _quiet_root_log("No pretrained weights loaded"):  # open_clip's note that weights are random
                net = open_clip.create_model(cleaned, pretrained=None, device="meta" if meta else "cpu",
                                             force_quick_gelu=quick_gelu, force_preprocess_cfg=preprocess or None)
        tokenizer = open_clip.get_tokenizer(cleaned)
        return cls._finish(net, tokenizer, model_cfg, pos_interp, device, dtype)

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write ``path/open_clip_config.json`` (open_clip's ``model_cfg`` + ``preprocess_cfg``, plus a
        ``weakseg`` entry with ``pos_interp``) and ``path/open_clip_model.safetensors`` (the model's
        state dict) — the layout ``open_clip.create_model('local-dir:<path>')`` and
        :meth:`from_pretrained` read."""
        if self.model_cfg is None:
            raise ValueError("save_pretrained: this CLIPBackbone was built without model_cfg (the open_clip config "
                             "dict); pass model_cfg= to the constructor")
        from open_clip.push_to_hf_hub import save_config_for_hf

        out = Path(path)
        save_safetensors(self.model.state_dict(), out / _WEIGHTS_NAME)
        with atomic_path(out / _CONFIG_NAME) as tmp:  # open_clip's config, plus the weakseg entry
            save_config_for_hf(self.model, tmp, model_config=self.model_cfg)
            cfg = json.loads(tmp.read_text())
            cfg["weakseg"] = {"pos_interp": self.pos_interp}
            if self.conv_stem is not None:
                cfg["weakseg"]["conv_stem"] = self.conv_stem
            tmp.write_text(json.dumps(cfg, indent=2))

    # ------------------------------------------------------------------ properties
    @property
    def device(self) -> torch.device:
        return self.model.visual.class_embedding.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.visual.class_embedding.dtype

    @property
    def patch_size(self) -> tuple[int, int]:
        return tuple(self.model.visual.patch_size)

    @property
    def native_grid(self) -> tuple[int, int]:
        """The patch grid the position embedding was trained on."""
        return tuple(self.model.visual.grid_size)

    @property
    def embed_dim(self) -> int:
        """D, the size of projected image and text embeddings."""
        return int(self.model.visual.output_dim)

    @property
    def width(self) -> int:
        return int(self.model.visual.transformer.width)

    @property
    def num_layers(self) -> int:
        return len(self.model.visual.transformer.resblocks)

    @property
    def num_heads(self) -> int:
        return int(self.model.visual.transformer.resblocks[0].attn.num_heads)

    # ------------------------------------------------------------------ text
    @torch.no_grad()
    def encode_text(self, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        """texts: n strings -> (n, D) L2-normalised text embeddings (``model.encode_text``)."""
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise TypeError(f"encode_text: expected a list of strings, got {type(texts).__name__}")
        texts = list(texts)
        if not texts:
            return torch.zeros(0, self.embed_dim, device=self.device, dtype=self.dtype)
        out = []
        for i in range(0, len(texts), batch_size):
            tokens = self.tokenizer(texts[i:i + batch_size]).to(self.device)
            out.append(self.model.encode_text(tokens, normalize=True))
        return torch.cat(out, dim=0)

    @torch.no_grad()
    def class_embeddings(self, class_names: Sequence, templates: str | Sequence[str] = "single",
                         background_words: Sequence | None = None, synonym_sep: str | None = ",") -> ClassEmbeddings:
        """Prompt-averaged text embeddings of classes, then background words.

        class_names: C entries, each a name string or a list of synonyms; with ``synonym_sep`` (default
        ",") a string is split on it into synonyms ("person with clothes,people,human" -> 3); with
        ``synonym_sep=None`` it is used verbatim (DiCLIP's reference code does that).
        templates: see :func:`weakseg.backbones.text.resolve_templates` ("single" = "a photo of a {}.",
        "origami", "ensemble" = the 80 OpenAI ImageNet templates, a template, or a list).
        background_words: G entries like class_names, one row each, appended after the classes.
        Each row: every (synonym, template) prompt is embedded and L2-normalised, the prompts are
        averaged, and the mean is re-normalised.
        """
        tmpl = resolve_templates(templates)
        if isinstance(class_names, str):
            raise TypeError("class_names: expected a list of class names, got a single string")
        entries = [("class_names", e) for e in class_names]
        if background_words is not None:
            if isinstance(background_words, str):
                raise TypeError("background_words: expected a list of words, got a single string")
            entries += [("background_words", e) for e in background_words]
        if not entries:
            raise ValueError("class_names: expected at least one class name")
        names, prompts, owner = [], [], []
        for row, (what, entry) in enumerate(entries):
            name, parts = split_names(entry, synonym_sep, what)
            names.append(name)
            for p in parts:
                for t in tmpl:
                    prompts.append(t.replace("{}", p))
                    owner.append(row)
        emb = self.encode_text(prompts).float()
        idx = torch.tensor(owner, device=emb.device)
        sums = torch.zeros(len(entries), emb.shape[1], device=emb.device).index_add_(0, idx, emb)
        counts = torch.bincount(idx, minlength=len(entries)).clamp_min(1).unsqueeze(1)
        rows = F.normalize(sums / counts, dim=-1).to(self.dtype)
        is_bg = torch.tensor([what == "background_words" for what, _ in entries], dtype=torch.bool, device=emb.device)
        return ClassEmbeddings(embeddings=rows, names=names, is_background=is_bg)

    # ------------------------------------------------------------------ image
    def preprocess(self, images, size: int | tuple[int, int] | None = None) -> torch.Tensor:
        """RGB uint8 (B, 3, H, W) or a list of (3, H, W) -> normalised float (B, 3, H', W') on the
        model's device and dtype. ``size`` (int = square, or (h, w)) resizes each image bilinearly
        (antialiased); without it all images must share one size. H', W' must be multiples of the
        patch size."""
        items = check_images(images)
        if size is not None:
            sh, sw = _pair(size, "size")
            x = torch.cat([F.interpolate(im.to(self.device, torch.float32)[None], size=(sh, sw), mode="bilinear",
                                         align_corners=False, antialias=True) for im in items])
        else:
            shapes = {tuple(im.shape) for im in items}
            if len(shapes) > 1:
                raise ValueError(f"images: all images must have one size unless size= is given, got {sorted(shapes)}")
            x = torch.stack(items).to(self.device, torch.float32)
        H, W = x.shape[-2:]
        ph, pw = self.patch_size
        if H % ph or W % pw:
            raise ValueError(f"images: size {H}x{W} is not a multiple of the patch size {ph}x{pw}; resize or crop to a "
                             f"multiple (size=...)")
        x = (x / 255.0 - self.mean.to(x.device)) / self.std.to(x.device)
        return x.to(self.dtype)

    def encode_layers(self, pixels: torch.Tensor, layers: Sequence[int], pos_interp: str | None = None,
                      pos: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Token outputs (B, 1 + h·w, width) of the image-tower blocks ``layers`` (0-based block indices,
        as :attr:`CLIPOutput.layers`) for already-normalised float ``pixels`` (B, 3, H, W) (see
        :meth:`preprocess`). Only the blocks up to ``max(layers)`` run. No ``no_grad`` and no Python-side
        dependence on B, so the call traces / exports with a dynamic batch; the grid is static (from H, W).
        ``pos``: a positional embedding (1 + h·w, width) already resampled to the grid (exported graphs pass
        it so that no resampling is traced), else it is resampled here with ``pos_interp``."""
        vis = self.model.visual
        L = self.num_layers
        wanted = [int(i) for i in layers]
        if not wanted or any(not 0 <= i < L for i in wanted):
            raise ValueError(f"layers: expected block indices in [0, {L - 1}], got {list(layers)!r}")
        if pixels.dim() != 4 or pixels.shape[1] != 3:
            raise ValueError(f"pixels: expected normalised images (B, 3, H, W), got {tuple(pixels.shape)}")
        ph, pw = self.patch_size
        gh, gw = pixels.shape[-2] // ph, pixels.shape[-1] // pw
        t = vis.conv1(pixels.to(self.dtype)).flatten(2).transpose(1, 2)
        cls = vis.class_embedding.to(t.dtype).view(1, 1, -1).expand(t.shape[0], 1, t.shape[-1])
        t = torch.cat([cls, t], dim=1)
        if pos is None:
            pos = interpolate_pos_embed(vis.positional_embedding, (gh, gw), mode=pos_interp or self.pos_interp,
                                        src_grid=self.native_grid)
        elif tuple(pos.shape) != (1 + gh * gw, t.shape[-1]):
            raise ValueError(f"pos: expected a positional embedding of shape {(1 + gh * gw, t.shape[-1])} for the "
                             f"{gh}x{gw} grid, got {tuple(pos.shape)}")
        x = vis.ln_pre(t + pos.to(t.dtype))
        out: dict[int, torch.Tensor] = {}
        for i, blk in enumerate(vis.transformer.resblocks[:max(wanted) + 1]):
            x = blk(x)
            out[i] = x
        return [out[i] for i in wanted]

    @staticmethod
    def _qkv(block, h: torch.Tensor):
        attn = block.attn
        B, N, E = h.shape
        H = attn.num_heads
        qkv = F.linear(h, attn.in_proj_weight, attn.in_proj_bias).view(B, N, 3, H, E // H).permute(2, 0, 3, 1, 4)
        return qkv[0], qkv[1], qkv[2]

    @staticmethod
    def _merge_heads(x: torch.Tensor) -> torch.Tensor:
        B, H, N, d = x.shape
        return x.transpose(1, 2).reshape(B, N, H * d)

    @torch.no_grad()
    def forward(self, images, *, size: int | tuple[int, int] | None = None, surgery_layers: int = 0,
                attn_bias: torch.Tensor | None = None, return_attn: bool = False, return_layers: bool = False,
                pos_interp: str | None = None) -> CLIPOutput:
        """Run the image tower. See :class:`CLIPOutput` for the outputs and the module docstring for
        the surgery path.

        images: RGB uint8 (B, 3, H, W) or a list of (3, H, W) (see :meth:`preprocess`); any H, W that
        are multiples of the patch size; the position embedding is interpolated to the grid with
        ``pos_interp`` (default: the backbone's, "bicubic" unless set). surgery_layers: N, the number
        of last blocks with the surgery path (0 = none). attn_bias: (B, hw, hw) or (B, 1, hw, hw),
        added after the softmaxes to the patch-patch block of every head's surgery attention in the
        surgery blocks (needs surgery_layers > 0).

        Without ``return_attn`` the original path's attention runs through
        ``F.scaled_dot_product_attention``; with it, through an explicit softmax, so the two agree to
        float rounding (about 1e-6 in float32), not bit for bit. Runs under ``torch.no_grad()`` (not
        inference mode), so the outputs can feed trained heads.
        """
        vis = self.model.visual
        L = self.num_layers
        if not is_int(surgery_layers, 0) or surgery_layers > L:
            raise ValueError(f"surgery_layers: expected an int in [0, {L}] (the number of last blocks), got {surgery_layers!r}")
        x = self.preprocess(images, size)
        B = x.shape[0]
        ph, pw = self.patch_size
        gh, gw = x.shape[-2] // ph, x.shape[-1] // pw
        n = gh * gw
        if attn_bias is not None:
            if surgery_layers == 0:
                raise ValueError("attn_bias: an attention bias needs surgery_layers > 0 (it is added to the surgery "
                                 "attention only)")
            if not isinstance(attn_bias, torch.Tensor) or not attn_bias.is_floating_point():
                raise TypeError(f"attn_bias: expected a floating-point tensor, got "
                                f"{attn_bias.dtype if isinstance(attn_bias, torch.Tensor) else type(attn_bias).__name__}")
            if attn_bias.dim() == 4 and attn_bias.shape[1] == 1:
                attn_bias = attn_bias[:, 0]
            if tuple(attn_bias.shape) != (B, n, n):
                raise ValueError(f"attn_bias: expected shape (B, hw, hw) = ({B}, {n}, {n}) or (B, 1, hw, hw) for a "
                                 f"{gh}x{gw} grid, got {tuple(attn_bias.shape)}")
            attn_bias = attn_bias.to(self.device, self.dtype)
        mode = self.pos_interp if pos_interp is None else pos_interp
        pos = interpolate_pos_embed(vis.positional_embedding, (gh, gw), mode=mode, src_grid=self.native_grid)
        return self.encode_normalized(x, pos, surgery_layers=surgery_layers, attn_bias=attn_bias,
                                      return_attn=return_attn, return_layers=return_layers)

    def encode_normalized(self, x: torch.Tensor, pos: torch.Tensor, *, surgery_layers: int = 0,
                          attn_bias: torch.Tensor | None = None, return_attn: bool = False,
                          return_layers: bool = False) -> CLIPOutput:
        """The image tower on already normalised images ``x`` (B, 3, H, W) with the position embedding
        ``pos`` (1 + hw, width) of their grid (:func:`interpolate_pos_embed`): tensor maths only, no
        checks and no grad mode of its own, so export (ONNX, torch.export) can trace it with a fixed
        ``pos`` buffer. :meth:`forward` checks its arguments and calls it."""
        vis = self.model.visual
        L = self.num_layers
        B = x.shape[0]
        ph, pw = self.patch_size
        gh, gw = x.shape[-2] // ph, x.shape[-1] // pw

        # Embeddings (VisionTransformer._embeds with an interpolated position embedding).
        t = vis.conv1(x).flatten(2).transpose(1, 2)
        t = torch.cat([vis.class_embedding.to(t.dtype).view(1, 1, -1).expand(B, -1, -1), t], dim=1)
        x_ori = vis.ln_pre(t + pos.to(t.dtype))

        attn_list = [] if return_attn else None
        surg_list = [] if (return_attn and surgery_layers) else None
        layer_list = [] if return_layers else None
        first_surgery = L - surgery_layers
        x_new = None
        for i, blk in enumerate(vis.transformer.resblocks):
            h = blk.ln_1(x_ori)
            q, k, v = self._qkv(blk, h)
            scale = q.shape[-1] ** -0.5
            if return_attn:
                probs = torch.softmax((q * scale) @ k.transpose(-2, -1), dim=-1)
                attn_list.append(probs)
                o = probs @ v
            else:
                o = F.scaled_dot_product_attention(q, k, v)
            if i >= first_surgery:
                if x_new is None:
                    x_new = x_ori
                m = (torch.softmax((q * scale) @ q.transpose(-2, -1), dim=-1)
                     + 2.0 * torch.softmax((k * scale) @ k.transpose(-2, -1), dim=-1)).sum(dim=1)
                if attn_bias is not None:
                    m[:, 1:, 1:] += q.shape[1] * attn_bias  # the bias on every head, then summed over heads
                if surg_list is not None:
                    surg_list.append(m)
                o_new = blk.attn.out_proj(self._merge_heads(m.unsqueeze(1) @ v))
                x_new = x_new + blk.ls_1(o_new)
            x_ori = x_ori + blk.ls_1(blk.attn.out_proj(self._merge_heads(o)))
            x_ori = x_ori + blk.ls_2(blk.mlp(blk.ln_2(x_ori)))
            if layer_list is not None:
                layer_list.append(x_ori)

        # Pooling as VisionTransformer._pool (no attentional pooler).
        if vis.final_ln_after_pool:
            pooled = x_ori[:, 1:].mean(dim=1) if vis.pool_type == "avg" else x_ori[:, 0]
            pooled = vis.ln_post(pooled)
        else:
            normed = vis.ln_post(x_ori)
            pooled = normed[:, 1:].mean(dim=1) if vis.pool_type == "avg" else normed[:, 0]
        dense = vis.ln_post((x_new if x_new is not None else x_ori)[:, 1:])
        if vis.proj is not None:
            pooled = pooled @ vis.proj
            dense = dense @ vis.proj
        return CLIPOutput(cls=pooled, patch=dense.reshape(B, gh, gw, -1), grid=(gh, gw), attn=attn_list,
                          surgery_attn=surg_list, layers=layer_list)
