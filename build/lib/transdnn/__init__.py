"""transdnn: detached DNN region embeddings for mouse-human brain translation (TransBrain)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("transdnn")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"
