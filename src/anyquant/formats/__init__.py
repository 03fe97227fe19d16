"""Output formats (registry.Format): bitsandbytes and compressed-tensors; io.py saves and loads
whole outputs atomically. Importing the package registers every built-in format."""

from anyquant.formats import bnb, compressed  # noqa: F401  (each registers its format)
from anyquant.formats.registry import Format, format_for, register_format

__all__ = ["Format", "format_for", "register_format"]
