"""anyquant: quantize PyTorch / Hugging Face models to 8 and 4 bits, and say what it cost.

Public API (anyquant.api): inspect, plan, quantize, quantize_to_disk, save, load, evaluate, export, doctor, known_methods.
They are resolved on first use, so `import anyquant` (and the command line's argument checks)
does not pay for torch and transformers until a function is called."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["inspect", "plan", "quantize", "quantize_to_disk", "save", "load", "evaluate", "export", "doctor", "known_methods",
           "__version__"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from anyquant import api

        value = getattr(api, name)
        globals()[name] = value  # later lookups skip __getattr__
        return value
    raise AttributeError(f"module 'anyquant' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
