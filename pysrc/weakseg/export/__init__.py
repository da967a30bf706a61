"""Deployment: ONNX / TensorRT / AOTInductor export of a method's :class:`ExportGraphs`."""

from weakseg.export.graphs import ExportGraphs, labels_from_logits

__all__ = ["ExportGraphs", "labels_from_logits"]
