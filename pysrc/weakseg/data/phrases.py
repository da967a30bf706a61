"""Caption -> noun phrases, SynSeg's category source (docs/specs/synseg.md §4; the paper's Alg. 1 + 2).

:class:`NounPhraseExtractor` turns a caption into its distinct noun phrases, each one category:

- ``backend="spacy"``: spaCy noun chunks (``doc.noun_chunks``) that hold at least one token with
  ``pos_ == "NOUN"`` (Alg. 1). Needs spaCy and an installed English pipeline (``spacy_model``,
  ``en_core_web_sm`` by default).
- ``backend="simple"``: a dependency-free fallback for offline machines. The caption is lower-cased,
  cut at punctuation and at the connecting words of :data:`SPLIT_WORDS` (conjunctions, prepositions,
  verbs of "is/are/with" shape); in each piece leading words of :data:`LEADING_WORDS` (articles,
  quantifiers, numbers, pronouns) are dropped, and the rest is kept when it has a word of at least two
  letters that is not in :data:`LEADING_WORDS` / :data:`SPLIT_WORDS`. It has no part-of-speech tagger,
  so "red" alone passes; it is meant for short descriptive captions (the toy world's "a photo of a red
  circle and a blue star on grass" -> "red circle", "blue star", "grass").
- ``backend="auto"`` (default): spaCy when the pipeline loads, else the fallback.

Both then strip leading articles / quantifiers, drop phrases containing any string of the exclusion list
(Alg. 2; :data:`DEFAULT_EXCLUSIONS_FILE`, one entry per line) and deduplicate in caption order.

Precomputed phrases: :func:`read_phrases_file` reads JSON lines ``{"key": ..., "phrases": [...]}``
(what :func:`write_phrases_file` writes), so phrases extracted elsewhere (a machine with spaCy) can be
used as is.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Iterable, Sequence

from weakseg.io import write_text

__all__ = ["NounPhraseExtractor", "DEFAULT_EXCLUSIONS_FILE", "load_exclusions", "simple_noun_phrases",
           "read_phrases_file", "write_phrases_file", "SPLIT_WORDS", "LEADING_WORDS", "BACKENDS"]

DEFAULT_EXCLUSIONS_FILE = Path(__file__).resolve().parent / "phrase_exclusions.txt"
BACKENDS = ("auto", "spacy", "simple")

SPLIT_WORDS = frozenset("""
and or but nor with without on in at of by for from to into onto over under above below behind beside
besides between near next through across along around against among amid after before during while
as is are was were be been being has have had having it its it's that which who whom whose where
when while there here this these those than then very so too also just only not no
""".split())
LEADING_WORDS = frozenset("""
a an the some any many much few several each every all both either neither another other such
my your his her our their its one two three four five six seven eight nine ten dozens dozen
more most less least
""".split())
_CUT = re.compile(r"[,.;:!?()\[\]{}\"|/\\]+")
_WORD = re.compile(r"[a-z0-9][a-z0-9'\-]*")


def load_exclusions(path: str | os.PathLike | None = None) -> tuple[str, ...]:
    """The exclusion strings of ``path`` (default: the shipped list), lower-cased, comments dropped."""
    p = Path(path) if path is not None else DEFAULT_EXCLUSIONS_FILE
    if not p.is_file():
        raise FileNotFoundError(f"exclusions: no such file {str(p)!r} (one excluded string per line)")
    out = []
    for line in p.read_text().splitlines():
        line = line.split("#", 1)[0].strip().lower()
        if line:
            out.append(line)
    return tuple(out)


def _strip_leading(words: list[str]) -> list[str]:
    i = 0
    while i < len(words) and (words[i] in LEADING_WORDS or words[i].isdigit()):
        i += 1
    return words[i:]


def simple_noun_phrases(caption: str) -> list[str]:
    """The fallback extractor's raw phrases of ``caption`` (before exclusion and deduplication)."""
    if not isinstance(caption, str):
        raise TypeError(f"caption: expected a string, got {type(caption).__name__}")
    out = []
    for piece in _CUT.split(caption.lower()):
        current: list[str] = []
        for w in _WORD.findall(piece) + [None]:
            if w is None or w in SPLIT_WORDS:
                words = _strip_leading(current)
                if any(len(x) >= 2 and x not in LEADING_WORDS and not x.isdigit() for x in words):
                    out.append(" ".join(words))
                current = []
            else:
                current.append(w)
    return out


