"""Captions as people write them: read and clean a caption file, then vary it per view.

``read_caption`` removes a byte-order mark (Windows Notepad), CRLF line ends and stray whitespace: every run of
whitespace, newlines included, becomes one space. ``CaptionPolicy.apply`` makes one view's caption from it,
in kohya's order:

    caption → (dropout: "" with probability caption_dropout)
            → tags = split on the separator; the first keep_tags stay in place,
              the others are each dropped with probability tag_dropout, then shuffled
            → trigger word prepended (unless the caption already starts with it)

Dropping the whole caption teaches the unconditional prediction that classifier-free guidance needs.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np


class CaptionError(ValueError):
    """A caption file that cannot be read as text; the message says why (callers name the file)."""


def clean_caption(text: str) -> str:
    """BOM, CRLF and whitespace runs removed: '\\ufeffa  sks\\r\\nstar ' -> 'a sks star'."""
    return " ".join(text.lstrip("\ufeff").split())


def read_caption(path: str | Path) -> str:
    """The cleaned caption in ``path`` (UTF-8, with or without a BOM); raises CaptionError if not text."""
    try:
        return clean_caption(Path(path).read_bytes().decode("utf-8-sig"))
    except UnicodeDecodeError as e:
        raise CaptionError(f"not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise CaptionError(f"unreadable ({e.strerror})") from None


@dataclass(frozen=True)
class CaptionPolicy:
    """How one view's caption is made from an image's caption (see the module docstring)."""

    shuffle_tags: bool = False
    keep_tags: int = 0
    tag_dropout: float = 0.0
    caption_dropout: float = 0.0
    trigger_word: str | None = None
    separator: str = ","

    @property
    def varies(self) -> bool:
        """True when views of one image get different captions (a text-embedding cache would not repeat)."""
        return self.shuffle_tags or self.tag_dropout > 0 or self.caption_dropout > 0

    def apply(self, caption: str, rng: np.random.Generator | None) -> str:
        """One view's caption; ``rng`` None gives the fixed caption (no dropout, tags in order)."""
        if rng is not None and self.caption_dropout > 0 and rng.random() < self.caption_dropout:
            return ""
        tagged = self.separator in caption  # a tag list gets the trigger as its first tag, prose as a word
        if rng is not None and (self.shuffle_tags or self.tag_dropout > 0):
            tags = [t.strip() for t in caption.split(self.separator) if t.strip()]
            kept, rest = tags[:self.keep_tags], tags[self.keep_tags:]
            if self.tag_dropout > 0:
                rest = [t for t in rest if rng.random() >= self.tag_dropout]
            if self.shuffle_tags:
                rest = [rest[i] for i in rng.permutation(len(rest))]
            joiner = self.separator + " " if self.separator.strip() else self.separator
            caption = joiner.join(kept + rest)
        if self.trigger_word and not caption.startswith(self.trigger_word):
            joiner = self.separator + (" " if self.separator.strip() else "") if tagged else " "
            caption = self.trigger_word + (joiner + caption if caption else "")
        return caption


def token_count(tokenizer, caption: str) -> int:
    """Tokens of ``caption`` including the begin/end tokens (what the model_max_length limit counts)."""
    return len(tokenizer(caption, truncation=False).input_ids)


def overlong(tokenizer, captions: dict[str, str]) -> list[tuple[str, int]]:
    """(name, token count) of each caption longer than the tokenizer's limit (the text encoder drops the rest)."""
    limit = tokenizer.model_max_length
    counts = ((name, token_count(tokenizer, c)) for name, c in captions.items())
    return [(name, n) for name, n in counts if n > limit]
