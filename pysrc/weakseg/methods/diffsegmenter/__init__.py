"""DiffSegmenter (``weakseg.create("diffsegmenter")``): Stable Diffusion cross-attention maps, fused over
resolutions and propagated once by the UNet's self-attention. docs/specs/diffsegmenter_iseg.md (prefix DS).

Modules: :mod:`.config` (:class:`DiffSegmenterConfig`, :data:`PRESETS`, the layer and weight constants),
:mod:`.prompts` (prompt building, class-token positions, the "ing" rule, captions), :mod:`.attention`
(cross-attention fusion, self-attention propagation), :mod:`.method` (the registered segmenter),
:mod:`.sweep` (the reference's background-threshold protocol). The logic shared with iSeg lives in
:mod:`weakseg.methods.diffusion_common`.
"""

from weakseg.methods.diffsegmenter.attention import fuse_cross_attention, propagate_fused, propagate_reference
from weakseg.methods.diffsegmenter.config import (CAPTION_SEED, CROSS_ATTENTION_LAYERS, DEFAULT_MODEL, DS_WEIGHTS,
                                                  PRESETS, PROMPT_TEMPLATE, SELF_ATTENTION_LAYERS,
                                                  DiffSegmenterConfig)
from weakseg.methods.diffsegmenter.method import DiffSegmenter
from weakseg.methods.diffsegmenter.prompts import (build_prompt, caption_continuation, caption_seed,
                                                   class_token_positions)
from weakseg.methods.diffsegmenter.sweep import sweep_bg_threshold

__all__ = ["DiffSegmenterConfig", "DiffSegmenter", "PRESETS", "SELF_ATTENTION_LAYERS", "CROSS_ATTENTION_LAYERS",
           "build_prompt", "class_token_positions", "caption_continuation", "caption_seed",
           "fuse_cross_attention", "propagate_fused", "propagate_reference", "sweep_bg_threshold",
           "DEFAULT_MODEL", "DS_WEIGHTS", "PROMPT_TEMPLATE", "CAPTION_SEED"]