class NounPhraseExtractor:
    """Caption -> distinct noun phrases (see the module docstring). ``exclusions``: a list of strings or a
    file path (default: the shipped list); ``()`` disables the filter."""

    def __init__(self, backend: str = "auto", spacy_model: str = "en_core_web_sm",
                 exclusions: Sequence[str] | str | os.PathLike | None = None):
        if backend not in BACKENDS:
            raise ValueError(f"backend: expected one of {', '.join(BACKENDS)}, got {backend!r}")
        if exclusions is None or isinstance(exclusions, (str, os.PathLike)):
            self.exclusions = load_exclusions(exclusions)
        else:
            self.exclusions = tuple(str(e).lower() for e in exclusions)
        self._nlp = None
        if backend in ("auto", "spacy"):
            try:
                import spacy

                self._nlp = spacy.load(spacy_model, disable=["ner", "lemmatizer"])
            except (ImportError, OSError) as e:
                if backend == "spacy":
                    raise ImportError(f"backend='spacy' needs spaCy and its {spacy_model!r} pipeline "
                                      f"(pip install spacy; python -m spacy download {spacy_model}): {e}") from None
        self.backend = "spacy" if self._nlp is not None else "simple"

    def _clean(self, phrases: Iterable[str]) -> list[str]:
        out: list[str] = []
        for p in phrases:
            words = _strip_leading(_WORD.findall(p.lower()))
            text = " ".join(words)
            if not text or any(e in text for e in self.exclusions) or text in out:
                continue
            out.append(text)
        return out

    def _spacy_raw(self, doc) -> list[str]:
        return [chunk.text for chunk in doc.noun_chunks if any(t.pos_ == "NOUN" for t in chunk)]

    def __call__(self, caption: str) -> list[str]:
        if not isinstance(caption, str):
            raise TypeError(f"caption: expected a string, got {type(caption).__name__}")
        raw = self._spacy_raw(self._nlp(caption)) if self._nlp is not None else simple_noun_phrases(caption)
        return self._clean(raw)

    def extract_many(self, captions: Sequence[str], batch_size: int = 256) -> list[list[str]]:
        """Phrases of many captions (spaCy's ``pipe`` when it is the backend)."""
        if self._nlp is None:
            return [self(c) for c in captions]
        return [self._clean(self._spacy_raw(d)) for d in self._nlp.pipe(list(captions), batch_size=batch_size)]


def read_phrases_file(path: str | os.PathLike) -> dict[str, list[str]]:
    """JSON lines ``{"key": str, "phrases": [str, ...]}`` -> {key: phrases}."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"phrases_file: no such file {str(p)!r} (JSON lines with 'key' and 'phrases')")
    out: dict[str, list[str]] = {}
    for n, line in enumerate(p.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            key, phrases = str(rec["key"]), rec["phrases"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"phrases_file {str(p)!r} line {n}: expected {{\"key\": ..., \"phrases\": [...]}} "
                             f"({type(e).__name__}: {e})") from None
        if not isinstance(phrases, list) or not all(isinstance(x, str) for x in phrases):
            raise ValueError(f"phrases_file {str(p)!r} line {n}: 'phrases' must be a list of strings")
        out[key] = phrases
    return out


def write_phrases_file(path: str | os.PathLike, phrases: dict[str, Sequence[str]]) -> None:
    """Write {key: phrases} as JSON lines (atomically)."""
    write_text(path, "".join(json.dumps({"key": k, "phrases": list(v)}) + "\n" for k, v in phrases.items()))
