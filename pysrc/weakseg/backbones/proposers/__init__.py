"""Class-agnostic mask proposers with one interface: ``proposer(image) -> Proposals``.

``image`` is one RGB uint8 tensor (3, H, W). The result holds pairwise-disjoint boolean masks at
the image's resolution with float32 scores in descending order, which is what ModuSeg's
inference stage consumes (docs/specs/moduseg.md §2.1: EntitySeg masks made non-overlapping by
painting in ascending score order, thresholded by score and area).

Proposers:

- ``"sam"`` / ``"sam2"``: SAM / SAM2 automatic mask generation (point grid, predicted-IoU and
  stability filtering, box NMS) with transformers' own image-processor utilities;
- ``"disk"``: masks precomputed by any external model (e.g. EntitySeg), read from PNG id maps or
  npz files;
- ``"superpixel"``: scikit-image Felzenszwalb / SLIC superpixels merged by colour over a region
  adjacency graph; no weights.
"""
from weakseg.backbones.proposers.base import MaskProposer, Proposals, check_image, paint_disjoint
from weakseg.backbones.proposers.disk import DiskProposer
from weakseg.backbones.proposers.sam import SAM2Proposer, SAMProposer
from weakseg.backbones.proposers.superpixel import SuperpixelProposer

__all__ = [
    "Proposals",
    "MaskProposer",
    "paint_disjoint",
    "check_image",
    "SAMProposer",
    "SAM2Proposer",
    "DiskProposer",
    "SuperpixelProposer",
]
