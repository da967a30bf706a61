"""The toy world's trained models: a tiny open_clip CLIP and a tiny Stable Diffusion (diffusers VAE + UNet,
transformers CLIP text encoder) trained on :class:`weakseg.toy.world.ToyWorld` scenes.

- :func:`load_toy_clip` -> :class:`weakseg.backbones.CLIPBackbone` from ``weights/clip`` (open_clip hf-hub layout);
- :func:`load_toy_sd` -> :class:`weakseg.backbones.StableDiffusionBackbone` from ``weights/sd`` (diffusers layout).

The weights are committed in the package (fp16 safetensors; loaded as float32) and made by
``python -m weakseg.toy.train`` (:mod:`weakseg.toy.train`); ``python -m weakseg.toy.signal``
measures what they learned (:mod:`weakseg.toy.signal`). Loading never touches the network.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from weakseg.core import MODEL_SOURCES

__all__ = ["WEIGHTS_DIR", "TRAIN_COMMAND", "load_toy_clip", "load_toy_sd", "toy_weights_available", "toy_weights"]

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
TRAIN_COMMAND = "python -m weakseg.toy.train"
_CLIP_FILES = ("open_clip_config.json", "open_clip_model.safetensors")
_SD_FOLDERS = ("vae", "unet", "text_encoder", "tokenizer", "scheduler")


def _check_dir(path: Path, what: str, stage: str, expected: str, present) -> None:
    if not path.is_dir() or not present(path):
        raise FileNotFoundError(
            f"toy {what} weights not found at {str(path)!r} (expected {expected}); train them with "
            f"`{TRAIN_COMMAND} --stage {stage}` (writes {WEIGHTS_DIR}/{path.name} by default) or pass path=")


def toy_weights_available(which: str = "clip", path: str | os.PathLike | None = None) -> bool:
    """Whether the committed (or given) ``"clip"`` or ``"sd"`` weights are present."""
    if which not in ("clip", "sd"):
        raise ValueError(f"which must be 'clip' or 'sd', got {which!r}")
    p = Path(path) if path is not None else WEIGHTS_DIR / which
    if which == "clip":
        return all((p / f).is_file() for f in _CLIP_FILES)
    return all((p / f).is_dir() for f in _SD_FOLDERS)


#: backbone family -> folder of its toy weights under WEIGHTS_DIR
_FAMILY_DIRS = {"clip": "clip", "clip-dense": "clip", "stable-diffusion": "sd"}


@MODEL_SOURCES.register("toy")
def toy_weights(family: str | None, name: str | None = None) -> Path:
    """The ``toy`` model source: the committed toy weights of a backbone ``family`` (``"clip"``,
    ``"clip-dense"``, ``"stable-diffusion"``; None: the whole weights folder). Raises FileNotFoundError
    naming the path and the training command when they are missing, ValueError for a family without toy
    weights."""
    if name is not None:
        raise ValueError(f"toy: the toy source has one model per family; got toy:{name}")
    if family is None:
        return WEIGHTS_DIR
    if family not in _FAMILY_DIRS:
        raise ValueError(f"toy: there are no toy weights for the {family!r} backbone; toy weights exist for "
                         f"{', '.join(sorted(_FAMILY_DIRS))}")
    which = _FAMILY_DIRS[family]
    p = WEIGHTS_DIR / which
    if which == "clip":
        _check_dir(p, "CLIP", "clip", " and ".join(_CLIP_FILES), lambda q: toy_weights_available("clip", q))
    else:
        _check_dir(p, "Stable Diffusion", "unet", "a diffusers folder with " + ", ".join(_SD_FOLDERS),
                   lambda q: toy_weights_available("sd", q))
    return p


def load_toy_clip(path: str | os.PathLike | None = None, device="cpu", dtype: torch.dtype = torch.float32):
    """The toy CLIP (:class:`weakseg.backbones.CLIPBackbone`) from ``path`` (default ``WEIGHTS_DIR/clip``), in
    ``dtype`` (float32 by default, whatever the stored precision). Raises FileNotFoundError naming the path
    and the training command when the weights are missing."""
    from weakseg.backbones.clip import CLIPBackbone

    p = Path(path) if path is not None else WEIGHTS_DIR / "clip"
    _check_dir(p, "CLIP", "clip", " and ".join(_CLIP_FILES), lambda q: toy_weights_available("clip", q))
    return CLIPBackbone.from_pretrained(str(p), device=device, dtype=dtype)


def load_toy_sd(path: str | os.PathLike | None = None, device="cpu", dtype: torch.dtype = torch.float32):
    """The toy Stable Diffusion (:class:`weakseg.backbones.StableDiffusionBackbone`) from ``path`` (default
    ``WEIGHTS_DIR/sd``), in ``dtype`` (float32 by default). Raises FileNotFoundError naming the path and
    the training command when the weights are missing."""
    from weakseg.backbones.diffusion import StableDiffusionBackbone

    p = Path(path) if path is not None else WEIGHTS_DIR / "sd"
    _check_dir(p, "Stable Diffusion", "unet", "a diffusers folder with " + ", ".join(_SD_FOLDERS),
               lambda q: toy_weights_available("sd", q))
    return StableDiffusionBackbone.from_pretrained(str(p), device=device, dtype=dtype)
