"""anyquant: quantize PyTorch / Hugging Face models to 8 and 4 bits, and say what it cost.

Public API: inspect, plan, quantize, save, load, evaluate.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__version__ = "0.1.0"

__all__ = ["inspect", "plan", "quantize", "save", "load", "evaluate", "known_methods", "__version__"]


# Import the `anyquant.plan` subpackage now: importing it later (inside a function) would
# rebind the package attribute `plan` from the function below to the subpackage.
import anyquant.plan as _plan_subpackage  # noqa: E402,F401


def _as_model(model, trust_remote_code: bool = False):
    if isinstance(model, (str, Path)):
        from anyquant.model.load import load_model

        m, _, _ = load_model(model, trust_remote_code=trust_remote_code, requantize=True)
        return m
    return model


def inspect(model, *, trust_remote_code: bool = False):
    """ModelMap of a model (nn.Module) or model directory: components, kinds, tied and quantized tensors."""
    from anyquant.model.modelmap import build_model_map

    return build_model_map(_as_model(model, trust_remote_code))


def plan(model, method: str = "nf4", *, dtype: str = "auto", overrides=None, trust_remote_code: bool = False,
         include_vision: bool = False, only=None, **options):
    """The Plan anyquant would follow: one decision per module, each with a reason.

    Runs one probe forward first (weights read outside their module's forward)."""
    from anyquant.config import make_config
    from anyquant.model.modelmap import build_model_map
    from anyquant.numerics.dtype import choose_compute_dtype, dtype_name
    from anyquant.plan import build_plan

    m = _as_model(model, trust_remote_code)
    cfg = make_config(method, **options)
    dev = next((p.device for p in m.parameters()), "cpu")
    from anyquant.numerics.probe import run_probe
    from anyquant.pipeline import probe_inputs

    facts, _, notes = run_probe(m, probe_inputs(m))
    p = build_plan(build_model_map(m), cfg, dtype_name(choose_compute_dtype(dtype, dev)), overrides, facts,
                   include_vision=include_vision, only=only)
    p.notes = notes + p.notes
    return p


def quantize(model, method: str = "nf4", **options: Any):
    """Quantize; returns a QuantizeResult (.model, .plan, .report). See anyquant.pipeline.quantize."""
    from anyquant.pipeline import quantize as _quantize

    return _quantize(model, method, **options)


def save(result, out_dir, *, force: bool = False) -> Path:
    from anyquant.formats.io import save as _save

    return _save(result, out_dir, force=force)


def load(directory, *, trust_remote_code: bool = False):
    """A saved anyquant output as a model callable like the source model."""
    from anyquant.formats.io import load_quantized

    return load_quantized(directory, trust_remote_code=trust_remote_code)


def evaluate(model, baseline=None, text: str | None = None, *, tokenizer=None, max_tokens: int = 16384, progress: bool = True) -> dict:
    """Perplexity, KL divergence and top-1 agreement against `baseline` on held-out text."""
    from anyquant.evaluate import evaluate as _evaluate

    return _evaluate(model, baseline, text, tokenizer=tokenizer, max_tokens=max_tokens, progress=progress)


def known_methods() -> list[str]:
    from anyquant.config import known_methods as k

    return k()
