"""The one exception type users see: its message is a single line that says what is wrong and what to do."""


class DynqError(Exception):
    """A problem with the user's input (file, recipe, option); the CLI prints it as one line and exits non-zero."""
