"""iSeg (``weakseg.create("iseg")``): training-free segmentation from one Stable Diffusion 2.1 pass,
entropy-reduced self-attention and iterative propagation of cross-attention maps.
docs/specs/diffsegmenter_iseg.md.

Modules: :mod:`.config` (:class:`ISegConfig`, :data:`PRESETS`, the layer / head / prompt-word
constants), :mod:`.method` (the registered segmenter and the pipeline). The logic shared with
DiffSegmenter lives in :mod:`weakseg.methods.diffusion_common`.
"""

from weakseg.methods.iseg.config import (COCO_RENAMES, COCO_STUFF, CONTEXT_RENAMES, CROSS_LAYERS_16, CROSS_LAYERS_32,
                                         ISEG_BACKGROUND_COCO, ISEG_BACKGROUND_VOC, PRESETS, SELF_LAYER,
                                         VOC_HEADS_16, VOC_HEADS_32, VOC_RENAMES, VOC_STUFF, ISegConfig)
from weakseg.methods.iseg.method import ISeg, cluster_seeds, load_stable_diffusion

__all__ = ["ISeg", "ISegConfig", "PRESETS", "VOC_RENAMES", "COCO_RENAMES", "CONTEXT_RENAMES", "SELF_LAYER",
           "CROSS_LAYERS_16", "CROSS_LAYERS_32", "VOC_HEADS_16", "VOC_HEADS_32", "cluster_seeds",
           "load_stable_diffusion", "ISEG_BACKGROUND_VOC", "ISEG_BACKGROUND_COCO", "VOC_STUFF", "COCO_STUFF"]
