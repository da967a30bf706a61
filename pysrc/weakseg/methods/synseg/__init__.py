"""SynSeg (``weakseg.create("synseg")``): a frozen CLIP ViT, FiLM fusion of the class text, a CLIPSeg-style
decoder trained from image-caption pairs with the Feature Synergy Structure and the Multi-Category
Contrastive losses. docs/specs/synseg.md.

Modules: :mod:`.config` (:class:`SynSegConfig`, :data:`PRESETS`, the head file format), :mod:`.head`
(the trained head, FSS pooling, the head file), :mod:`.losses` (MCCL), :mod:`.views` (the 5-view
split and stitch), :mod:`.method` (the registered segmenter and its export graphs). Training:
:mod:`weakseg.train.synseg`.
"""

from weakseg.methods.synseg.config import LOSS_NAMES, MODEL_FORMAT, PRESETS, SynSegConfig
from weakseg.methods.synseg.head import SynSegHead, fss_pool, read_head_file
from weakseg.methods.synseg.losses import bounded_cos, mccl_losses
from weakseg.methods.synseg.method import SynSeg, load_clip
from weakseg.methods.synseg.views import split_views, stitch_views

__all__ = ["SynSeg", "SynSegConfig", "SynSegHead", "PRESETS", "bounded_cos", "fss_pool", "mccl_losses",
           "split_views", "stitch_views", "read_head_file", "MODEL_FORMAT", "LOSS_NAMES", "load_clip"]
