"""Where dynq keeps what it fetches or builds: models, references, imatrices (never in the repository)."""

import os
from pathlib import Path


def cache_dir() -> Path:
    """`$DYNQ_CACHE_DIR`, else `$XDG_CACHE_HOME/dynq`, else `~/.cache/dynq`."""
    if explicit := os.environ.get("DYNQ_CACHE_DIR"):
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "dynq"
