"""DiCLIP (``weakseg.create("diclip")``): CLIP patch-text CAMs sharpened by Stable Diffusion
self-attention (VCE + ACR) and a key-value cache of SD-generated exemplars (TSA: static retrieval,
dynamic adapter), pseudo labels by CAA + a random walk on SD attention, and a segmentation head
trained in one stage (``weakseg train diclip``). docs/specs/diclip.md.

Modules: :mod:`.config` (:class:`DiCLIPConfig`, :data:`PRESETS`, option constants), :mod:`.prompts`
(DiCLIP's VOC prompt names, background words, template), :mod:`.cam` (CAMs), :mod:`.vce` (SD attention,
ACR), :mod:`.refine` (CAA, walk, PAR), :mod:`.modules` (adapter, head, losses), :mod:`.cache` (the cache
file and its builder), :mod:`.method` (the segmenter), :mod:`.export` (its export graphs),
:mod:`.commands` (``weakseg cache build``). The toy-world recipe and the ablation ladder live in
:mod:`weakseg.toy.diclip`.
"""

from weakseg.methods.diclip.cache import CacheBuildConfig, CacheError, KVCache, build_cache
from weakseg.methods.diclip.config import (CAM_SOURCES, PRESETS, REFINE_STEPS, VCE_LAYER, WALK_LAYER,
                                           DiCLIPConfig)
from weakseg.methods.diclip.method import DiCLIP, load_clip, load_sd, read_checkpoint_weights
from weakseg.methods.diclip.modules import KVAdapter, SegHead, affinity_labels, affinity_loss, balanced_seg_loss
from weakseg.methods.diclip.prompts import DICLIP_BACKGROUND_WORDS, DICLIP_TEMPLATE, DICLIP_VOC20

__all__ = ["DiCLIP", "DiCLIPConfig", "PRESETS", "KVCache", "CacheError", "CacheBuildConfig", "build_cache",
           "KVAdapter", "SegHead", "balanced_seg_loss", "affinity_loss", "affinity_labels",
           "VCE_LAYER", "WALK_LAYER", "CAM_SOURCES", "REFINE_STEPS", "load_clip", "load_sd",
           "read_checkpoint_weights", "DICLIP_VOC20", "DICLIP_BACKGROUND_WORDS", "DICLIP_TEMPLATE"]
