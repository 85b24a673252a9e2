"""Control characters made visible: text from a model, a file or a user (metadata, names, completions) may carry
escape sequences, and whatever shows it (a terminal, a model card) must show them, not obey them."""

from __future__ import annotations

import re

# C0 controls but tab and newline (ESC starts terminal sequences; CR and backspace overwrite what was printed), DEL,
# C1 controls (0x9b is a one-character CSI on many terminals) and the bidi controls, which reorder what the eye reads
# ("Trojan Source"): the embeddings, overrides and isolates, and the marks (left-to-right, right-to-left, Arabic
# letter mark), which flip the neutral characters around them; lone surrogates, which is how Python keeps the bytes
# of a file name that is not UTF-8 (one of them may be 0x9b) and which a strict encoder refuses to write at all.
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069\ud800-\udfff]")


def _visible(m: re.Match[str]) -> str:
    code = ord(m.group())
    if 0xDC80 <= code <= 0xDCFF:  # a byte of a file name that is not UTF-8, as Python's surrogateescape keeps it
        return f"\\x{code - 0xDC00:02x}"
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def clean(value: object) -> str:
    """`str(value)` with every control character but newline and tab written as a visible escape (`\\x1b`,
    `\\u202e`): nothing acts on the terminal, and the user still sees what was there. Each character is replaced on
    its own, so text cleaned piece by piece (streamed tokens) is as safe as text cleaned whole."""
    return _CONTROL.sub(_visible, str(value))


def one_line(value: object) -> str:
    """`clean(value)` with line breaks shown as `\\n` too: a message that must stay one line (an error naming a path
    that holds a newline) cannot be split into lines that look like others."""
    return clean(value).replace("\n", "\\n")


def has_control(text: str) -> bool:
    return _CONTROL.search(text) is not None
