"""Class-name sets, background words and prompt templates used with CLIP text embeddings.

Plain data (tuples of strings) plus :func:`resolve_templates`, which turns the ``templates``
argument of :meth:`weakseg.backbones.clip.CLIPBackbone.class_embeddings` into a list of
format strings with one ``{}`` each.

Sources (see the method specs under ``specs/``):

* ``VOC20``: the 20 PASCAL VOC class names in the dataset's order.
* ``DICLIP_VOC20``: DiCLIP's VOC prompt names (datasets/clip_text.py of its codebase), with the
  "synonyms" written into the name strings exactly as the reference code has them. Note that the
  reference code formats each whole string into the template ("a clean origami person with
  clothes,people,human."); ``class_embeddings(..., synonym_sep=None)`` reproduces that, while the
  default ``synonym_sep=","`` splits on commas and averages the parts as synonyms.
* ``DICLIP_BACKGROUND_WORDS``: DiCLIP's 25 background words (one text row each).
* ``ISEG_BACKGROUND_VOC`` / ``ISEG_BACKGROUND_COCO``: the background words iSeg appends to its SD
  prompt, and :data:`ISEG_BACKGROUND_STRING_VOC` / :data:`ISEG_BACKGROUND_STRING_COCO` the exact
  strings after the reference code's string-literal concatenation (the COCO string ends in ", ").
* Templates: ``"single"`` = ``"a photo of a {}."`` (CLIPSeg's fixed prompt, SynSeg's default),
  ``"origami"`` = DiCLIP's ``"a clean origami {}."``, ``"ensemble"`` = the 80 OpenAI ImageNet
  templates as shipped by open_clip (``open_clip.OPENAI_IMAGENET_TEMPLATES``; CorrCLIP/ModuSeg).
"""

from __future__ import annotations

from typing import Sequence

__all__ = [
    "VOC20", "DICLIP_VOC20", "DICLIP_BACKGROUND_WORDS", "ISEG_BACKGROUND_VOC", "ISEG_BACKGROUND_COCO",
    "ISEG_BACKGROUND_STRING_VOC", "ISEG_BACKGROUND_STRING_COCO", "SINGLE_TEMPLATE", "DICLIP_TEMPLATE",
    "ensemble_templates", "resolve_templates", "TEMPLATE_SETS",
]

VOC20: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
)

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

ISEG_BACKGROUND_VOC: tuple[str, ...] = (
    "ground", "land", "grass", "tree", "building", "wall", "sky", "lake", "water",
)
ISEG_BACKGROUND_COCO: tuple[str, ...] = ISEG_BACKGROUND_VOC + ("river", "sea", "railway")
ISEG_BACKGROUND_STRING_VOC: str = ", ".join(ISEG_BACKGROUND_VOC)
ISEG_BACKGROUND_STRING_COCO: str = ", ".join(ISEG_BACKGROUND_COCO) + ", "

SINGLE_TEMPLATE = "a photo of a {}."
DICLIP_TEMPLATE = "a clean origami {}."


def ensemble_templates() -> list[str]:
    """The 80 OpenAI ImageNet templates shipped by open_clip, as ``"...{}..."`` format strings."""
    from open_clip import OPENAI_IMAGENET_TEMPLATES

    # open_clip ships them as one-argument callables; calling one with "{}" yields the format string.
    return [t("{}") for t in OPENAI_IMAGENET_TEMPLATES]


TEMPLATE_SETS: dict[str, object] = {
    "single": [SINGLE_TEMPLATE],
    "origami": [DICLIP_TEMPLATE],
    "ensemble": ensemble_templates,
}


def resolve_templates(templates: str | Sequence[str]) -> list[str]:
    """``"single"`` | ``"origami"`` | ``"ensemble"`` | one template string | a list of template
    strings -> a non-empty list of format strings, each with exactly one ``{}``."""
    if isinstance(templates, str):
        if templates in TEMPLATE_SETS:
            entry = TEMPLATE_SETS[templates]
            out = list(entry()) if callable(entry) else list(entry)
        else:
            out = [templates]
    elif isinstance(templates, Sequence) and all(isinstance(t, str) for t in templates):
        out = list(templates)
    else:
        raise TypeError(f"templates: expected 'single', 'origami', 'ensemble', a template string or a list of "
                        f"template strings, got {templates!r}")
    if not out:
        raise ValueError("templates: expected at least one template, got an empty list")
    for t in out:
        if t.count("{}") != 1:
            raise ValueError(f"templates: each template must contain exactly one '{{}}' placeholder for the class "
                             f"name (or be one of {sorted(TEMPLATE_SETS)}), got {t!r}")
    return out
