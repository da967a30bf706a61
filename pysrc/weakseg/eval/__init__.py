"""weakseg.eval: metrics (a mergeable confusion matrix) and the evaluation loop (see docs/design.md)."""

from weakseg.eval.metrics import MIOU_CONVENTIONS, ConfusionMatrix
from weakseg.eval.runner import evaluate, open_eval_dataset
from weakseg.eval.visualize import colorize, overlay_panel, palette

__all__ = ["ConfusionMatrix", "MIOU_CONVENTIONS", "evaluate", "open_eval_dataset", "colorize", "overlay_panel",
           "palette"]
