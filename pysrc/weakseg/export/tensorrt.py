"""TensorRT: an engine built from the exported ``model.onnx`` through the TensorRT Python API, and a
runner. Needs ``import tensorrt`` and a CUDA device; everything else in weakseg works without it.

``build_engine`` parses the ONNX file (``trt.OnnxParser``), adds one optimisation profile over the two
dynamic inputs — ``images`` (B, 3, S, S) with B in [min, opt, max] and ``text_embeddings`` (C, D) with C
in [min, opt, max] — enables FP16 (``BuilderFlag.FP16``) and writes the serialised plan atomically.
``TensorRTEngine`` deserialises it, sets the input shapes per call and runs ``execute_async_v3`` on the
current torch CUDA stream with torch-allocated device buffers (``set_tensor_address``).
"""

from __future__ import annotations

from pathlib import Path

import torch

from weakseg.export.files import atomic_path

__all__ = ["build_engine", "TensorRTEngine", "DEFAULT_PROFILE"]

DEFAULT_PROFILE = {"batch": (1, 4, 16), "classes": (1, 21, 256)}


def _trt():
    try:
        import tensorrt as trt
    except ImportError as e:
        raise ImportError("--format tensorrt / --engine tensorrt need TensorRT's Python package (`import tensorrt` "
                          f"failed: {e}); export --format onnx or aoti instead") from None
    return trt


def build_engine(onnx_path: str | Path, engine_path: str | Path, input_size: int, embed_dim: int, *,
                 batch: tuple[int, int, int] = DEFAULT_PROFILE["batch"],
                 classes: tuple[int, int, int] = DEFAULT_PROFILE["classes"], fp16: bool = True,
                 workspace_bytes: int = 2 << 30) -> dict[str, str]:
    """Build ``engine_path`` from ``onnx_path`` with the (min, opt, max) profile of batch and classes."""
    trt = _trt()
    for name, r in (("batch", batch), ("classes", classes)):
        if len(r) != 3 or not 1 <= r[0] <= r[1] <= r[2]:
            raise ValueError(f"{name}: expected (min, opt, max) with 1 <= min <= opt <= max, got {r}")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if hasattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH") and int(trt.__version__.split(".")[0]) < 10:
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(Path(onnx_path).read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    S, D = int(input_size), int(embed_dim)
    profile = builder.create_optimization_profile()
    profile.set_shape("images", (batch[0], 3, S, S), (batch[1], 3, S, S), (batch[2], 3, S, S))
    profile.set_shape("text_embeddings", (classes[0], D), (classes[1], D), (classes[2], D))
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path}")
    with atomic_path(engine_path) as tmp:
        tmp.write_bytes(bytes(plan))
    return {"tensorrt": Path(engine_path).name}


class TensorRTEngine:
    """``engine(images (B, 3, S, S), text (C, D)) -> logits (B, C, S, S)`` float32 on the CUDA device."""

    def __init__(self, engine_path: str | Path, device: str | torch.device = "cuda"):
        trt = _trt()
        self.device = torch.device(device)
        if self.device.type != "cuda":
            raise ValueError(f"--device: TensorRT runs on a CUDA device, got {self.device}")
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
        if self.engine is None:
            raise RuntimeError(f"{engine_path}: not a TensorRT engine for this TensorRT version / GPU")
        self.context = self.engine.create_execution_context()

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        images = images.to(self.device, torch.float32).contiguous()
        text = text.to(self.device, torch.float32).contiguous()
        ctx = self.context
        ctx.set_input_shape("images", tuple(images.shape))
        ctx.set_input_shape("text_embeddings", tuple(text.shape))
        out = torch.empty(tuple(ctx.get_tensor_shape("logits")), dtype=torch.float32, device=self.device)
        ctx.set_tensor_address("images", images.data_ptr())
        ctx.set_tensor_address("text_embeddings", text.data_ptr())
        ctx.set_tensor_address("logits", out.data_ptr())
        stream = torch.cuda.current_stream(self.device)
        if not ctx.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed")
        return out
