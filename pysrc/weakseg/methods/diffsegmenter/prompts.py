"""DiffSegmenter's prompts: the class prompt with Compel's weight (:func:`build_prompt`), the token
positions of the class map with the reference's "ing" rule (:func:`class_token_positions`), and the
caption continuation appended after the class phrase (:func:`caption_continuation`, :func:`caption_seed`).
docs/specs/diffsegmenter_iseg.md (prefix DS).
"""

from __future__ import annotations

from weakseg.methods.diffsegmenter.config import CAPTION_SEED

__all__ = ["build_prompt", "class_token_positions", "caption_continuation", "caption_seed"]


def build_prompt(template: str, name: str, continuation: str = "", weight_words: str = "all") -> str:
    """The class prompt: ``template`` with ``{c}`` = ``name``, then the caption continuation (if any)
    after one space. A multi-word name followed by a weight (``{c}++``) is parenthesised with
    ``weight_words="all"``, so Compel's weight covers every word of it (``(potted plant)++``); with
    ``"last"`` it is not, and the weight falls on the last word (``potted plant++``, the reference's
    Context / COCO scripts)."""
    if weight_words not in ("all", "last"):
        raise ValueError(f"build_prompt: weight_words must be 'all' or 'last', got {weight_words!r}")
    weighted = "{c}+" in template
    group = weighted and weight_words == "all" and len(name.split()) > 1
    prompt = template.format(c=f"({name})" if group else name)
    cont = continuation.strip()
    return f"{prompt} {cont}" if cont else prompt


def caption_continuation(caption: str | None, name: str, seed: str = CAPTION_SEED) -> str:
    """What a caption adds after the class phrase: the caption without a leading ``seed`` (formatted
    with the class; compared case-insensitively, as BLIP lower-cases), else the whole caption."""
    if not caption:
        return ""
    text = " ".join(str(caption).split())
    head = seed.format(c=name)
    if text.lower().startswith(head.lower()):
        text = text[len(head):]
    return text.strip()


def caption_seed(template: str) -> str:
    """BLIP's seed text for a prompt template: the template without Compel's ``++`` ("a photograph of
    {c}++" -> "a photograph of {c}", as the reference seeds BLIP)."""
    return template.replace("++", "")


def class_token_positions(sd, prompt: str, name: str, mode: str = "mean", fuse_ing: bool = True,
                          ing_rule: str = "code") -> list[int]:
    """Token positions (0 = start-of-text) whose cross-attention maps are averaged into the class map:
    the class phrase's tokens (all, the first or the last, by ``mode``) and, with ``fuse_ing``, the
    word right after it when that word ends in "ing" (DS: ptp_stable_best.py L515-518). ``ing_rule``:
    "code" tests the reference's word, ``prompt.split(" ")[i]`` right after the class phrase with its
    punctuation (so "sitting," does not end in "ing"), and fuses the one token after the class; "word"
    tests the BPE word after the class (letters only) and fuses all of its tokens."""
    from weakseg.backbones.diffusion import parse_prompt_weights

    if ing_rule not in ("code", "word"):
        raise ValueError(f"class_token_positions: ing_rule must be 'code' or 'word', got {ing_rule!r}")
    span = sd.token_indices(prompt, name)
    pos = span if mode == "mean" else [span[0]] if mode == "first" else [span[-1]]
    if not fuse_ing:
        return list(pos)
    text, _ = parse_prompt_weights(prompt)
    ids = sd.tokenizer(text, add_special_tokens=True).input_ids[: sd.tokenizer.model_max_length - 1]
    if ing_rule == "code":
        nxt = span[-1] + 1
        before = len(sd.tokenizer.decode(ids[1:span[0]]).split())  # whitespace words before the class
        words = prompt.split(" ")
        i = before + len(name.split())
        if i < len(words) and words[i].endswith("ing") and nxt < len(ids) \
                and ids[nxt] not in sd.tokenizer.all_special_ids:
            return list(pos) + [nxt]
        return list(pos)
    toks = sd.tokenizer.convert_ids_to_tokens(ids)
    word, nxt = [], span[-1] + 1
    while nxt < len(toks) and ids[nxt] not in sd.tokenizer.all_special_ids:
        word.append(nxt)
        if toks[nxt].endswith("</w>"):
            break
        nxt += 1
    text_word = "".join(toks[i] for i in word).replace("</w>", "")
    if word and text_word.isalpha() and text_word.lower().endswith("ing"):
        return list(pos) + word
    return list(pos)
