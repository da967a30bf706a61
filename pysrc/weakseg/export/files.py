"""Exported files: atomic writes, the class text-embeddings files and the model directory's manifest.

A model directory (``weakseg export NAME --format F --out DIR``) holds

* ``export.json`` — the manifest: method, format(s), input size, mean/std, background rule, classes,
  the files below, the versions used;
* ``model.onnx`` / ``text.onnx`` (onnx), ``model.engine`` (tensorrt, next to its ``model.onnx``),
  ``model.pt2`` (aoti: the AOTInductor package), ``program.pt2`` (always: the ``torch.export`` program
  of the image graph, the PyTorch reference the runners check against);
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
           "MANIFEST", "EMBEDDINGS_JSON"]

MANIFEST = "export.json"
EMBEDDINGS_JSON = "embeddings.json"


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
