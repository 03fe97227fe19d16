"""Planning rules: one small function each, returning a Decision or None (not mine to decide).

Rules run in order; the first that decides wins. User overrides are applied after the rules,
but never over a safety rule (a module that cannot be quantized stays kept, with its reason).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from anyquant.config import MethodConfig
from anyquant.methods import handler_for
from anyquant.model.modelmap import (
    EMBEDDING,
    HEAD,
    LINEAR,
    PROJECTOR,
    VISION,
    ModelMap,
    ModuleInfo,
)
from anyquant.planning.plan import KEEP, QUANTIZE, Decision


@dataclass
class PlanContext:
    """What rules may read besides the module and the ModelMap: the probe's facts (None when
    no probe ran: then no rule may assume a module is safe from them) and planning flags."""

    facts: object | None = None  # anyquant.numerics.probe.ProbeFacts
    include_vision: bool = False
    only: list[str] = field(default_factory=list)
    # median of the Linear layers' input absmax in the probe forward (the outlier rule's scale)
    linear_input_median: float | None = None
    # the dtype policy's float32 regions (float16 overflow contained there, F3): the outlier rule
    # leaves their Linears to the policy, which quantizes them computing in float32
    float32_regions: list[str] = field(default_factory=list)
    # Linear layers whose quantized tensors transformers would not load back (model/tree.py
    # not_reloadable): name -> why
    not_reloadable: dict[str, str] = field(default_factory=dict)


# Quality guard (rule_outlier_input): a Linear whose probe input absmax is over OUTLIER_RATIO x
# the median of all Linear inputs and over OUTLIER_FLOOR stays in float. Measured on the probe
# inputs: SmolLM2-135M (the default model) peaks at 3.24e3 = 727x its median 4.46
# (layers.11.mlp.down_proj) and must keep quantizing; the tests' outlier_llama peaks at 1.4x;
# a planted outlier layer (input 1.2e5 where the rest is ~10) is ~1e4x. Both limits sit ~3x
# above the default model's largest value.
OUTLIER_RATIO = 2000.0
OUTLIER_FLOOR = 1e4


Rule = Callable[[ModuleInfo, ModelMap, MethodConfig, str, PlanContext], "Decision | None"]


def _keep(m: ModuleInfo, dtype: str, code: str, reason: str) -> Decision:
    return Decision(m.name, m.kind, m.component, KEEP, None, dtype, code, reason)


def rule_not_linear(m, mm, cfg, dtype, ctx):
    if m.kind != LINEAR:
        what = "embedding" if m.kind == EMBEDDING else m.kind
        return _keep(m, dtype, "not_linear", f"{what} module: only Linear layers are quantized")
    return None


def rule_already_quantized(m, mm, cfg, dtype, ctx):
    if m.quantized:
        return _keep(m, dtype, "already_quantized", f"already quantized ({m.type}); never quantized twice")
    return None


def rule_keep_in_fp32(m, mm, cfg, dtype, ctx):
    pattern = mm.keep_fp32_pattern(m.name)
    if pattern is not None:
        return _keep(m, dtype, "keep_in_fp32_modules",
                     f"the model's code lists {pattern!r} in _keep_in_fp32_modules: kept in float")
    return None


def rule_weight_read_outside_forward(m, mm, cfg, dtype, ctx):
    facts = ctx.facts
    if facts is not None and m.kind == LINEAR and m.name in getattr(facts, "outside_reads", {}):
        return _keep(m, dtype, "weight_read_outside_forward",
                     f"weight read outside its module's forward by {facts.reader_text(m.name)}: "
                     "a quantized module would hand that code packed integers")
    return None


def rule_not_probed(m, mm, cfg, dtype, ctx):
    """A VLM whose forward with images failed: the vision tower and projector never ran in the
    probe, so weights read outside forward and dtype boundaries there are unchecked: they stay
    in float with that reason (a safety decision: overrides cannot quantize them)."""
    facts = ctx.facts
    failure = getattr(facts, "image_failure", "") if facts is not None else ""
    if failure and m.kind == LINEAR and m.component in (VISION, PROJECTOR) and m.name not in facts.called:
        return _keep(m, dtype, "not_probed",
                     f"{m.component}: not probed (the probe forward with images failed: {failure[:160]}): "
                     "weights read outside forward and dtype boundaries are unchecked here, so it stays in float")
    return None


def rule_head(m, mm, cfg, dtype, ctx):
    if m.component == HEAD:
        tied = f" (tied to {', '.join(m.tied_with)})" if m.tied_with else ""
        return _keep(m, dtype, "output_head", f"output head{tied}: its error goes straight into the logits")
    return None


def rule_tied(m, mm, cfg, dtype, ctx):
    if m.tied_with:
        return _keep(m, dtype, "tied_weight", f"weight shared with {', '.join(m.tied_with)}: quantizing it would change both")
    return None


def rule_vision(m, mm, cfg, dtype, ctx):
    if m.component == VISION and ctx.include_vision:
        return None  # --include-vision: its Linear layers are quantized (convolutions never are)
    if m.component in (VISION, PROJECTOR):
        return _keep(m, dtype, f"{m.component.replace(' ', '_')}_float",
                     f"{m.component}: kept in float by default (small share of weights, sensitive)")
    return None


def rule_outlier_input(m, mm, cfg, dtype, ctx):
    facts, med = ctx.facts, ctx.linear_input_median
    if facts is None or not med or m.kind != LINEAR:
        return None
    if any(r == "" or m.name == r or m.name.startswith(r + ".") for r in ctx.float32_regions):
        return None
    v = getattr(facts, "input_absmax", {}).get(m.name)
    if v is not None and v > OUTLIER_FLOOR and v > OUTLIER_RATIO * med:
        return _keep(m, dtype, "outlier_input",
                     f"its inputs reach {v:.3g} in the probe forward, {v / med:.0f}x the median Linear input "
                     f"({med:.3g}; limits {OUTLIER_RATIO:.0f}x and {OUTLIER_FLOOR:.0g}): quantizing it would dominate "
                     "the model's error, so it stays in float (override with a plan file to quantize it)")
    return None


def rule_not_reloadable(m, mm, cfg, dtype, ctx):
    why = ctx.not_reloadable.get(m.name)
    if why:
        return _keep(m, dtype, "not_reloadable", f"{why}; kept in float so that the saved output runs "
                     "(int4, hqq, awq and gptq, loaded by anyquant, take it)")
    return None


def rule_shape(m, mm, cfg, dtype, ctx):

    ok, options, code, reason = handler_for(cfg.method).fit(m, cfg)
    if not ok:
        return _keep(m, dtype, code, reason)
    return Decision(m.name, m.kind, m.component, QUANTIZE, cfg.method, dtype, code, reason, options)


RULES: list[Rule] = [
    rule_not_linear, rule_already_quantized, rule_keep_in_fp32, rule_weight_read_outside_forward,
    rule_not_probed, rule_head, rule_tied, rule_vision, rule_not_reloadable, rule_outlier_input, rule_shape,
]
