"""DiCLIP's text rows (docs/specs/diclip.md): its VOC prompt names, its background words and its template.

* :data:`DICLIP_VOC20`: the VOC prompt names of DiCLIP's codebase (datasets/clip_text.py), in the order
  of :data:`weakseg.data.classnames.VOC_CLASSES` without the background, with the "synonyms" written into
  the name strings exactly as the reference code has them. The reference code formats each whole string
  into the template ("a clean origami person with clothes,people,human."); ``class_embeddings(...,
  synonym_sep=None)`` reproduces that, while the default ``synonym_sep=","`` splits on commas and
  averages the parts as synonyms.
* :data:`DICLIP_BACKGROUND_WORDS`: DiCLIP's 25 background words (one text row each).
* :data:`DICLIP_TEMPLATE`: ``"a clean origami {}."``, the ``"origami"`` template set of
  :func:`weakseg.backbones.text.resolve_templates`.
"""

from __future__ import annotations

from weakseg.backbones.text import ORIGAMI_TEMPLATE

__all__ = ["DICLIP_VOC20", "DICLIP_BACKGROUND_WORDS", "DICLIP_TEMPLATE"]

DICLIP_VOC20: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird avian", "boat", "bottle", "bus", "car", "cat", "chair seat", "cow",
    "diningtable", "dog", "horse", "motorbike", "person with clothes,people,human", "pottedplant", "sheep",
    "sofa", "train", "tvmonitor screen",
)

DICLIP_BACKGROUND_WORDS: tuple[str, ...] = (
    "ground", "land", "grass", "tree", "building", "wall", "sky", "lake", "water", "river", "sea", "railway",
    "railroad", "keyboard", "helmet", "cloud", "house", "mountain", "ocean", "road", "rock", "street",
    "valley", "bridge", "sign",
)

DICLIP_TEMPLATE = ORIGAMI_TEMPLATE
