"""Planning rules: one small function each, returning a Decision or None (not mine to decide).

Rules run in order; the first that decides wins. User overrides are applied after the rules,
but never over a safety rule (a module that cannot be quantized stays kept, with its reason).
"""

from __future__ import annotations

from typing import Callable

from anyquant.config import MethodConfig
from anyquant.model.modelmap import (
    EMBEDDING, HEAD, LINEAR, PROJECTOR, VISION, ModelMap, ModuleInfo,
)
from anyquant.plan.plan import KEEP, QUANTIZE, Decision

Rule = Callable[[ModuleInfo, ModelMap, MethodConfig, str], "Decision | None"]


def _keep(m: ModuleInfo, dtype: str, code: str, reason: str) -> Decision:
    return Decision(m.name, m.kind, m.component, KEEP, None, dtype, code, reason)


def rule_not_linear(m, mm, cfg, dtype):
    if m.kind != LINEAR:
        what = "embedding" if m.kind == EMBEDDING else m.kind
        return _keep(m, dtype, f"not_linear", f"{what} module: only Linear layers are quantized")
    return None


def rule_already_quantized(m, mm, cfg, dtype):
    if m.quantized:
        return _keep(m, dtype, "already_quantized", f"already quantized ({m.type}); never quantized twice")
    return None


def rule_head(m, mm, cfg, dtype):
    if m.component == HEAD:
        tied = f" (tied to {', '.join(m.tied_with)})" if m.tied_with else ""
        return _keep(m, dtype, "output_head", f"output head{tied}: its error goes straight into the logits")
    return None


def rule_tied(m, mm, cfg, dtype):
    if m.tied_with:
        return _keep(m, dtype, "tied_weight", f"weight shared with {', '.join(m.tied_with)}: quantizing it would change both")
    return None


def rule_vision(m, mm, cfg, dtype):
    if m.component in (VISION, PROJECTOR):
        return _keep(m, dtype, f"{m.component.replace(' ', '_')}_float",
                     f"{m.component}: kept in float by default (small share of weights, sensitive)")
    return None


def rule_shape(m, mm, cfg, dtype):
    from anyquant.methods.registry import handler_for

    ok, options, code, reason = handler_for(cfg.method).fit(m, cfg)
    if not ok:
        return _keep(m, dtype, code, reason)
    return Decision(m.name, m.kind, m.component, QUANTIZE, cfg.method, dtype, code, reason, options)


RULES: list[Rule] = [rule_not_linear, rule_already_quantized, rule_head, rule_tied, rule_vision, rule_shape]
