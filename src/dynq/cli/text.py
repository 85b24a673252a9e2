"""Text is data, never markup: the one way the CLI shows text that comes from a model, a file or a user.

Tensor names, paths, metadata values, recipe names, template problems and completions can hold anything. Printed
as rich markup, `[/]` crashes the command and `[link=...]` turns into a hyperlink; written raw, an escape sequence
in GGUF metadata recolours, retitles or rewrites the user's terminal. Everything here is plain `Text` (rich never
parses it) and every control character is shown as an escape instead of reaching the terminal.
"""

from __future__ import annotations

from rich.text import Text

from dynq.core.visible import clean, has_control

__all__ = ["clean", "data", "line"]


def data(value: object, style: str = "") -> Text:
    """`value` as rich Text: cleaned, and never parsed as markup (nor emoji codes, nor highlighted)."""
    return Text(clean(value), style=style)


def line(*parts: str | Text, style: str = "") -> Text:
    """One line from the program's own labels (plain `str`) and data pieces (`Text` from `data`, keeping their
    style). Labels are appended as text too, and cleaned, so an f-string that slips data into one stays harmless."""
    out = Text(style=style)
    for part in parts:
        if isinstance(part, Text) and has_control(part.plain):
            part = data(part.plain, str(part.style))  # a Text not made by `data`: cleaned, keeping its base style
        out.append(part if isinstance(part, Text) else clean(part))
    return out
