"""weakseg.backbones: the pretrained models the methods build on, each on its
library (open_clip, diffusers, transformers, scikit-image), with a tiny
random-weight constructor (``.tiny()``) and a loader for real weights by hub
name or local directory (``.from_pretrained()``).

Registered names (``weakseg.core.BACKBONES`` / ``PROPOSERS``):

- ``"clip"``: :class:`CLIPBackbone` (open_clip ViT; text embeddings, dense
  features, attention probabilities, DiCLIP's surgery path and VCE bias)
- ``"stable-diffusion"``: :class:`StableDiffusionBackbone` (diffusers; VAE,
  noising, UNet with attention capture, token bookkeeping, generation)
- ``"dinov2"``: :class:`DINOv2Features` (transformers; padded patch tokens) and
  ``"clip-dense"``: :class:`CLIPDenseFeatures` (the CLIP alternative), both giving
  :class:`PatchFeatures`
- proposers ``"sam"``, ``"sam2"``, ``"disk"``, ``"superpixel"`` (:mod:`.proposers`),
  all giving disjoint :class:`Proposals`

The libraries themselves are imported only when a model is built.
"""

from weakseg.backbones.attention import AttentionStore, LayerCapture, install_capture
from weakseg.backbones.clip import ClassEmbeddings, CLIPBackbone, CLIPOutput, interpolate_pos_embed
from weakseg.backbones.diffusion import StableDiffusionBackbone
from weakseg.backbones.features import CLIPDenseFeatures, DenseFeatureExtractor, DINOv2Features, PatchFeatures
from weakseg.backbones.proposers import (
    DiskProposer, MaskProposer, Proposals, SAM2Proposer, SAMProposer, SuperpixelProposer, paint_disjoint,
)

__all__ = [
    "AttentionStore", "LayerCapture", "install_capture",
    "CLIPBackbone", "CLIPOutput", "ClassEmbeddings", "interpolate_pos_embed",
    "StableDiffusionBackbone",
    "PatchFeatures", "DenseFeatureExtractor", "DINOv2Features", "CLIPDenseFeatures",
    "Proposals", "MaskProposer", "SAMProposer", "SAM2Proposer", "DiskProposer", "SuperpixelProposer",
    "paint_disjoint",
]
