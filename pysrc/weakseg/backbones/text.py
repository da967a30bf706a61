"""Prompt templates used with CLIP text embeddings.

:func:`resolve_templates` turns the ``templates`` argument of
:meth:`weakseg.backbones.clip.CLIPBackbone.class_embeddings` into a list of format strings with one
``{}`` each. Named sets: ``"single"`` = ``"a photo of a {}."`` (CLIPSeg's fixed prompt, SynSeg's
default), ``"origami"`` = ``"a clean origami {}."`` (DiCLIP's, docs/specs/diclip.md), ``"ensemble"`` =
the 80 OpenAI ImageNet templates as shipped by open_clip (``open_clip.OPENAI_IMAGENET_TEMPLATES``;
CorrCLIP/ModuSeg).

The methods' own word lists live with the methods (e.g. :mod:`weakseg.methods.diclip.prompts`,
:mod:`weakseg.methods.iseg.config`); the datasets' class names in :mod:`weakseg.data.classnames`.
"""

from __future__ import annotations

from typing import Sequence

__all__ = ["SINGLE_TEMPLATE", "ORIGAMI_TEMPLATE", "ensemble_templates", "resolve_templates", "TEMPLATE_SETS"]

SINGLE_TEMPLATE = "a photo of a {}."
ORIGAMI_TEMPLATE = "a clean origami {}."


def ensemble_templates() -> list[str]:
    """The 80 OpenAI ImageNet templates shipped by open_clip, as ``"...{}..."`` format strings."""
    from open_clip import OPENAI_IMAGENET_TEMPLATES

    # open_clip ships them as one-argument callables; calling one with "{}" yields the format string.
    return [t("{}") for t in OPENAI_IMAGENET_TEMPLATES]


TEMPLATE_SETS: dict[str, object] = {
    "single": [SINGLE_TEMPLATE],
    "origami": [ORIGAMI_TEMPLATE],
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
