"""Offline CLIP BPE tokenizer files for transformers' ``CLIPTokenizer``.

transformers' ``CLIPTokenizer`` reads a ``vocab.json`` and a ``merges.txt``; the hub ships them with
every CLIP / Stable Diffusion checkpoint, but the tiny random-weight models of the tests (and any
offline machine) have no hub. open_clip ships the same BPE table inside its package
(``bpe_simple_vocab_16e6.txt.gz``), so the two files are built from it, following the construction of
CLIP's tokenizer:

- the byte-level map: the 188 printable bytes map to themselves, the other 68 to code points 256+n;
- vocab = the 256 byte symbols, the same 256 with ``</w>`` appended, the concatenation of each of the
  first 48,894 merges (lines 1..48894 of the table after its header line), then ``<|startoftext|>``
  (49406) and ``<|endoftext|>`` (49407): 49,408 entries;
- ``merges.txt`` = a ``#version`` header line plus those 48,894 merges.

The files are written once per cache directory (atomic rename, so concurrent writers never leave a
half-written file) and reused afterwards.
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

from weakseg.io import write_text

__all__ = ["CLIP_VOCAB_SIZE", "NUM_MERGES", "BOS_TOKEN", "EOS_TOKEN", "clip_bpe_files", "clip_vocab_and_merges",
           "default_tokenizer_dir", "make_clip_tokenizer"]

NUM_MERGES = 49152 - 256 - 2  # 48894, as CLIP's tokenizer
CLIP_VOCAB_SIZE = 256 * 2 + NUM_MERGES + 2  # 49408
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP / GPT-2 reversible byte -> unicode map (printable bytes keep their code point)."""
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def _open_clip_bpe_path() -> Path:
    try:
        import open_clip.tokenizer as oct
    except ImportError as e:  # pragma: no cover - open_clip is a declared dependency of the models extra
        raise ImportError("building the CLIP tokenizer files needs open_clip_torch "
                          "(pip install 'weakseg[models]')") from e
    path = Path(oct.default_bpe())
    if not path.is_file():
        raise FileNotFoundError(f"open_clip's BPE table not found at {path} (expected bpe_simple_vocab_16e6.txt.gz "
                                "inside the open_clip package)")
    return path


def clip_vocab_and_merges(bpe_path: str | Path | None = None) -> tuple[dict[str, int], list[str]]:
    """The CLIP vocabulary (token -> id, 49,408 entries) and the 48,894 merges ("a b" strings) built
    from the gzipped BPE table (default: the one inside open_clip)."""
    path = Path(bpe_path) if bpe_path is not None else _open_clip_bpe_path()
    lines = gzip.open(path).read().decode("utf-8").split("\n")
    merges = lines[1:NUM_MERGES + 1]
    if len(merges) != NUM_MERGES or any(len(m.split()) != 2 for m in merges):
        raise ValueError(f"{path}: expected a header line and at least {NUM_MERGES} merges of two symbols each")
    symbols = list(_bytes_to_unicode().values())
    vocab_list = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges] + [BOS_TOKEN, EOS_TOKEN]
    vocab = {tok: i for i, tok in enumerate(vocab_list)}
    if len(vocab) != CLIP_VOCAB_SIZE:
        raise ValueError(f"{path}: the BPE table gives {len(vocab)} distinct tokens, expected {CLIP_VOCAB_SIZE}")
    return vocab, merges


def default_tokenizer_dir() -> Path:
    """``$WEAKSEG_CACHE/clip_bpe`` if set, else ``~/.cache/weakseg/clip_bpe``."""
    root = os.environ.get("WEAKSEG_CACHE")
    base = Path(root) if root else Path.home() / ".cache" / "weakseg"
    return base / "clip_bpe"


def clip_bpe_files(cache_dir: str | Path | None = None) -> tuple[Path, Path]:
    """Paths of ``vocab.json`` and ``merges.txt`` in ``cache_dir`` (default :func:`default_tokenizer_dir`),
    written from open_clip's BPE table the first time (atomically)."""
    d = Path(cache_dir) if cache_dir is not None else default_tokenizer_dir()
    d.mkdir(parents=True, exist_ok=True)
    vocab_path, merges_path = d / "vocab.json", d / "merges.txt"
    if not (vocab_path.is_file() and merges_path.is_file()):
        vocab, merges = clip_vocab_and_merges()
        write_text(merges_path, "#version: 0.2\n" + "\n".join(merges) + "\n")
        write_text(vocab_path, json.dumps(vocab, ensure_ascii=False))
    return vocab_path, merges_path


def make_clip_tokenizer(cache_dir: str | Path | None = None, *, pad_token: str = EOS_TOKEN,
                        model_max_length: int = 77):
    """A transformers ``CLIPTokenizer`` on the offline files.

    pad_token: ``"<|endoftext|>"`` as SD v1.5's tokenizer, ``"!"`` (id 0) as SD 2.x's. As with the hub's
    SD 2.x tokenizer, "!" is then a special token, so a "!" inside a prompt becomes id 0 on its own
    (open_clip would merge "!!" into one token); ids equal open_clip's on text without "!".
    """
    from transformers import CLIPTokenizer

    vocab_path, _ = clip_bpe_files(cache_dir)
    return CLIPTokenizer.from_pretrained(str(vocab_path.parent), local_files_only=True, pad_token=pad_token,
                                         model_max_length=model_max_length)
