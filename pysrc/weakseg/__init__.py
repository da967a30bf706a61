"""weakseg: weakly-supervised and training-free semantic segmentation.

    import weakseg
    seg = weakseg.create("moduseg", bank="bank.safetensors")
    out = seg.segment(images, class_names)      # out.scores (B, C, H, W), out.labels (B, H, W)

Ops with compiled CPU/CUDA kernels live in :mod:`weakseg.ops`.
"""

__version__ = "0.1.0"

from weakseg import ops  # noqa: E402  (registers the fake kernels of the compiled ops)
from weakseg.core import (  # noqa: E402
    BACKBONES,
    DemoEntry,
    METHODS,
    PROPOSERS,
    MethodConfig,
    Registry,
    Segmenter,
    SegmentationOutput,
    create,
    list_methods,
)

__all__ = [
    "__version__", "ops", "create", "list_methods", "Segmenter", "SegmentationOutput", "MethodConfig",
    "Registry", "DemoEntry", "METHODS", "BACKBONES", "PROPOSERS",
]
