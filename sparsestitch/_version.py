"""The installed package version, from package metadata."""

from importlib import metadata

try:
    __version__ = metadata.version("sparsestitch")
except metadata.PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"
