"""Cut streamed text into sentences, so an answer is spoken while it is still being written."""

from __future__ import annotations

import re

#: A sentence ends at . ! ? or … (and closing quotes or brackets) followed by white space, or at a line break.
_END = re.compile(r"""[.!?…]+["'”’)\]]*\s+|\n+""")
#: A sentence longer than this is cut at its last comma, semicolon or space before the limit.
MAX_CHARS = 240
#: Notes for readers that are not read out: "[cut: ...]" at the end of a message cut short (a front-end
#: developer's find: the spoken answer ended with the note's words).
_UNSPOKEN = re.compile(r"\[cut:[^\]]*\]")


class SentenceSplitter:
    """Feed text as it streams; get back each sentence once it is complete."""

    def __init__(self) -> None:
        self._pending = ""

    def feed(self, text: str) -> list[str]:
        self._pending += text
        out: list[str] = []
        while True:
            match = _END.search(self._pending)
            if match is None:
                break
            out += _said(self._pending[: match.end()])
            self._pending = self._pending[match.end() :]
        while len(self._pending) > MAX_CHARS:
            cut = _cut(self._pending)
            out += _said(self._pending[:cut])
            self._pending = self._pending[cut:]
        return out

    def flush(self) -> list[str]:
        """What is left at the end of the message."""
        rest, self._pending = self._pending, ""
        return _said(rest)


def _cut(text: str) -> int:
    """Where to cut ``text`` (longer than ``MAX_CHARS``): after its last comma, semicolon or space before the limit."""
    cut = max(text.rfind(mark, 0, MAX_CHARS) for mark in (", ", "; ", " "))
    return cut + 1 if cut > 0 else MAX_CHARS


def _said(text: str) -> list[str]:
    """``text`` stripped, if it has anything to say (letters or digits), in pieces of at most ``MAX_CHARS``
    (a long sentence that came whole, in one part, is cut as one still streaming is)."""
    out: list[str] = []
    text = _UNSPOKEN.sub("", text).strip()
    while len(text) > MAX_CHARS:
        cut = _cut(text)
        out += _said(text[:cut])
        text = text[cut:].strip()
    return [*out, text] if any(ch.isalnum() for ch in text) else out
