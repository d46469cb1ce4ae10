"""Text cleaning for scraped Q&A: HTML, control characters, whitespace; and length limits.

``clean_text`` keeps the text's meaning and its paragraph breaks: it decodes HTML entities
(twice, since scraped pages often carry ``&amp;nbsp;``), turns ``<br>``/``<p>`` into line
breaks and drops every other tag, removes NUL and other control characters, maps exotic
spaces (NBSP, ideographic space, zero-width) to plain ones, collapses runs of spaces, trims
each line, and keeps at most one blank line between paragraphs. Full-width punctuation is
left alone: it is normal in Chinese text.
"""

from __future__ import annotations

import html
import re

# One cheap search decides whether a field needs the slow path; most rows are clean.
_SUSPECT = re.compile(r"[&<\x00-\x09\x0b-\x1f\x7f-\x9f\u00a0\u1680\u2000-\u200f\u2028\u2029\u202f\u205f\u3000\ufeff]")
_BREAK_TAG = re.compile(r"<\s*(?:br|/p|p|/div|div|/li|li|tr|/tr)\b[^>]*>", re.IGNORECASE)
_TAG = re.compile(r"</?[A-Za-z][A-Za-z0-9:-]*(?:\s[^<>]*)?/?>|<!--.*?-->", re.DOTALL)
# str.translate with a dict walks every character in Python; these regexes scan in C.
_SPACE_LIKE = re.compile(r"[\t\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000]")
_LINE_LIKE = re.compile(r"[\u2028\u2029\x0b\x0c\x85]")
_ZERO_WIDTH = re.compile(r"[\u200b-\u200f\ufeff]")
_CONTROL = re.compile(r"[\x00-\x08\x0e-\x1f\x7f-\x84\x86-\x9f]")
_RUN_OF_SPACES = re.compile(r" {2,}")
_LINE_EDGES = re.compile(r" *\n *")
_BLANK_LINES = re.compile(r"\n{3,}")


def clean_text(text: str) -> str:
    if not text:
        return text
    # Substring tests run at C speed; a regex alternation here cost 3x on long replies.
    if not (_SUSPECT.search(text) or "  " in text or " \n" in text or "\n " in text or "\n\n\n" in text):
        return text.strip()
    if "&" in text:
        text = html.unescape(html.unescape(text))
    if "<" in text:
        text = _BREAK_TAG.sub("\n", text)
        text = _TAG.sub("", text)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _ZERO_WIDTH.sub("", _LINE_LIKE.sub("\n", _SPACE_LIKE.sub(" ", text)))
    text = _CONTROL.sub("", text)
    text = _RUN_OF_SPACES.sub(" ", text)
    text = _LINE_EDGES.sub("\n", text)
    text = _BLANK_LINES.sub("\n\n", text)
    return text.strip()


def length_problem(text: str, what: str, minimum: int, maximum: int) -> str | None:
    """The rejection reason for a text outside [minimum, maximum] characters, else None.

    ``what`` is ``question`` or ``answer``; reasons read ``empty_answer``,
    ``answer_too_short``, ``question_too_long``…
    """
    n = len(text)
    if n == 0:
        return f"empty_{what}"
    if n < minimum:
        return f"{what}_too_short"
    if n > maximum:
        return f"{what}_too_long"
    return None
