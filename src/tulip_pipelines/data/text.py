"""Caption text helpers shared by the demo generator and the training data."""

from __future__ import annotations

import re

# A sentence ends at . ! or ? followed by white space (or the end of the text).
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def split_sentences(caption: str) -> list[str]:
    """Split a caption into sentences (simple rule: end punctuation followed by white space)."""
    return [s.strip() for s in _SENTENCE_END.split(caption.strip()) if s.strip()]


def first_sentence(caption: str) -> str:
    """The caption's first sentence: TULIP's short caption in the expansion stage."""
    sentences = split_sentences(caption)
    return sentences[0] if sentences else ""


def tulip_short_caption(caption: str) -> str:
    """TULIP's preprocessing of a short caption: up to the first period, the period kept
    (``caption.split('.')[0] + '.'``; a decimal point ends it too)."""
    return caption.split(".")[0] + "."


def longclip_short_caption(caption: str) -> str:
    """Long-CLIP's short caption: newlines to spaces, then up to the first ``". "`` (no period;
    the whole caption when there is none)."""
    return caption.replace("\n", " ").split(". ")[0]


# How a short caption is cut from a long one (the ``short_caption`` parameters).
SHORT_CAPTIONS = {
    "first_sentence": first_sentence,
    "tulip": tulip_short_caption,
    "longclip": longclip_short_caption,
}
