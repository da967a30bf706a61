"""DiCLIP (``weakseg.create("diclip")``): CLIP patch-text CAMs sharpened by Stable Diffusion
self-attention (VCE + ACR) and a key-value cache of SD-generated exemplars (TSA: static retrieval,
dynamic adapter), pseudo labels by CAA + a random walk on SD attention, and a segmentation head
trained in one stage (``weakseg train diclip``). specs/diclip.md.

Modules: :mod:`.cam` (CAMs), :mod:`.vce` (SD attention, ACR), :mod:`.refine` (CAA, walk, PAR),
:mod:`.modules` (adapter, head, losses), :mod:`.cache` (the cache file and its builder),
:mod:`.method` (the segmenter and config), :mod:`.commands` (``weakseg cache build``). The toy-world
recipe and the ablation ladder live in :mod:`weakseg.toy.diclip`.
"""

from weakseg.methods.diclip.cache import CacheBuildConfig, CacheError, KVCache, build_cache
from weakseg.methods.diclip.method import PRESETS, DiCLIP, DiCLIPConfig
from weakseg.methods.diclip.modules import KVAdapter, SegHead, affinity_labels, affinity_loss, balanced_seg_loss

__all__ = ["DiCLIP", "DiCLIPConfig", "PRESETS", "KVCache", "CacheError", "CacheBuildConfig", "build_cache",
           "KVAdapter", "SegHead", "balanced_seg_loss", "affinity_loss", "affinity_labels"]
