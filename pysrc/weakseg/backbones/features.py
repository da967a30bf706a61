"""Dense patch features on the patch grid (DINOv2 through transformers) and the common
:class:`PatchFeatures` result that every dense extractor returns.

The padding convention follows ModuSeg (docs/specs/moduseg.md §1.3): the image keeps its native
resolution and is padded on the **bottom and right** to the next multiple of the patch size, so
an (H, W) image gives a ceil(H/p) x ceil(W/p) token grid (500x375 with p=16 -> 512x384 -> 24x32;
37x50 with p=14 -> 42x56 -> 3x4). Token (i, j) covers padded pixels
[i*p, (i+1)*p) x [j*p, (j+1)*p); the cells of the last row/column may hold padding.

Loading follows the house rule: ``from_pretrained`` takes a hub name or a local directory; a local
directory is read with ``local_files_only=True`` so it never touches the network, and a missing or
wrong path raises an error naming the path and what was expected.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Sequence, runtime_checkable

import torch
import torch.nn.functional as F

from weakseg.backbones.configs import DINOV2 as DINOV2_CONFIGS, DINOV2_ALIASES, RANDOM_SEED
from weakseg.backbones.configs import resolve as resolve_config
from weakseg.backbones.hub import hub_errors, require_hub
from weakseg.core import BACKBONES, FromSpec, check_images

__all__ = [
    "PatchFeatures",
    "DenseFeatureExtractor",
    "DINOv2Features",
    "padded_size",
    "pad_to_patch_multiple",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ----------------------------------------------------------------------------------------------
# The common result
# ----------------------------------------------------------------------------------------------
def padded_size(height: int, width: int, patch_size: int) -> tuple[int, int]:
    """(Hp, Wp): ``height`` and ``width`` rounded up to multiples of ``patch_size``."""
    if patch_size <= 0:
        raise ValueError(f"patch_size: expected a positive int, got {patch_size}")
    if height <= 0 or width <= 0:
        raise ValueError(f"image size: expected positive height and width, got {height}x{width}")
    return math.ceil(height / patch_size) * patch_size, math.ceil(width / patch_size) * patch_size


def pad_to_patch_multiple(pixels: torch.Tensor, patch_size: int, value: float = 0.0
                          ) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
    """Pad (B, C, H, W) ``pixels`` on the bottom and right with ``value`` to multiples of
    ``patch_size``. Returns the padded tensor and the padding (top, left, bottom, right)."""
    if pixels.dim() != 4:
        raise ValueError(f"pixels: expected (B, C, H, W), got shape {tuple(pixels.shape)}")
    H, W = pixels.shape[-2:]
    Hp, Wp = padded_size(H, W, patch_size)
    padding = (0, 0, Hp - H, Wp - W)
    if Hp == H and Wp == W:
        return pixels, padding
    return F.pad(pixels, (0, Wp - W, 0, Hp - H), value=value), padding


@dataclass
class PatchFeatures:
    """Dense tokens of a batch of equally sized images on the patch grid.

    tokens:      (B, C, h, w) float, token (i, j) of image b is ``tokens[b, :, i, j]``.
    patch_size:  p, pixels per token side.
    image_size:  (H, W) of the original images (all images of the batch share it).
    padded_size: (Hp, Wp) = (h*p, w*p), the size the backbone saw.
    padding:     (top, left, bottom, right) pixels added; weakseg pads bottom/right only, so
                 top = left = 0 and H + bottom = Hp, W + right = Wp.
    """

    tokens: torch.Tensor
    patch_size: int
    image_size: tuple[int, int]
    padded_size: tuple[int, int]
    padding: tuple[int, int, int, int]

    def __post_init__(self) -> None:
        if not isinstance(self.tokens, torch.Tensor) or self.tokens.dim() != 4:
            shape = tuple(self.tokens.shape) if isinstance(self.tokens, torch.Tensor) else type(self.tokens).__name__
            raise ValueError(f"PatchFeatures.tokens: expected (B, C, h, w), got {shape}")
        self.image_size = tuple(int(v) for v in self.image_size)
        self.padded_size = tuple(int(v) for v in self.padded_size)
        self.padding = tuple(int(v) for v in self.padding)
        p = int(self.patch_size)
        h, w = self.tokens.shape[-2:]
        if self.padded_size != (h * p, w * p):
            raise ValueError(f"PatchFeatures: padded_size {self.padded_size} does not match the token grid "
                             f"{h}x{w} times patch_size {p}")
        top, left, bottom, right = self.padding
        H, W = self.image_size
        if min(self.padding) < 0 or top + H + bottom != h * p or left + W + right != w * p:
            raise ValueError(f"PatchFeatures: padding {self.padding} (top, left, bottom, right) and image_size "
                             f"{self.image_size} do not add up to padded_size {self.padded_size}")

    # --- shape helpers ------------------------------------------------------------------------
    @property
    def grid_size(self) -> tuple[int, int]:
        """(h, w) of the token grid."""
        return tuple(self.tokens.shape[-2:])

    @property
    def dim(self) -> int:
        return self.tokens.shape[1]

    def flatten(self) -> torch.Tensor:
        """Tokens as (B, h*w, C), row-major over the grid (ModuSeg's token order)."""
        return self.tokens.flatten(2).transpose(1, 2)

    def coverage(self) -> torch.Tensor:
        """(h, w) float: the fraction of each cell's p*p pixels that are real image pixels."""
        top, left, _, _ = self.padding
        H, W = self.image_size
        real = torch.zeros(1, 1, *self.padded_size, device=self.tokens.device)
        real[..., top:top + H, left:left + W] = 1
        return F.avg_pool2d(real, self.patch_size)[0, 0]

    def valid_grid(self) -> torch.Tensor:
        """(h, w) bool: the cells that hold at least one real image pixel."""
        return self.coverage() > 0

    def to_pixels(self, mode: str = "nearest") -> torch.Tensor:
        """(B, C, H, W): the tokens brought back to the original image pixels.

        ``nearest`` gives every pixel the token of the patch it lies in; ``bilinear`` interpolates
        between patch centres (align_corners=False on the padded canvas). The padding is cropped.
        """
        if mode not in ("nearest", "bilinear"):
            raise ValueError(f"to_pixels: mode must be 'nearest' or 'bilinear', got {mode!r}")
        kw = {} if mode == "nearest" else {"align_corners": False}
        up = F.interpolate(self.tokens, size=self.padded_size, mode=mode, **kw)
        top, left, _, _ = self.padding
        H, W = self.image_size
        return up[..., top:top + H, left:left + W]

    def to(self, *args, **kwargs) -> "PatchFeatures":
        return PatchFeatures(self.tokens.to(*args, **kwargs), self.patch_size, self.image_size,
                             self.padded_size, self.padding)


@runtime_checkable
class DenseFeatureExtractor(Protocol):
    """What ModuSeg-style methods need from a dense backbone: patch tokens on the grid."""

    patch_size: int
    dim: int

    def __call__(self, images: torch.Tensor | Sequence[torch.Tensor]) -> PatchFeatures:
        """images: RGB uint8 (B, 3, H, W) or a list of (3, H, W) of one size."""
        ...


# ----------------------------------------------------------------------------------------------
# Loading helpers shared with the proposers
# ----------------------------------------------------------------------------------------------
def resolve_pretrained(name_or_path: str | os.PathLike, what: str, required: Sequence[str] = ("config.json",)
                       ) -> tuple[str, bool]:
    """Decide whether ``name_or_path`` is a local directory or a hub name.

    Returns (string to hand to the library, is_local). A path that exists must be a directory
    holding every file of ``required``; a string that looks like a filesystem path (absolute,
    ``./``, ``../``, ``~`` or more than one ``/``) but does not exist is an error, not a hub name.
    A hub name passes :func:`weakseg.backbones.hub.require_hub` (one line, at once, without network).
    """
    s = os.fspath(name_or_path)
    if not s:
        raise ValueError(f"{what}: name_or_path must be a hub name or a local directory, got an empty string")
    p = Path(s).expanduser()
    if p.exists():
        if not p.is_dir():
            raise NotADirectoryError(f"{what}: {p} is a file; expected a directory written by save_pretrained "
                                     f"(with {', '.join(required)})")
        missing = [f for f in required if not (p / f).is_file()]
        if missing:
            raise FileNotFoundError(f"{what}: directory {p} has no {', '.join(missing)}; expected a directory "
                                    f"written by save_pretrained")
        return str(p), True
    looks_local = (os.path.isabs(s) or s.startswith(("./", "../", "~", ".\\")) or s.count("/") > 1
                   or s.count("\\") > 0)
    if looks_local:
        raise FileNotFoundError(f"{what}: local directory {p} does not exist (expected a directory written by "
                                f"save_pretrained, with {', '.join(required)}, or a hub name like 'org/model')")
    require_hub(s, what)
    return s, False


def _first_param(module: torch.nn.Module) -> torch.Tensor:
    return next(module.parameters())


# ----------------------------------------------------------------------------------------------
# DINOv2
# ----------------------------------------------------------------------------------------------
@BACKBONES.register("dinov2")
class DINOv2Features(torch.nn.Module, FromSpec):
    """DINOv2 patch tokens at native resolution (transformers ``Dinov2Model`` or
    ``Dinov2WithRegistersModel``).

    Preprocessing: uint8 RGB -> [0, 1] -> ImageNet mean/std; then padded bottom/right to a multiple
    of the patch size. ``pad="zero"`` (default) pads with black pixels *before* normalisation,
    exactly as ModuSeg zero-pads its [0, 1] image; ``pad="mean"`` pads the normalised tensor with 0,
    i.e. with the ImageNet mean colour. No resizing: the model interpolates its position
    embeddings to the grid (bicubic, ``Dinov2Embeddings.interpolate_pos_encoding``). Padding is seen
    by global attention, so it changes the tokens of real patches a little; the two modes differ.

    Output: the patch tokens of ``layer`` (default -1, the last block; CLS and register tokens
    dropped). With ``layernorm=True`` (default) they go through the model's final LayerNorm, which
    is what ``last_hidden_state`` and DINOv2's ``x_norm_patchtokens`` hold; ``layernorm=False``
    returns the raw block output (what ModuSeg takes from its C-RADIO backbone).
    """

    def __init__(self, model, *, layer: int = -1, layernorm: bool = True, pad: str = "zero"):
        super().__init__()
        from transformers import Dinov2Model
        allowed: tuple[type, ...] = (Dinov2Model,)
        try:
            from transformers import Dinov2WithRegistersModel
            allowed += (Dinov2WithRegistersModel,)
        except ImportError:  # older transformers
            pass
        if not isinstance(model, allowed):
            raise TypeError(f"model: expected one of {', '.join(c.__name__ for c in allowed)}, "
                            f"got {type(model).__name__}")
        if pad not in ("zero", "mean"):
            raise ValueError(f"pad: expected 'zero' or 'mean', got {pad!r}")
        n_layers = model.config.num_hidden_layers
        if not -(n_layers + 1) <= layer <= n_layers:
            raise ValueError(f"layer: expected an index into the {n_layers + 1} hidden states "
                             f"(0 = embeddings, {n_layers} or -1 = last block), got {layer}")
        self.model = model.eval()
        self.layer = int(layer)
        self.layernorm = bool(layernorm)
        self.pad = pad
        ps = model.config.patch_size
        self.patch_size = int(ps if isinstance(ps, int) else ps[0])
        self.dim = int(model.config.hidden_size)
        self.num_register_tokens = int(getattr(model.config, "num_register_tokens", 0) or 0)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    # --- construction -------------------------------------------------------------------------
    FAMILY = "dinov2"
    DEFAULT_SPEC = "facebook/dinov2-base"

    @classmethod
    def _tiny(cls, variant: str | None, *, device="cpu", dtype=None, cache_dir: str | None = None,
              **options) -> "DINOv2Features":
        if variant is not None:
            raise ValueError(f"dinov2: no tiny variant {variant!r}; use tiny")
        return cls.tiny(seed=0, **options).to(device=device, dtype=dtype)

    @classmethod
    def tiny(cls, seed: int = 0, *, registers: int = 0, layer: int = -1, layernorm: bool = True,
             pad: str = "zero", **overrides) -> "DINOv2Features":
        """A random-weight DINOv2 (width 32, 2 layers, patch 14, trained grid 4x4) for tests.
        ``registers > 0`` builds a ``Dinov2WithRegistersModel`` with that many register tokens;
        other keyword arguments override config fields."""
        values = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2,
                      image_size=56, patch_size=14)
        values.update(overrides)
        torch.manual_seed(seed)
        if registers:
            from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel
            model = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(num_register_tokens=registers, **values))
        else:
            from transformers import Dinov2Config, Dinov2Model
            model = Dinov2Model(Dinov2Config(**values))
        return cls(model, layer=layer, layernorm=layernorm, pad=pad)

    @classmethod
    def from_pretrained(cls, name_or_path: str = "facebook/dinov2-base", *, cache_dir: str | None = None,
                        device="cpu", dtype=None, layer: int = -1, layernorm: bool = True, pad: str = "zero",
                        **kw) -> "DINOv2Features":
        """Load a DINOv2 (with or without registers) from a hub name or a local directory written by
        :meth:`save_pretrained`. Local directories are read with ``local_files_only=True``."""
        from transformers import AutoConfig, AutoModel
        src, local = resolve_pretrained(name_or_path, "DINOv2Features.from_pretrained")
        if local:
            kw["local_files_only"] = True
        with contextlib.nullcontext() if local else hub_errors(src, "DINOv2 model"):
            config = AutoConfig.from_pretrained(src, cache_dir=cache_dir, **kw)
        if config.model_type not in ("dinov2", "dinov2_with_registers"):
            raise ValueError(f"DINOv2Features.from_pretrained: {name_or_path} holds a {config.model_type!r} model; "
                             f"expected 'dinov2' or 'dinov2_with_registers'")
        with contextlib.nullcontext() if local else hub_errors(src, "DINOv2 model"):
            model = AutoModel.from_pretrained(src, config=config, cache_dir=cache_dir, dtype=dtype, **kw)
        return cls(model, layer=layer, layernorm=layernorm, pad=pad).to(device)

    @classmethod
    def from_config(cls, model: str = "facebook/dinov2-base", *, cache_dir: str | None = None, device="cpu",
                    dtype=None, layer: int = -1, layernorm: bool = True, pad: str = "zero", seed: int = RANDOM_SEED,
                    **kw) -> "DINOv2Features":
        """``random:<model>``: the real architecture of ``model`` (``facebook/dinov2-small`` / ``-base`` /
        ``-large`` / ``-giant``, or ``dinov2-base`` ...; configs in :data:`weakseg.backbones.configs.DINOV2`)
        with random weights drawn from ``seed`` (the global RNG is left untouched), no download.
        ``device="meta"`` builds without allocating. ``cache_dir`` and other keywords have nothing to load
        and are ignored."""
        from transformers import Dinov2Config, Dinov2Model

        _, cfg = resolve_config(model, DINOV2_CONFIGS, DINOV2_ALIASES, cls.FAMILY)
        meta = torch.device(device).type == "meta"
        with torch.random.fork_rng(devices=[]), (torch.device("meta") if meta else contextlib.nullcontext()):
            torch.manual_seed(int(seed))
            net = Dinov2Model(Dinov2Config(**cfg))
        out = cls(net, layer=layer, layernorm=layernorm, pad=pad)
        return out.to(device=device, dtype=dtype) if dtype is not None else out.to(device=device)

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write the model in transformers' format (config.json + model.safetensors)."""
        self.model.save_pretrained(os.fspath(path), safe_serialization=True)

    @property
    def device(self) -> torch.device:
        return _first_param(self.model).device

    @property
    def dtype(self) -> torch.dtype:
        return _first_param(self.model).dtype

    # --- inference ----------------------------------------------------------------------------
    def preprocess(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
        """(B, 3, H, W) uint8 -> the normalised, padded (B, 3, Hp, Wp) pixel tensor the model sees
        (in the model's dtype, on its device) and the padding (top, left, bottom, right)."""
        x = images.to(self.device, torch.float32) / 255.0
        mean, std = self.mean.to(x.device), self.std.to(x.device)
        if self.pad == "zero":
            x, padding = pad_to_patch_multiple(x, self.patch_size, 0.0)
            x = (x - mean) / std
        else:
            x, padding = pad_to_patch_multiple((x - mean) / std, self.patch_size, 0.0)
        return x.to(self.dtype), padding

    def _tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        want_hidden = not (self.layer in (-1, self.model.config.num_hidden_layers) and self.layernorm)
        out = self.model(pixel_values=pixel_values, output_hidden_states=want_hidden)
        if not want_hidden:
            seq = out.last_hidden_state
        else:
            seq = out.hidden_states[self.layer]
            if self.layernorm:
                seq = self.model.layernorm(seq)
        return seq[:, 1 + self.num_register_tokens:]

    @torch.inference_mode()
    def forward(self, images: torch.Tensor | Sequence[torch.Tensor]) -> PatchFeatures:
        """Patch tokens of images that share one size: (B, 3, H, W) uint8 or a list of (3, H, W).
        Images of different sizes go through :meth:`extract_list`."""
        items = check_images(images)
        sizes = {tuple(im.shape[-2:]) for im in items}
        if len(sizes) != 1:
            raise ValueError(f"images: expected images of one size, got sizes {sorted(sizes)}; "
                             f"use extract_list() for images of different sizes")
        H, W = items[0].shape[-2:]
        if H == 0 or W == 0:
            raise ValueError(f"images: expected a non-empty image, got size {H}x{W}")
        batch = images if isinstance(images, torch.Tensor) and images.dim() == 4 else torch.stack(items)
        pixel_values, padding = self.preprocess(batch)
        Hp, Wp = pixel_values.shape[-2:]
        h, w = Hp // self.patch_size, Wp // self.patch_size
        seq = self._tokens(pixel_values)
        tokens = seq.transpose(1, 2).reshape(seq.shape[0], self.dim, h, w)
        return PatchFeatures(tokens.clone(), self.patch_size, (H, W), (Hp, Wp), padding)

    def extract_list(self, images: Sequence[torch.Tensor]) -> list[PatchFeatures]:
        """One :class:`PatchFeatures` (B = 1) per image, in input order; images of equal size share
        one forward pass."""
        items = check_images(images)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, im in enumerate(items):
            groups.setdefault(tuple(im.shape[-2:]), []).append(i)
        out: list[PatchFeatures | None] = [None] * len(items)
        for idx in groups.values():
            feats = self(torch.stack([items[i] for i in idx]))
            for j, i in enumerate(idx):
                out[i] = PatchFeatures(feats.tokens[j:j + 1], feats.patch_size, feats.image_size,
                                       feats.padded_size, feats.padding)
        return out  # type: ignore[return-value]


@BACKBONES.register("clip-dense")
class CLIPDenseFeatures(FromSpec):
    """The CLIP backbone as a dense-feature extractor: the projected last-layer patch
    features of :class:`weakseg.backbones.clip.CLIPBackbone` (optionally from DiCLIP's
    surgery path) as :class:`PatchFeatures`. Images are padded bottom/right with black to
    a multiple of the patch size, like :class:`DINOv2Features` with ``pad="zero"``.
    """

    def __init__(self, clip, surgery_layers: int = 0):
        ph, pw = clip.patch_size
        if ph != pw:
            raise ValueError(f"CLIPDenseFeatures: needs square patches, got {ph}x{pw}")
        self.clip = clip
        self.patch_size = int(ph)
        self.dim = int(clip.embed_dim)
        self.surgery_layers = surgery_layers

    FAMILY = "clip-dense"
    DEFAULT_SPEC = "ViT-B-16"

    @classmethod
    def _tiny(cls, variant: str | None, *, surgery_layers: int = 0, device="cpu", dtype=None,
              pos_interp: str = "bicubic", pretrained: str | None = None, cache_dir: str | None = None
              ) -> "CLIPDenseFeatures":
        if variant is not None:
            raise ValueError(f"clip-dense: no tiny variant {variant!r}; use tiny")
        return cls.tiny(seed=0, surgery_layers=surgery_layers, device=device, dtype=dtype, pos_interp=pos_interp)

    @classmethod
    def tiny(cls, seed: int = 0, surgery_layers: int = 0, **overrides) -> "CLIPDenseFeatures":
        from weakseg.backbones.clip import CLIPBackbone

        return cls(CLIPBackbone.tiny(seed=seed, **overrides), surgery_layers)

    @classmethod
    def from_pretrained(cls, name_or_path: str = "ViT-B-16", *, surgery_layers: int = 0, **kw) -> "CLIPDenseFeatures":
        from weakseg.backbones.clip import CLIPBackbone

        return cls(CLIPBackbone.from_pretrained(name_or_path, **kw), surgery_layers)

    @classmethod
    def from_config(cls, model: str = "ViT-B-16", *, surgery_layers: int = 0, **kw) -> "CLIPDenseFeatures":
        """``random:<model>``: :meth:`CLIPBackbone.from_config` (an open_clip model name, random weights)."""
        from weakseg.backbones.clip import CLIPBackbone

        return cls(CLIPBackbone.from_config(model, **kw), surgery_layers)

    def save_pretrained(self, path) -> None:
        self.clip.save_pretrained(path)

    @property
    def device(self) -> torch.device:
        return self.clip.device

    @property
    def dtype(self) -> torch.dtype:
        return self.clip.dtype

    def __call__(self, images) -> PatchFeatures:
        items = check_images(images)
        H, W = items[0].shape[-2:]
        if any(im.shape[-2:] != (H, W) for im in items):
            raise ValueError("images: CLIPDenseFeatures takes images of one size per call")
        x = torch.stack(items)
        x, padding = pad_to_patch_multiple(x.float(), self.patch_size, 0.0)
        out = self.clip(x.round().to(torch.uint8), surgery_layers=self.surgery_layers)
        tokens = out.patch.permute(0, 3, 1, 2).float().contiguous()  # (B, D, h, w)
        return PatchFeatures(tokens, self.patch_size, (H, W), tuple(x.shape[-2:]), padding)
