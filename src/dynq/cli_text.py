"""Text is data, never markup: the one way the CLI shows text that comes from a model, a file or a user.

Tensor names, paths, metadata values, recipe names, template problems and completions can hold anything. Printed
as rich markup, `[/]` crashes the command and `[link=...]` turns into a hyperlink; written raw, an escape sequence
in GGUF metadata recolours, retitles or rewrites the user's terminal. Everything here is plain `Text` (rich never
parses it) and every control character is shown as an escape instead of reaching the terminal.
"""

from __future__ import annotations

import re

from rich.text import Text

__all__ = ["clean", "data", "line"]

# C0 controls but tab and newline (ESC starts terminal sequences; CR and backspace overwrite what was printed), DEL,
# C1 controls (0x9b is a one-character CSI on many terminals) and the bidi embeddings, overrides and isolates, which
# reorder what the eye reads ("Trojan Source"); lone surrogates, which is how Python keeps the bytes of a file name
# that is not UTF-8 (one of them may be 0x9b) and which a strict encoder refuses to write at all.
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069\ud800-\udfff]")


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


def data(value: object, style: str = "") -> Text:
    """`value` as rich Text: cleaned, and never parsed as markup (nor emoji codes, nor highlighted)."""
    return Text(clean(value), style=style)


def line(*parts: str | Text, style: str = "") -> Text:
    """One line from the program's own labels (plain `str`) and data pieces (`Text` from `data`, keeping their
    style). Labels are appended as text too, and cleaned, so an f-string that slips data into one stays harmless."""
    out = Text(style=style)
    for part in parts:
        if isinstance(part, Text) and _CONTROL.search(part.plain):
            part = data(part.plain, str(part.style))  # a Text not made by `data`: cleaned, keeping its base style
        out.append(part if isinstance(part, Text) else clean(part))
    return out
