"""The exporters, written against :class:`ExportGraphs` only (any method with ``export_graphs()``).

``export(graphs, fmt, out_dir, class_names)`` writes a model directory (:mod:`weakseg.export.files`):

* ``onnx`` — ``model.onnx`` (image + head graph, inputs ``images`` (B, 3, S, S) and ``text_embeddings``
  (C, D), output ``logits`` (B, C, S, S), B and C dynamic) and ``text.onnx`` (``tokens`` (P, L) ->
  ``text_embeddings`` (P, D), P dynamic), both through the dynamo exporter
  (``torch.onnx.export(..., dynamo=True)``), opset :data:`OPSET`, traced with B = 2 and C = 3,
  ``onnx.checker`` (full check) clean, metadata in ``metadata_props``;
* ``tensorrt`` — the ONNX files, then ``model.engine`` built by :mod:`weakseg.export.tensorrt`;
* ``aoti`` — ``model.pt2``, an AOTInductor package of the ``torch.export``'ed image graph (B, C dynamic).

Every format also writes ``program.pt2`` (``torch.export.save`` of the image graph), the class text
embeddings, ``check.safetensors`` (a check batch of uint8 images with the program's logits for them, the
reference every engine is verified against) and ``export.json``.

Custom ops: the deployed graphs must not contain ``weakseg::`` ops (none of the exported paths uses
them; see README "Deployment"); :func:`check_no_custom_ops` enforces it on the exported program and on
the ONNX graph.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import torch

from weakseg.export.files import MANIFEST, atomic_path, write_check, write_embeddings, write_json
from weakseg.export.graphs import ExportGraphs

__all__ = ["FORMATS", "OPSET", "TRACE_BATCH", "TRACE_CLASSES", "export", "graphs_of", "check_no_custom_ops",
           "export_program", "metadata_of"]

FORMATS = ("onnx", "tensorrt", "aoti")
OPSET = 18
TRACE_BATCH, TRACE_CLASSES, TRACE_PROMPTS = 2, 3, 2
MAX_BATCH, MAX_CLASSES = 256, 4096


def graphs_of(method: Any, name: str = "") -> ExportGraphs:
    """``method.export_graphs()`` with a clear error for a method that has none."""
    fn = getattr(method, "export_graphs", None)
    if not callable(fn):
        from weakseg.core import METHODS

        able = [n for n in METHODS.names() if callable(getattr(METHODS.get(n), "export_graphs", None))]
        raise ValueError(f"NAME: method {name or type(method).__name__!r} cannot be exported (it has no "
                         f"export_graphs()); exportable methods: {', '.join(able) or 'none'}")
    graphs = fn()
    if not isinstance(graphs, ExportGraphs):
        raise TypeError(f"{name}.export_graphs() must return an ExportGraphs, got {type(graphs).__name__}")
    return graphs


def _dims():
    from torch.export import Dim

    batch = Dim("batch", min=1, max=MAX_BATCH)
    classes = Dim("classes", min=1, max=MAX_CLASSES)
    return {"images": {0: batch}, "text_embeddings": {0: classes}}


def _examples(graphs: ExportGraphs, device: str | torch.device = "cpu"):
    g = torch.Generator().manual_seed(0)
    S, D = graphs.input_size, graphs.embed_dim
    images = torch.randn(TRACE_BATCH, 3, S, S, generator=g).to(device)
    text = torch.nn.functional.normalize(torch.randn(TRACE_CLASSES, D, generator=g), dim=-1).to(device)
    return images, text


def check_images(size: int, batch: int = TRACE_BATCH) -> torch.Tensor:
    """The check batch: ``batch`` deterministic uint8 images of smooth colour blobs, (B, 3, S, 5S/4), so
    the check also covers the resize of the pre-processing."""
    g = torch.Generator().manual_seed(1)
    low = torch.rand(batch, 3, 5, 7, generator=g)
    img = torch.nn.functional.interpolate(low, size=(size, size + size // 4), mode="bilinear", align_corners=False)
    return (img * 255).round().clamp(0, 255).to(torch.uint8)


def metadata_of(graphs: ExportGraphs, class_names: Sequence[str]) -> dict[str, str]:
    """The string metadata stored in the ONNX ``metadata_props`` / the AOTI package."""
    return {"weakseg.method": graphs.method, "weakseg.classes": json.dumps(list(class_names)),
            "weakseg.input_size": str(graphs.input_size), "weakseg.mean": json.dumps(list(graphs.mean)),
            "weakseg.std": json.dumps(list(graphs.std)), "weakseg.background": json.dumps(graphs.background),
            "weakseg.embed_dim": str(graphs.embed_dim), "weakseg.context_length": str(graphs.context_length),
            "weakseg.prompt": graphs.prompt, "weakseg.inputs": "images float32 (B,3,S,S) normalised; "
            "text_embeddings float32 (C,D)", "weakseg.outputs": "logits float32 (B,C,S,S)",
            "weakseg.extra": json.dumps(graphs.metadata, default=str)}


def check_no_custom_ops(obj: Any) -> None:
    """Raise if an exported program (torch.export) or ONNX model contains a ``weakseg`` op."""
    bad: list[str] = []
    if isinstance(obj, torch.export.ExportedProgram):
        for node in obj.graph.nodes:
            if node.op == "call_function" and "weakseg" in str(getattr(node.target, "namespace", "")) + str(node.target):
                bad.append(str(node.target))
    else:  # onnx.ModelProto
        nodes = list(obj.graph.node) + [n for f in obj.functions for n in f.node]
        bad = [f"{n.domain}::{n.op_type}" for n in nodes if "weakseg" in n.domain]
        bad += [o.domain for o in obj.opset_import if "weakseg" in o.domain]
    if bad:
        raise RuntimeError(f"the deployed graph contains weakseg custom ops {sorted(set(bad))}; they are kept out "
                           f"of exported graphs (README: Deployment)")


def export_program(graphs: ExportGraphs, device: str | torch.device = "cpu") -> torch.export.ExportedProgram:
    """``torch.export`` of the image graph with dynamic B and C (traced with B = 2, C = 3)."""
    model = graphs.image_model.to(device).eval()
    with torch.no_grad():
        ep = torch.export.export(model, _examples(graphs, device), dynamic_shapes=_dims(), strict=False)
    check_no_custom_ops(ep)
    return ep


def _onnx_save(model: torch.nn.Module, args: tuple, path: Path, dynamic_shapes: dict, input_names: list[str],
               output_names: list[str], props: dict[str, str]) -> None:
    import onnx

    with torch.no_grad():
        prog = torch.onnx.export(model, args, dynamo=True, opset_version=OPSET, dynamic_shapes=dynamic_shapes,
                                 input_names=input_names, output_names=output_names, external_data=False,
                                 optimize=True, verify=False, report=False)
    proto = prog.model_proto
    check_no_custom_ops(proto)
    onnx.helper.set_model_props(proto, props)
    onnx.checker.check_model(proto, full_check=True)
    with atomic_path(path) as tmp:
        onnx.save_model(proto, str(tmp))


def export_onnx(graphs: ExportGraphs, out: Path, class_names: Sequence[str]) -> dict[str, str]:
    props = metadata_of(graphs, class_names)
    model = graphs.image_model.cpu().eval()
    _onnx_save(model, _examples(graphs), out / "model.onnx", _dims(), ["images", "text_embeddings"], ["logits"],
               props)
    tokens = graphs.tokenize([graphs.prompt.format(c) for c in ("cat", "dog")][:TRACE_PROMPTS]).cpu()
    from torch.export import Dim

    _onnx_save(graphs.text_model.cpu().eval(), (tokens,), out / "text.onnx",
               {"tokens": {0: Dim("prompts", min=1, max=MAX_CLASSES)}}, ["tokens"], ["text_embeddings"],
               {**props, "weakseg.graph": "text"})
    return {"onnx": "model.onnx", "text_onnx": "text.onnx"}


def export_aoti(graphs: ExportGraphs, out: Path, class_names: Sequence[str], ep=None,
                device: str | torch.device = "cpu") -> dict[str, str]:
    ep = ep if ep is not None else export_program(graphs, device)
    meta = metadata_of(graphs, class_names)
    with atomic_path(out / "model.pt2") as tmp:
        torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp),
                                                 inductor_configs={"aot_inductor.metadata": meta})
    return {"aoti": "model.pt2"}


def export(graphs: ExportGraphs, fmt: str, out_dir: str | Path, class_names: Sequence[str] | None = None, *,
           device: str | torch.device = "cpu", trt_profile: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write the model directory ``out_dir`` for format ``fmt``; returns the manifest."""
    if fmt not in FORMATS:
        raise ValueError(f"--format: unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if class_names is None:
        class_names = list(graphs.default_classes)
    if isinstance(class_names, str):
        raise ValueError("--classes: expected a list of class names, got a single string")
    class_names = [str(c).strip() for c in class_names]
    if not class_names or any(not c for c in class_names):
        raise ValueError(f"--classes: expected a non-empty list of non-empty class names, got {class_names}"
                         + ("" if graphs.default_classes else f" (method {graphs.method!r} has no default class list)"))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    emb = graphs.text_embeddings(class_names)
    files: dict[str, str] = dict(write_embeddings(out, class_names, emb, {
        "input_size": graphs.input_size, "mean": graphs.mean, "std": graphs.std, "background": graphs.background}))
    ep = export_program(graphs, device)
    with atomic_path(out / "program.pt2") as tmp:
        torch.export.save(ep, str(tmp))
    files["program"] = "program.pt2"
    from weakseg.export.runner import preprocess

    imgs = check_images(graphs.input_size)
    with torch.no_grad():
        x = preprocess(imgs.to(device), graphs.input_size, graphs.mean, graphs.std)
        logits = ep.module()(x, emb.detach().float().to(device))
    files["check"] = write_check(out, imgs, logits.cpu())
    if fmt in ("onnx", "tensorrt"):
        files.update(export_onnx(graphs, out, class_names))
    if fmt == "tensorrt":
        from weakseg.export.tensorrt import build_engine

        files.update(build_engine(out / "model.onnx", out / "model.engine", graphs.input_size, graphs.embed_dim,
                                  **(trt_profile or {})))
    if fmt == "aoti":
        files.update(export_aoti(graphs, out, class_names, ep=ep, device=device))
    exported = [fmt]
    old = out / MANIFEST
    if old.is_file():  # a second format into the same directory (same method, classes, size) adds its files
        prev = json.loads(old.read_text())
        if (prev.get("method"), prev.get("classes"), prev.get("input_size")) == (graphs.method, class_names,
                                                                                  graphs.input_size):
            files = {**prev.get("files", {}), **files}
            exported = sorted(set(prev.get("exported_formats", [])) | {fmt})
    manifest = {"format": "weakseg-export", "method": graphs.method, "exported": fmt, "exported_formats": exported,
                "files": files,
                "input_size": graphs.input_size, "mean": list(graphs.mean), "std": list(graphs.std),
                "background": graphs.background, "classes": class_names, "embed_dim": graphs.embed_dim,
                "context_length": graphs.context_length, "prompt": graphs.prompt, "opset": OPSET,
                "dynamic": {"batch": [1, MAX_BATCH], "classes": [1, MAX_CLASSES]},
                "trace": {"batch": TRACE_BATCH, "classes": TRACE_CLASSES}, "metadata": graphs.metadata,
                "versions": {"torch": torch.__version__}}
    write_json(out / MANIFEST, manifest)
    return manifest
