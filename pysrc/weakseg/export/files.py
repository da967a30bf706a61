"""Exported files: atomic writes, the class text-embeddings files and the model directory's manifest.

A model directory (``weakseg export NAME --format F --out DIR``) holds

* ``export.json`` — the manifest: method, format(s), input size, mean/std, background rule, classes,
  the files below, the versions used;
* ``model.onnx`` / ``text.onnx`` (onnx), ``model.engine`` (tensorrt, next to its ``model.onnx``),
  ``model.pt2`` (aoti: the AOTInductor package), ``program.pt2`` (always: the ``torch.export`` program
  of the image graph, the PyTorch reference the runners check against);
* ``check.safetensors`` — a check batch written at export time: ``images`` (B, 3, S, S) uint8 and the
  ``logits`` the exported program gave for them with the exported class embeddings (fp32, on the CPU);
  every engine is verified against it, so no engine needs another engine's files;
* ``embeddings.safetensors`` (tensor ``text_embeddings`` (C, D) float32, metadata ``classes``) and the
  same rows as ``embeddings.bin`` (raw little-endian float32, row-major C × D) with the sidecar
  ``embeddings.json`` (a flat JSON object the C++ app reads: ``num_classes``, ``dim``, ``dtype``,
  ``byte_order``, ``file``, ``input_size``, ``mean``, ``std``, ``background_kind``,
  ``background_value``, ``classes``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import torch

from weakseg import io as _io
from weakseg.io import atomic_path, write_bytes

__all__ = ["atomic_path", "write_bytes", "write_json", "write_embeddings", "read_embeddings", "read_manifest",
           "write_check", "read_check", "load_program", "UntrustedModelError", "MANIFEST", "EMBEDDINGS_JSON", "CHECK"]

MANIFEST = "export.json"
EMBEDDINGS_JSON = "embeddings.json"
CHECK = "check.safetensors"


class UntrustedModelError(ValueError):
    """A model file holds something weakseg will not load because loading it could run code."""


def write_json(path: str | os.PathLike, obj: Any) -> None:
    _io.write_json(path, obj)


def write_embeddings(out_dir: str | os.PathLike, class_names: Sequence[str], emb: torch.Tensor,
                     info: dict[str, Any]) -> dict[str, str]:
    """The class text embeddings as safetensors + raw float32 .bin + JSON sidecar; returns the file names."""
    out = Path(out_dir)
    emb = emb.detach().float().cpu().contiguous()
    if emb.dim() != 2 or emb.shape[0] != len(class_names):
        raise ValueError(f"embeddings: expected ({len(class_names)}, D), got {tuple(emb.shape)}")
    _io.save_safetensors({"text_embeddings": emb}, out / "embeddings.safetensors",
                         metadata={"format": "weakseg-text-embeddings", "classes": json.dumps(list(class_names))})
    raw = emb.numpy().astype("<f4", copy=False).tobytes(order="C")
    write_bytes(out / "embeddings.bin", raw)
    bg = info.get("background", {"kind": "none"})
    side = {"format": "weakseg-text-embeddings", "num_classes": int(emb.shape[0]), "dim": int(emb.shape[1]),
            "dtype": "float32", "byte_order": "little", "file": "embeddings.bin",
            "input_size": int(info["input_size"]), "mean": list(info["mean"]), "std": list(info["std"]),
            "background_kind": bg.get("kind", "none"), "background_value": float(bg.get("value", 0.0)),
            "classes": list(class_names)}
    write_json(out / EMBEDDINGS_JSON, side)
    return {"safetensors": "embeddings.safetensors", "bin": "embeddings.bin", "json": EMBEDDINGS_JSON}


def read_embeddings(model_dir: str | os.PathLike) -> tuple[list[str], torch.Tensor]:
    """(classes, (C, D) float32) from ``embeddings.json`` + ``embeddings.bin`` (as the C++ app reads them)."""
    import numpy as np

    d = Path(model_dir)
    side = json.loads((d / EMBEDDINGS_JSON).read_text())
    C, D = int(side["num_classes"]), int(side["dim"])
    arr = np.fromfile(d / side["file"], dtype="<f4")
    if arr.size != C * D:
        raise ValueError(f"{d / side['file']}: expected {C}x{D} float32 values, found {arr.size}")
    return list(side["classes"]), torch.from_numpy(arr.astype(np.float32).reshape(C, D))


def read_manifest(model_dir: str | os.PathLike) -> dict[str, Any]:
    p = Path(model_dir) / MANIFEST
    if not p.is_file():
        raise FileNotFoundError(f"--model: {str(Path(model_dir))!r} is not an exported model directory (no {MANIFEST}; "
                                f"run `weakseg export NAME --format F --out DIR`)")
    return json.loads(p.read_text())


def write_check(out_dir: str | os.PathLike, images: torch.Tensor, logits: torch.Tensor) -> str:
    """The check batch (uint8 images and the exported program's fp32 logits for them); returns the file name."""
    if images.dtype != torch.uint8 or images.dim() != 4 or logits.dim() != 4 or logits.shape[0] != images.shape[0]:
        raise ValueError(f"check batch: expected uint8 (B, 3, H, W) images and (B, C, S, S) logits, got "
                         f"{images.dtype} {tuple(images.shape)} and {tuple(logits.shape)}")
    _io.save_safetensors({"images": images, "logits": logits.float()}, Path(out_dir) / CHECK,
                         metadata={"format": "weakseg-export-check"})
    return CHECK


def read_check(model_dir: str | os.PathLike) -> tuple[torch.Tensor, torch.Tensor]:
    """(images uint8 (B, 3, H, W), logits fp32 (B, C, S, S)) of ``check.safetensors``."""
    from weakseg.core import read_safetensors

    p = Path(model_dir) / CHECK
    if not p.is_file():
        raise FileNotFoundError(f"--model: {str(Path(model_dir))!r} has no {CHECK} (exported before weakseg wrote "
                                f"check batches); export it again with `weakseg export NAME --format F --out DIR`")
    tensors, meta = read_safetensors(p, "--model check batch")
    images, logits = tensors.get("images"), tensors.get("logits")
    if (meta.get("format") != "weakseg-export-check" or images is None or logits is None
            or images.dtype != torch.uint8 or images.dim() != 4 or logits.dtype != torch.float32
            or logits.dim() != 4 or logits.shape[0] != images.shape[0] or not bool(torch.isfinite(logits).all())):
        raise ValueError(f"--model: {str(p)!r} is not a valid check batch (expected uint8 images (B, 3, H, W) and "
                         f"finite float32 logits (B, C, S, S)); export the model again")
    return images, logits


# What a torch.export archive may hold for weakseg to load it: the program as JSON, tensor payloads as raw
# bytes (``use_pickle: false``), and the sample inputs, which torch reads with ``torch.load`` (forced to
# weights_only below). Pickled tensors, pickled/opaque constants (``pickle.loads``), TorchScript objects,
# legacy ``.pt`` weight files and compiled AOTInductor code are refused.
_PICKLED_PREFIXES = ("custom_obj_", "opaque_obj_")


def _check_program_archive(path: Path) -> None:
    import zipfile

    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise ValueError(f"--model: {str(path)!r} is not a torch.export archive ({e})") from None
    with zf:
        names = zf.namelist()
        bad: list[str] = []
        for n in names:
            rel = n.split("/", 1)[1] if "/" in n else n  # entries sit under the archive's root folder
            base = rel.rsplit("/", 1)[-1]
            if rel.startswith(("data/aotinductor/", "data/executorch/", "data/mtia")):
                bad.append(f"{rel} (compiled code)")
            elif rel.startswith(("data/weights/", "data/constants/")) and base.endswith(".pt"):
                bad.append(f"{rel} (legacy pickled weights)")
            elif rel.startswith("data/constants/") and base.startswith(_PICKLED_PREFIXES):
                bad.append(f"{rel} (pickled object)")
            elif rel.startswith(("data/weights/", "data/constants/")) and base.endswith("_config.json"):
                try:
                    config = json.loads(zf.read(n)).get("config", {})
                except (ValueError, AttributeError):
                    raise ValueError(f"--model: {str(path)!r}: unreadable payload config {rel}") from None
                if not isinstance(config, dict):
                    raise ValueError(f"--model: {str(path)!r}: unreadable payload config {rel}")
                bad += [f"{rel}: {k} (pickled tensor)" for k, v in config.items()
                        if not isinstance(v, dict) or v.get("use_pickle", False) is not False]
        if bad:
            raise UntrustedModelError(
                f"--model: {str(path)!r} holds entries that would be unpickled or executed when loaded: "
                f"{', '.join(bad[:4])}{' ...' if len(bad) > 4 else ''}; weakseg loads only programs with raw "
                f"tensor payloads (as `weakseg export` writes them); re-export the model")


def load_program(path: str | os.PathLike) -> torch.export.ExportedProgram:
    """``torch.export.load`` of a program weakseg exported, in a mode that cannot run code from the file:
    the archive is checked first (:func:`_check_program_archive`), and every ``torch.load`` inside the load
    is forced to ``weights_only`` (``TORCH_FORCE_WEIGHTS_ONLY_LOAD``), so a pickle payload planted where
    torch reads one raises :class:`UntrustedModelError` instead of running."""
    import pickle

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--model: no such file {str(p)!r}")
    _check_program_archive(p)
    saved = {k: os.environ.get(k) for k in ("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")}
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    os.environ.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)
    try:
        return torch.export.load(str(p))
    except pickle.UnpicklingError:
        raise UntrustedModelError(f"--model: {str(p)!r} holds a pickle that is not plain tensor data (refused by "
                                  f"torch.load in weights-only mode); re-export the model") from None
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
