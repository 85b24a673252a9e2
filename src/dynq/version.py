"""The installed dynq version, recorded in every file dynq writes."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("dynq")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0+local"
