"""Deployment: ONNX / AOTInductor / TensorRT exports of DiCLIP's graphs, the runners, the e2e bench and
the C++ app, on the tiny random CLIP (64 px, 8x8 grid).

Tolerances: ONNX Runtime (CPU) and AOTInductor vs eager PyTorch in float32: max |diff| <= 1e-4 on scores
in [0, 1] (measured ~1e-6); label maps must agree on >= 99 % of pixels (the rest are ties).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from _helpers import diclip_tiny_models, make_diclip

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from weakseg.export.exporter import OPSET, check_no_custom_ops, export  # noqa: E402
from weakseg.export.files import read_embeddings  # noqa: E402
from weakseg.export.graphs import labels_from_logits  # noqa: E402
from weakseg.export.runner import ExportedSegmenter, postprocess, preprocess  # noqa: E402

TOL = 1e-4
CLASSES = ["cat", "dog", "car"]
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def models():
    return diclip_tiny_models()


@pytest.fixture(scope="module")
def cam_method(models):
    return make_diclip(models, vce=False, refine=(), cam_source="patch")


@pytest.fixture(scope="module")
def graphs(cam_method):
    return cam_method.export_graphs()


@pytest.fixture(scope="module")
def onnx_dir(graphs, tmp_path_factory):
    d = tmp_path_factory.mktemp("onnx")
    export(graphs, "onnx", d, CLASSES)
    return d


@pytest.fixture(scope="module")
def aoti_dir(graphs, tmp_path_factory):
    d = tmp_path_factory.mktemp("aoti")
    export(graphs, "aoti", d, CLASSES)
    return d


def _inputs(B, C, D=32, S=64, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 3, S, S, generator=g)
    t = torch.nn.functional.normalize(torch.randn(C, D, generator=g), dim=-1)
    return x, t


def _images(B, H, W, seed=2):
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(B, 3, 5, 6, generator=g)
    up = torch.nn.functional.interpolate(low, size=(H, W), mode="bilinear", align_corners=False)
    return (up * 255).round().to(torch.uint8)


# ------------------------------------------------------------------------------------------- ONNX
@pytest.mark.parametrize("B,C", [(3, 5), (1, 1), (4, 2)])
def test_onnx_parity_dynamic_batch_and_classes(onnx_dir, graphs, B, C):
    x, t = _inputs(B, C)
    with torch.no_grad():
        want = graphs.image_model(x, t).numpy()
    sess = ort.InferenceSession(str(onnx_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(["logits"], {"images": x.numpy(), "text_embeddings": t.numpy()})[0]
    assert got.shape == (B, C, 64, 64)
    assert np.abs(got - want).max() <= TOL


def test_onnx_gpu_parity(onnx_dir, graphs):
    if "CUDAExecutionProvider" not in ort.get_available_providers() or not torch.cuda.is_available():
        pytest.skip("onnxruntime-gpu (CUDAExecutionProvider) and a CUDA device are not present")
    x, t = _inputs(3, 4)
    with torch.no_grad():
        want = graphs.image_model(x, t).numpy()
    sess = ort.InferenceSession(str(onnx_dir / "model.onnx"), providers=["CUDAExecutionProvider"])
    got = sess.run(["logits"], {"images": x.numpy(), "text_embeddings": t.numpy()})[0]
    assert np.abs(got - want).max() <= 1e-3


def test_onnx_checker_opset_metadata_dynamic_dims(onnx_dir):
    m = onnx.load(str(onnx_dir / "model.onnx"))
    onnx.checker.check_model(m, full_check=True)
    assert OPSET >= 17
    assert [o.version for o in m.opset_import if o.domain in ("", "ai.onnx")] == [OPSET]
    props = {p.key: p.value for p in m.metadata_props}
    assert json.loads(props["weakseg.classes"]) == CLASSES
    assert props["weakseg.input_size"] == "64"
    assert len(json.loads(props["weakseg.mean"])) == 3 and len(json.loads(props["weakseg.std"])) == 3
    assert json.loads(props["weakseg.background"]) == {"kind": "threshold", "value": 0.5}
    ins = {i.name: i for i in m.graph.input}
    img_dims = ins["images"].type.tensor_type.shape.dim
    txt_dims = ins["text_embeddings"].type.tensor_type.shape.dim
    assert img_dims[0].dim_param and not img_dims[0].dim_value
    assert [d.dim_value for d in img_dims[1:]] == [3, 64, 64]
    assert txt_dims[0].dim_param and txt_dims[1].dim_value == 32
    check_no_custom_ops(m)
    _no_cubic_resize(m)  # the grid is fixed; only bilinear upsampling of the maps



def _no_cubic_resize(m) -> None:
    for n in m.graph.node:
        if n.op_type == "Resize":
            modes = [a.s for a in n.attribute if a.name == "mode"]
            assert modes and modes[0] != b"cubic"


def test_synseg_exports_through_the_cli_with_parity(tmp_path, capsys):
    """SynSeg (tiny random CLIP, untrained head) at 96 px, a grid (12x12) other than the CLIP's native 8x8:
    the position embedding is resampled at export, so the graph has no cubic resize; onnxruntime equals the
    eager graph (whose parity with the method's scores is test_synseg.py::test_export_graphs_parity) for
    batch and class counts other than the trace's."""
    import weakseg
    from weakseg.export.exporter import graphs_of

    out = tmp_path / "synseg"
    rc, err = _cli(["export", "synseg", "--format", "onnx", "--out", str(out), "--classes", "circle,square",
                    "--set", "preset=tiny", "size=96", "views=1"], capsys)
    assert rc == 0, err
    m = onnx.load(str(out / "model.onnx"))
    onnx.checker.check_model(m, full_check=True)
    _no_cubic_resize(m)
    props = {p.key: p.value for p in m.metadata_props}
    assert json.loads(props["weakseg.classes"]) == ["circle", "square"] and props["weakseg.input_size"] == "96"
    method = weakseg.create("synseg", preset="tiny", size=96, views=1)
    graphs = graphs_of(method, "synseg")
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    for B, C in [(1, 4), (3, 1)]:
        x, t = _inputs(B, C, D=graphs.embed_dim, S=96)
        with torch.no_grad():
            want = graphs.image_model(x, t).numpy()
        got = sess.run(["logits"], {"images": x.numpy(), "text_embeddings": t.numpy()})[0]
        assert got.shape == (B, C, 96, 96) and np.abs(got - want).max() <= TOL

def test_text_graph_parity_and_embedding_files(onnx_dir, graphs):
    m = onnx.load(str(onnx_dir / "text.onnx"))
    onnx.checker.check_model(m, full_check=True)
    tokens = graphs.tokenize(["a photo of a cat.", "a photo of a red car.", "x", "a photo of a tree."])
    with torch.no_grad():
        want = graphs.text_model(tokens).numpy()
    sess = ort.InferenceSession(str(onnx_dir / "text.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"tokens": tokens.numpy()})[0]
    assert got.shape == want.shape == (4, 32)
    assert np.abs(got - want).max() <= TOL
    from safetensors.torch import load_file

    classes, emb = read_embeddings(onnx_dir)
    assert classes == CLASSES
    st = load_file(str(onnx_dir / "embeddings.safetensors"))["text_embeddings"]
    assert torch.equal(st, emb)
    assert torch.allclose(emb, graphs.text_embeddings(CLASSES), atol=1e-6)
    raw = np.frombuffer((onnx_dir / "embeddings.bin").read_bytes(), dtype="<f4")
    assert raw.size == len(CLASSES) * 32
    side = json.loads((onnx_dir / "embeddings.json").read_text())
    assert side["num_classes"] == 3 and side["dim"] == 32 and side["byte_order"] == "little"


def test_cam_graph_matches_diclip_segment(cam_method, onnx_dir):
    """The exported CAM graph + the threshold rule reproduce DiCLIP.segment (vce off, no refinement,
    patch CAM) on images already at the input size."""
    images = _images(2, 64, 64)
    out = cam_method.segment(images, ["background"] + CLASSES)
    seg = ExportedSegmenter(onnx_dir, "onnx")
    labels = seg.segment(images)
    assert labels.shape == out.labels.shape
    assert (labels == out.labels).float().mean() >= 0.99
    scores = seg.logits(images)
    assert torch.allclose(scores, out.scores[:, 1:], atol=1e-4)


def test_head_graph_selects_trained_classes(models, tmp_path):
    from weakseg.methods.diclip.modules import SegHead

    dc = make_diclip(models)
    clip = dc.clip
    names = ["background", "cat", "dog"]
    dc.head = SegHead(clip.width, clip.num_layers, len(names), dim=32, blocks=1, heads=4).eval()
    dc.head_classes = names
    g = dc.export_graphs()
    assert g.background == {"kind": "none"} and list(g.default_classes) == names
    images = _images(2, 64, 64)
    x = preprocess(images, g.input_size, g.mean, g.std)
    pick = ["dog", "background"]
    with torch.no_grad():
        got = g.image_model(x, g.text_embeddings(pick))
        ref = dc.head_logits(images.float())
    ref = torch.nn.functional.interpolate(ref, size=(64, 64), mode="bilinear", align_corners=False)
    assert torch.allclose(got, ref[:, [2, 0]], atol=1e-4)
    # the head graph through the ONNX exporter with dynamic B and C, and the default (trained) class list
    d = tmp_path / "head"
    manifest = export(g, "onnx", d, None)
    assert manifest["classes"] == names
    x3, t4 = x[:1].repeat(3, 1, 1, 1), g.text_embeddings(["cat", "dog", "background", "cat"])
    with torch.no_grad():
        want = g.image_model(x3, t4).numpy()
    sess = ort.InferenceSession(str(d / "model.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(["logits"], {"images": x3.numpy(), "text_embeddings": t4.numpy()})[0]
    assert got.shape == (3, 4, 64, 64) and np.abs(got - want).max() <= TOL


# ------------------------------------------------------------------------------------- bad args
def _cli(argv, capsys):
    from weakseg.cli import main

    rc = main(argv)
    return rc, capsys.readouterr().err


def test_bad_arguments_name_the_argument(tmp_path, capsys, graphs):
    out = str(tmp_path / "m")
    rc, err = _cli(["export", "diclip", "--format", "tflite", "--out", out], capsys)
    assert rc == 2 and "--format" in err and "tflite" in err
    rc, err = _cli(["export", "moduseg", "--format", "onnx", "--out", out], capsys)
    assert rc == 2 and "NAME" in err and "moduseg" in err and "export_graphs" in err and "diclip" in err
    rc, err = _cli(["export", "nosuchmethod", "--format", "onnx", "--out", out], capsys)
    assert rc == 2 and "nosuchmethod" in err
    rc, err = _cli(["export", "diclip", "--format", "onnx", "--out", out, "--classes", " , "], capsys)
    assert rc == 2 and "--classes" in err
    with pytest.raises(ValueError, match="--classes"):
        export(graphs, "onnx", tmp_path / "x", [])  # the cam graph has no default classes
    with pytest.raises(ValueError, match="--format"):
        export(graphs, "coreml", tmp_path / "x", CLASSES)
    rc, err = _cli(["bench", "e2e", "--engine", "onnx", "--model", str(tmp_path / "nothing")], capsys)
    assert rc == 2 and "--model" in err
    assert not (tmp_path / "x").exists() or not any((tmp_path / "x").iterdir())


def test_graphs_of_method_without_export_graphs():
    from weakseg.export.exporter import graphs_of

    class NoExport:
        pass

    with pytest.raises(ValueError, match="NAME: method 'plain' cannot be exported"):
        graphs_of(NoExport(), "plain")


def test_custom_op_check_rejects_weakseg_ops():
    import weakseg.ops  # noqa: F401  (registers the ops / their fakes)

    if not hasattr(torch.ops.weakseg, "erode"):
        pytest.skip("the weakseg op library is not registered")

    class UsesOp(torch.nn.Module):
        def forward(self, m):
            return torch.ops.weakseg.erode(m, [3, 3], 1)

    ep = torch.export.export(UsesOp(), (torch.ones(1, 8, 8, dtype=torch.uint8),))
    with pytest.raises(RuntimeError, match="weakseg custom ops"):
        check_no_custom_ops(ep)


# --------------------------------------------------------------------------------- AOTInductor
def test_aoti_round_trip(aoti_dir, graphs):
    runner = torch._inductor.aoti_load_package(str(aoti_dir / "model.pt2"))
    for B, C in ((3, 4), (1, 2)):
        x, t = _inputs(B, C, seed=B + C)
        with torch.no_grad():
            want = graphs.image_model(x, t)
        got = runner(x, t)
        got = got[0] if isinstance(got, (list, tuple)) else got
        assert got.shape == (B, C, 64, 64)
        assert (got - want).abs().max() <= TOL


# ----------------------------------------------------------------------------------- TensorRT
def test_tensorrt_engine(onnx_dir, graphs, tmp_path):
    pytest.importorskip("tensorrt", reason="TensorRT's Python package is not installed (cannot be on this machine)")
    if not torch.cuda.is_available():
        pytest.skip("TensorRT needs a CUDA device")
    from weakseg.export.tensorrt import TensorRTEngine, build_engine

    d = tmp_path / "trt"
    shutil.copytree(onnx_dir, d)
    build_engine(d / "model.onnx", d / "model.engine", 64, 32, batch=(1, 2, 4), classes=(1, 3, 8))
    eng = TensorRTEngine(d / "model.engine", "cuda")
    x, t = _inputs(3, 5)
    with torch.no_grad():
        want = graphs.image_model(x, t)
    got = eng(x.cuda(), t.cuda()).cpu()
    assert (got - want).abs().max() <= 5e-2
    bg = graphs.background
    assert (labels_from_logits(got, bg) == labels_from_logits(want, bg)).float().mean() >= 0.98
    seg = ExportedSegmenter(d, "tensorrt", "cuda")
    assert seg.segment(_images(2, 70, 90).cuda()).shape == (2, 70, 90)


# ------------------------------------------------------------------------------------ e2e bench
def test_bench_e2e_verifies_then_times(onnx_dir):
    from weakseg.export.bench_e2e import bench_e2e

    for engine in ("torch", "onnx"):
        r = bench_e2e(onnx_dir, engine, images=4, batch=2, height=48, width=40, warmup=1, repeats=1, threads=1)
        assert r["images_per_s"] > 0 and r["verify"]["max_abs_diff"] <= 1e-3
        assert r["verify"]["label_agreement"] >= 0.999


def test_bench_e2e_checks_each_engine_against_the_check_batch(onnx_dir, tmp_path):
    """The onnx bench opens model.onnx and the check batch only: with program.pt2 gone it still verifies, and a
    check batch that the engine does not reproduce stops it before timing."""
    from weakseg.export.bench_e2e import bench_e2e
    from weakseg.export.files import read_check, write_check

    d = tmp_path / "m"
    shutil.copytree(onnx_dir, d)
    (d / "program.pt2").unlink()
    r = bench_e2e(d, "onnx", images=2, batch=2, height=40, width=40, warmup=0, repeats=1, threads=1)
    assert r["verify"]["max_abs_diff"] <= 1e-3
    images, logits = read_check(d)
    write_check(d, images, logits + 0.5)
    with pytest.raises(RuntimeError, match="check batch"):
        bench_e2e(d, "onnx", images=2, batch=2, height=40, width=40, warmup=0, repeats=1, threads=1)
    (d / "check.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="check.safetensors"):
        bench_e2e(d, "onnx", images=2, batch=2, height=40, width=40, warmup=0, repeats=1, threads=1)


# ------------------------------------------------------------------------ tampered model files
class _Payload:
    """A pickle that, when loaded with weights_only=False, creates the file ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _rewrite_pt2(src: Path, dst: Path, edit) -> None:
    """Copy the zip archive ``src`` to ``dst`` with ``edit(name, data) -> (name, data) | None`` on each entry."""
    import zipfile

    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            out = edit(info.filename, zin.read(info.filename))
            if out is not None:
                zout.writestr(out[0], out[1])


def _evil_pickle(marker: Path) -> bytes:
    import io

    buf = io.BytesIO()
    torch.save({"x": _Payload(marker)}, buf)
    return buf.getvalue()


def test_tampered_program_is_refused_and_runs_nothing(onnx_dir, tmp_path):
    """A program.pt2 whose weights are marked as pickled (torch would unpickle them with weights_only=False), or
    whose sample inputs are replaced by a malicious pickle, is refused by the torch engine and by the e2e bench,
    and the payload never runs."""
    from weakseg.export.bench_e2e import bench_e2e
    from weakseg.export.files import UntrustedModelError, load_program

    assert load_program(onnx_dir / "program.pt2") is not None  # the exporter's own archive loads
    marker = tmp_path / "pwned"
    evil = _evil_pickle(marker)

    def pickled_weights(name, data):
        if name.endswith("_weights_config.json"):
            cfg = json.loads(data)
            first = next(iter(cfg["config"]))
            cfg["config"][first]["use_pickle"] = True
            return name, json.dumps(cfg).encode()
        return name, data

    def evil_weight_file(name, data):
        if "/data/weights/weight_" in name and name.rsplit("/", 1)[-1] == "weight_0":
            return name, evil
        return pickled_weights(name, data)

    def evil_sample_inputs(name, data):
        return (name, evil) if "/data/sample_inputs/" in name else (name, data)

    for edit in (pickled_weights, evil_weight_file, evil_sample_inputs):
        d = tmp_path / edit.__name__
        shutil.copytree(onnx_dir, d)
        _rewrite_pt2(onnx_dir / "program.pt2", d / "program.pt2", edit)
        with pytest.raises(UntrustedModelError):
            load_program(d / "program.pt2")
        with pytest.raises(UntrustedModelError):
            ExportedSegmenter(d, "torch")
        with pytest.raises(UntrustedModelError):
            bench_e2e(d, "torch", images=2, batch=2, height=40, width=40, warmup=0, repeats=1, threads=1)
        # the onnx engine never opens program.pt2
        r = bench_e2e(d, "onnx", images=2, batch=2, height=40, width=40, warmup=0, repeats=1, threads=1)
        assert r["images_per_s"] > 0
        assert not marker.exists()
        assert os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD") is None


def test_tampered_program_through_the_cli_is_one_line(onnx_dir, tmp_path, capsys):
    from weakseg.cli import main

    marker = tmp_path / "pwned"
    evil = _evil_pickle(marker)
    d = tmp_path / "m"
    shutil.copytree(onnx_dir, d)
    _rewrite_pt2(onnx_dir / "program.pt2", d / "program.pt2",
                 lambda n, b: (n, evil) if "/data/sample_inputs/" in n else (n, b))
    rc = main(["bench", "e2e", "--model", str(d), "--engine", "torch", "--images", "2", "--batch", "2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "--model" in err[0] and "program.pt2" in err[0]
    assert not marker.exists()


# ----------------------------------------------------------------------------------- C++ app
def _write_ppm(path: Path, img: torch.Tensor) -> None:
    arr = img.permute(1, 2, 0).contiguous().numpy()
    path.write_bytes(f"P6\n{arr.shape[1]} {arr.shape[0]}\n255\n".encode() + arr.tobytes())


def _build_cpp_app() -> Path:
    cmake = shutil.which("cmake", path=str(Path(sys.executable).parent)) or shutil.which("cmake")
    if cmake is None:
        pytest.skip("cmake is not installed")
    build = REPO / "build" / "cpp-app"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cfg = [cmake, "-S", str(REPO / "export" / "cpp"), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
           f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}"]
    for cmd in (cfg, [cmake, "--build", str(build), "-j1"]):
        r = subprocess.run(["nice", "-n", "19", *cmd], capture_output=True, text=True, env=env)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return build / "weakseg_app"


def test_cpp_app_matches_python(aoti_dir, tmp_path):
    from PIL import Image

    app = _build_cpp_app()
    img = _images(1, 80, 96, seed=5)[0]
    ppm = tmp_path / "in.ppm"
    _write_ppm(ppm, img)
    png = tmp_path / "labels.png"
    r = subprocess.run([str(app), "--model", str(aoti_dir), "--image", str(ppm), "--out", str(png)],
                       capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout + r.stderr
    got = torch.from_numpy(np.array(Image.open(png))).long()  # PIL checks the PNG's CRCs and zlib stream
    want = ExportedSegmenter(aoti_dir, "aoti").segment(img[None])[0]
    assert got.shape == want.shape == (80, 96)
    assert (got == want).float().mean() >= 0.99
    assert len(torch.unique(want)) >= 2  # the comparison is not between two constant maps
    bad = subprocess.run([str(app), "--model", str(aoti_dir), "--image", str(tmp_path / "missing.ppm"), "--out",
                          str(png)], capture_output=True, text=True)
    assert bad.returncode != 0 and "missing.ppm" in bad.stderr
