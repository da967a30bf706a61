"""weakseg.eval: metrics (a mergeable confusion matrix) and the evaluation loop (see DESIGN.md)."""

from weakseg.eval.metrics import MIOU_CONVENTIONS, ConfusionMatrix

__all__ = ["ConfusionMatrix", "MIOU_CONVENTIONS"]
