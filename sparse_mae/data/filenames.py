"""File names as they are on disk, written so that one name is one unambiguous line.

A POSIX file name is bytes: it may hold a newline (which splits a one-name-a-line list such as
a shard's names.txt, so a damage report would name the wrong file) or bytes that are not UTF-8
(which Python carries as lone surrogates and cannot encode: they aborted `prepare`). Every name
prepare stores (names.txt, unreadable.txt, the manifest) and every damage report shows goes
through `printable_name`: UTF-8 text is kept as it is; a backslash, a control character, a
line separator and a byte that is not UTF-8 become backslash escapes. Different names stay
different (the backslash itself is escaped), and none spans two lines.
"""
from __future__ import annotations

import os
import re

# a backslash, C0 and C1 controls (newline, tab, ...), DEL, Unicode's line and paragraph
# separators, and the surrogates U+DC80..U+DCFF through which Python carries a byte that is not UTF-8
_ESCAPED = re.compile("[\\\\\x00-\x1f\x7f-\x9f\u2028\u2029\udc80-\udcff]")
_SHORT = {"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(match: re.Match) -> str:
    char = match.group()
    if char in _SHORT:
        return _SHORT[char]
    code = ord(char)
    if code >= 0xDC80:  # a byte that is not UTF-8: \xNN, the byte (a character of the name is \uNNNN)
        return f"\\x{code - 0xDC00:02x}"
    return f"\\x{code:02x}" if code < 0x80 else f"\\u{code:04x}"


def printable_name(path: str | bytes | os.PathLike) -> str:
    """The file name `path` as one line of UTF-8 text, escaped where it is not plain text
    (`b'a\\xff\\nb.jpg'` -> `a\\xff\\nb.jpg`, with one backslash before each escape)."""
    return _ESCAPED.sub(_escape, os.fsencode(path).decode("utf-8", "surrogateescape"))
