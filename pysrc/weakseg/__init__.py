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
    COMMANDS,
    GENERATED_DATASETS,
    METHODS,
    MODEL_SOURCES,
    PROPOSERS,
    TOY_DEMOS,
    TRAINERS,
    DemoEntry,
    MethodConfig,
    ModelSpec,
    Registry,
    Segmenter,
    SegmentationOutput,
    create,
    list_methods,
)

# The built-in entries, declared by module path: each module registers itself when first looked up, so
# no layer imports the layers above it to fill a registry (the package entry point is the only place that
# knows them all). Layers, bottom to top: io, core < ops, data < backbones < eval, export < methods
# < train < toy < demo, bench, cli (tests/test_layering.py checks the imports against this order).
for _name in ("diclip", "diffsegmenter", "iseg", "moduseg", "synseg"):
    METHODS.declare(_name, f"weakseg.methods.{_name}")
    TOY_DEMOS.declare(_name, "weakseg.toy.recipes")
for _name, _module in (("clip", "clip"), ("stable-diffusion", "diffusion"), ("dinov2", "features"),
                       ("clip-dense", "features")):
    BACKBONES.declare(_name, f"weakseg.backbones.{_module}")
for _name in ("sam", "sam2", "disk", "superpixel"):
    PROPOSERS.declare(_name, "weakseg.backbones.proposers")
MODEL_SOURCES.declare("toy", "weakseg.toy")
GENERATED_DATASETS.declare("toyworld", "weakseg.toy.world")
GENERATED_DATASETS.declare("toyworld-captions", "weakseg.toy.world")
TRAINERS.declare("diclip", "weakseg.train.diclip")
TRAINERS.declare("synseg", "weakseg.train.synseg")
COMMANDS.declare("bank", "weakseg.methods.moduseg.commands")
COMMANDS.declare("cache", "weakseg.methods.diclip.commands")
del _name, _module

__all__ = [
    "__version__", "ops", "create", "list_methods", "Segmenter", "SegmentationOutput", "MethodConfig",
    "Registry", "ModelSpec", "DemoEntry", "METHODS", "BACKBONES", "PROPOSERS", "MODEL_SOURCES", "TOY_DEMOS",
    "TRAINERS", "COMMANDS", "GENERATED_DATASETS",
]
