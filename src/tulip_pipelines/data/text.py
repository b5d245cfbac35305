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
