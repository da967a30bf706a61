"""Running an exported model directory: the engines and the one pre/post-processing definition that the
C++ app (export/cpp) mirrors.

Pre-processing: RGB uint8 (B, 3, H, W) -> float -> bilinear resize to S×S (align_corners=False, no
antialiasing) -> (x / 255 − mean) / std. Post-processing: ``labels_from_logits`` with the background
rule at S×S, then nearest resampling to (H, W) with integer source indices ``(y · S) // H`` — the same
integer arithmetic in Python and C++, so label maps agree except where the model's scores tie.

Engines (``make_engine(kind, model_dir, device)``), each ``engine(images, text_embeddings) -> logits``:
``torch`` (``program.pt2``, the ``torch.export`` program, loaded by
:func:`weakseg.export.files.load_program`, which refuses pickled entries; with ``cuda_graphs`` on CUDA, replayed from a
captured CUDA graph per input shape), ``onnx`` (onnxruntime; CUDA provider when present), ``aoti``
(``torch._inductor.aoti_load_package``), ``tensorrt`` (:mod:`weakseg.export.tensorrt`).
Only the files of the engine asked for are opened. ``aoti`` and ``tensorrt`` load compiled code
(a shared library; a serialized engine that may carry plugins): use them only on model directories
you trust as you would trust a program (README, Deployment).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from weakseg.export.files import load_program, read_embeddings, read_manifest
from weakseg.export.graphs import labels_from_logits

__all__ = ["ENGINES", "make_engine", "preprocess", "postprocess", "ExportedSegmenter"]

ENGINES = ("torch", "onnx", "aoti", "tensorrt")


def preprocess(images: torch.Tensor, size: int, mean, std) -> torch.Tensor:
    """uint8 (B, 3, H, W) on any device -> normalised float32 (B, 3, S, S) on that device."""
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images: expected RGB uint8 (B, 3, H, W), got {images.dtype} {tuple(images.shape)}")
    x = images.float()
    if tuple(x.shape[-2:]) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=False)
    m = torch.tensor(mean, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    return (x / 255.0 - m) / s


def postprocess(logits: torch.Tensor, background: dict[str, Any], out_size: tuple[int, int]) -> torch.Tensor:
    """(B, C, S, S) -> int64 labels (B, H, W) (background rule, then integer nearest resampling)."""
    labels = labels_from_logits(logits.float(), background)
    S_h, S_w = labels.shape[-2:]
    H, W = out_size
    if (H, W) == (S_h, S_w):
        return labels
    iy = torch.arange(H, device=labels.device) * S_h // H
    ix = torch.arange(W, device=labels.device) * S_w // W
    return labels[:, iy][:, :, ix]


class _TorchEngine:
    def __init__(self, model_dir: Path, device: torch.device, cuda_graphs: bool = True):
        self.module = load_program(model_dir / "program.pt2").module().to(device)
        self.device = device
        self.cuda_graphs = cuda_graphs and device.type == "cuda"
        self._graphs: dict[tuple, tuple] = {}

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        if not self.cuda_graphs:
            return self.module(images, text)
        key = (tuple(images.shape), tuple(text.shape))
        if key not in self._graphs:
            xi, xt = images.clone(), text.clone()
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                for _ in range(2):
                    self.module(xi, xt)
            torch.cuda.current_stream().wait_stream(s)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                out = self.module(xi, xt)
            self._graphs[key] = (g, xi, xt, out)
        g, xi, xt, out = self._graphs[key]
        xi.copy_(images)
        xt.copy_(text)
        g.replay()
        return out


class _OnnxEngine:
    def __init__(self, model_dir: Path, device: torch.device, threads: int | None = None):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = int(threads)
            opts.inter_op_num_threads = 1
        providers = ["CPUExecutionProvider"]
        if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers = [("CUDAExecutionProvider", {"device_id": device.index or 0}), "CPUExecutionProvider"]
        self.session = ort.InferenceSession(str(model_dir / "model.onnx"), opts, providers=providers)
        self.device = device

    def __call__(self, images: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        out = self.session.run(["logits"], {"images": images.detach().cpu().numpy(),
                                            "text_embeddings": text.detach().cpu().numpy()})[0]
        return torch.from_numpy(out).to(self.device)


class _AotiEngine:
    def __init__(self, model_dir: Path, device: torch.device):
        self.runner = torch._inductor.aoti_load_package(str(model_dir / "model.pt2"))
        self.device = device

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return self.runner(images.to(self.device), text.to(self.device))


def make_engine(kind: str, model_dir: str | Path, device: str | torch.device = "cpu", **kw) -> Callable:
    """An engine over the exported files of ``model_dir`` (see the module docstring)."""
    if kind not in ENGINES:
        raise ValueError(f"--engine: unknown engine {kind!r}; expected one of {', '.join(ENGINES)}")
    d = Path(model_dir)
    read_manifest(d)
    device = torch.device(device)
    need = {"torch": "program.pt2", "onnx": "model.onnx", "aoti": "model.pt2", "tensorrt": "model.engine"}[kind]
    if not (d / need).is_file():
        raise FileNotFoundError(f"--model: {str(d)!r} has no {need} for --engine {kind} (export it with --format "
                                f"{ {'torch': 'onnx', 'onnx': 'onnx', 'aoti': 'aoti', 'tensorrt': 'tensorrt'}[kind]})")
    if kind == "torch":
        return _TorchEngine(d, device, **kw)
    if kind == "onnx":
        return _OnnxEngine(d, device, **kw)
    if kind == "aoti":
        return _AotiEngine(d, device)
    from weakseg.export.tensorrt import TensorRTEngine

    return TensorRTEngine(d / "model.engine", device)


class ExportedSegmenter:
    """uint8 images -> label maps through an engine, with the exported class embeddings (or others)."""

    def __init__(self, model_dir: str | Path, engine: str = "torch", device: str | torch.device = "cpu", **kw):
        self.dir = Path(model_dir)
        self.manifest = read_manifest(self.dir)
        self.device = torch.device(device)
        self.classes, emb = read_embeddings(self.dir)
        self.text = emb.to(self.device)
        self.engine = make_engine(engine, self.dir, self.device, **kw)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        m = self.manifest
        x = preprocess(images.to(self.device), m["input_size"], m["mean"], m["std"])
        return self.engine(x, self.text)

    def segment(self, images: torch.Tensor) -> torch.Tensor:
        return postprocess(self.logits(images), self.manifest["background"], tuple(images.shape[-2:]))
