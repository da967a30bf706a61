"""What a deployable method hands to the exporters.

A method that can be exported (``weakseg export NAME``) implements ``export_graphs() -> ExportGraphs``.
The two graphs are plain ``torch.nn.Module`` objects with tensor-only signatures, so the same modules go
through the ONNX (dynamo) exporter, ``torch.export`` / AOTInductor and TensorRT:

- ``image_model(images, text_embeddings) -> logits``: ``images`` float32 (B, 3, S, S) already resized to
  ``input_size`` and normalised with ``mean``/``std``; ``text_embeddings`` float32 (C, D), one row per class
  (as ``text_model`` returns them); ``logits`` float32 (B, C, S, S): per-class scores at input resolution
  (fixed-grid bilinear upsampling inside the graph), higher = more likely. The class list is free at run
  time: B and C are dynamic dimensions.
- ``text_model(tokens) -> text_embeddings``: ``tokens`` int64 (P, context_length) from ``tokenize``, one
  row per prompt text; the rows are L2-normalised.

A class row is the re-normalised mean of the rows of its prompt texts: ``prompts_for(name)`` when the
method sets it (several templates / synonyms), else the one text ``prompt.format(name)`` (the mean of one
normalised row is itself). :meth:`ExportGraphs.text_embeddings` does this; the exporters write its result
for the chosen class list next to the graphs.

Labels are produced outside the graph by :func:`labels_from_logits` with the method's ``background`` rule,
so Python, ONNX Runtime, TensorRT and the C++ app share one post-processing definition.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

__all__ = ["ExportGraphs", "labels_from_logits"]


@dataclass
class ExportGraphs:
    image_model: torch.nn.Module
    text_model: torch.nn.Module
    tokenize: Callable[[Sequence[str]], torch.Tensor]
    prompt: str = "a photo of a {}."             # class name -> text fed to ``tokenize``
    input_size: int = 224
    mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
    context_length: int = 77
    embed_dim: int = 512
    # background rule applied to sigmoid/softmax-free logits by labels_from_logits:
    # {"kind": "none"} | {"kind": "threshold", "value": t} (label 0 where max score < t, classes shift by 1)
    background: dict[str, Any] = field(default_factory=lambda: {"kind": "none"})
    method: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)
    # class name -> the prompt texts averaged into its row (None: [prompt.format(name)])
    prompts_for: Callable[[str], Sequence[str]] | None = None
    # the class list used when the caller names none (e.g. a trained head's classes); may be empty
    default_classes: tuple[str, ...] = ()

    def class_prompts(self, name: str) -> list[str]:
        texts = list(self.prompts_for(name)) if self.prompts_for is not None else [self.prompt.format(name)]
        if not texts:
            raise ValueError(f"class_names: no prompt text for class {name!r}")
        return texts

    def text_embeddings(self, class_names: Sequence[str]) -> torch.Tensor:
        """(C, D) float32 embeddings of ``class_names``: per class, the mean of the text model's rows for
        its prompt texts (see the module docstring), re-normalised."""
        if isinstance(class_names, str) or not class_names:
            raise ValueError("class_names must be a non-empty list of class names")
        texts, owner = [], []
        for i, c in enumerate(class_names):
            for t in self.class_prompts(str(c)):
                texts.append(t)
                owner.append(i)
        with torch.no_grad():
            rows = self.text_model(self.tokenize(texts)).float()
        idx = torch.tensor(owner, device=rows.device)
        sums = torch.zeros(len(class_names), rows.shape[1], device=rows.device).index_add_(0, idx, rows)
        return torch.nn.functional.normalize(sums, dim=-1)


def labels_from_logits(logits: torch.Tensor, background: dict[str, Any]) -> torch.Tensor:
    """(B, C, H, W) scores -> (B, H, W) int64 labels under a background rule (see :class:`ExportGraphs`)."""
    if logits.dim() != 4:
        raise ValueError(f"logits must be (B, C, H, W), got shape {tuple(logits.shape)}")
    kind = background.get("kind", "none")
    if kind == "none":
        return logits.argmax(1)
    if kind == "threshold":
        best, idx = logits.max(1)
        return torch.where(best < float(background["value"]), torch.zeros_like(idx), idx + 1)
    raise ValueError(f"background kind must be 'none' or 'threshold', got {kind!r}")
