"""End-to-end throughput of an exported model: decode -> resize/normalise -> model -> labels.

Verify, then time (as benchmarks/ do): the engine's logits and labels on the model directory's check batch
(``check.safetensors``: images and the exported program's logits for them, written at export) are compared
first; a mismatch beyond the tolerance aborts. Only the engine's own files are loaded.
On CUDA, decoding (``torchvision.io.decode_jpeg(device="cuda")`` for JPEG), resizing, normalising and the
label post-processing run on the GPU and the torch engine replays a CUDA graph; on the CPU everything
runs on the CPU.
"""

from __future__ import annotations

import io
import json
import platform
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from weakseg.export.files import read_check, read_manifest
from weakseg.export.runner import ExportedSegmenter, postprocess

__all__ = ["bench_e2e", "synthetic_images", "TOLERANCE"]

# max |logits - reference| allowed before timing (fp32 engines; TensorRT runs fp16). The reference was computed
# on the CPU at export; on CUDA, convolutions may run in TF32, hence the looser bound there.
TOLERANCE = {"torch": 1e-4, "onnx": 1e-3, "aoti": 1e-3, "tensorrt": 5e-2}
CUDA_TOLERANCE = 2e-2
MIN_LABEL_AGREEMENT = {"torch": 1.0, "onnx": 0.999, "aoti": 0.999, "tensorrt": 0.98}


def synthetic_images(n: int, height: int, width: int, fmt: str = "png", seed: int = 0) -> list[bytes]:
    """``n`` encoded RGB images of smooth random blobs (deterministic)."""
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        low = torch.rand(3, 6, 8, generator=g)
        img = torch.nn.functional.interpolate(low[None], size=(height, width), mode="bilinear",
                                              align_corners=False)[0]
        arr = (img * 255).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="PNG" if fmt == "png" else "JPEG", quality=95)
        out.append(buf.getvalue())
    return out


def _decode(blobs: list[bytes], device: torch.device) -> torch.Tensor:
    import torchvision.io as tio

    datas = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs]
    if device.type == "cuda" and all(b[:2] == b"\xff\xd8" for b in blobs):
        return torch.stack(tio.decode_jpeg(datas, device=device))
    return torch.stack([tio.decode_image(d, mode=tio.ImageReadMode.RGB) for d in datas]).to(device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_e2e(model_dir: str | Path, engine: str, *, device: str = "cpu", images: int = 32, batch: int = 4,
              height: int = 96, width: int = 128, warmup: int = 2, repeats: int = 3,
              threads: int | None = None) -> dict[str, Any]:
    """Verify ``engine`` against the torch reference, then time the whole pipeline; returns a result dict."""
    dev = torch.device(device)
    if threads:
        torch.set_num_threads(int(threads))
    manifest = read_manifest(model_dir)
    check_images, check_logits = read_check(model_dir)
    kw = {"threads": threads} if engine == "onnx" else {}
    seg = ExportedSegmenter(model_dir, engine, dev, **kw)
    fmt = "jpeg" if dev.type == "cuda" else "png"
    blobs = synthetic_images(images, height, width, fmt=fmt)
    batches = [blobs[i:i + batch] for i in range(0, len(blobs), batch)]

    # verify on the check batch
    with torch.no_grad():
        got = seg.logits(check_images.to(dev)).float().cpu()
    if got.shape != check_logits.shape:
        raise RuntimeError(f"engine {engine}: logits {tuple(got.shape)} on the check batch, expected "
                           f"{tuple(check_logits.shape)}; not timing")
    tol = TOLERANCE[engine] if dev.type == "cpu" else max(TOLERANCE[engine], CUDA_TOLERANCE)
    err = float((got - check_logits).abs().max())
    bg = manifest["background"]
    size = tuple(check_images.shape[-2:])
    agree = float((postprocess(got, bg, size) == postprocess(check_logits, bg, size)).float().mean())
    if err > tol or agree < MIN_LABEL_AGREEMENT[engine]:
        raise RuntimeError(f"engine {engine}: output differs from the exported program's on the check batch "
                           f"(max |diff| {err:.3g} > {tol} or label agreement {agree:.4f} < "
                           f"{MIN_LABEL_AGREEMENT[engine]}); not timing")

    def run_all():
        for b in batches:
            with torch.no_grad():
                lab = seg.segment(_decode(b, dev))
            lab.cpu()

    for _ in range(warmup):
        run_all()
    times = []
    for _ in range(repeats):
        _sync(dev)
        t0 = time.perf_counter()
        run_all()
        _sync(dev)
        times.append(time.perf_counter() - t0)
    best = min(times)
    return {"engine": engine, "device": str(dev), "model": str(model_dir), "method": manifest.get("method"),
            "input_size": manifest["input_size"], "classes": len(seg.classes), "images": images, "batch": batch,
            "image_size": [height, width], "repeats": repeats, "seconds_best": best,
            "images_per_s": images / best, "ms_per_image": 1000 * best / images,
            "verify": {"max_abs_diff": err, "tolerance": tol, "label_agreement": agree},
            "threads": torch.get_num_threads(), "torch": torch.__version__, "machine": platform.machine(),
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d")}


def write_results(results: list[dict[str, Any]], out_dir: str | Path, command: str, machine: str) -> Path:
    """Append-free: one markdown + json pair named by date under ``out_dir``."""
    from weakseg.export.files import write_bytes, write_json

    out = Path(out_dir)
    stamp = results[0]["date"] if results else datetime.now(timezone.utc).strftime("%Y-%m-%d")
    write_json(out / f"e2e_{stamp}.json", {"command": command, "machine": machine, "results": results})
    lines = [f"# End-to-end (decode -> resize/normalise -> model -> labels), {stamp}", "",
             f"machine: {machine}", "", f"command: `{command}`", "",
             "| engine | device | method | S | classes | batch | images/s | ms/image | max abs diff vs check batch | label agreement |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['engine']} | {r['device']} | {r['method']} | {r['input_size']} | {r['classes']} | "
                     f"{r['batch']} | {r['images_per_s']:.1f} | {r['ms_per_image']:.2f} | "
                     f"{r['verify']['max_abs_diff']:.2e} | {r['verify']['label_agreement']:.4f} |")
    p = out / f"e2e_{stamp}.md"
    write_bytes(p, ("\n".join(lines) + "\n").encode())
    return p


if __name__ == "__main__":  # pragma: no cover
    print(json.dumps(bench_e2e("outputs/export/onnx", "onnx"), indent=2))
