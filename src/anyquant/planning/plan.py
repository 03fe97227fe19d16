"""The Plan: one decision per module, as data (JSON round trip, reviewable, overridable)."""

from __future__ import annotations

import difflib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from anyquant.errors import AnyquantError
from anyquant.model.files import read_json_file
from anyquant.patterns import check_pattern, matches

QUANTIZE, KEEP = "quantize", "keep"
# A fused MoE expert tensor (a 3-D parameter [experts, out, in]): its decision is named by the
# parameter, not a module, and its quantized form is a runtime.experts.QuantizedExperts.
FUSED_EXPERTS = "fused_experts"
PLAN_VERSION = 1


@dataclass
class Decision:
    name: str
    kind: str
    component: str
    action: str
    method: str | None
    dtype: str
    reason_code: str
    reason: str
    options: dict[str, Any] = field(default_factory=dict)
    shape: list[int] | None = None  # [out_features, in_features] for Linear layers; [experts, out, in] for experts


@dataclass
class Plan:
    method: str
    config: dict[str, Any]
    compute_dtype: str
    decisions: list[Decision]
    notes: list[str] = field(default_factory=list)

    def to_quantize(self) -> list[Decision]:
        """The modules to quantize (Linear layers); fused experts: experts_to_quantize."""
        return [d for d in self.decisions if d.action == QUANTIZE and d.kind != FUSED_EXPERTS]

    def experts_to_quantize(self) -> list[Decision]:
        """The fused MoE expert tensors to quantize."""
        return [d for d in self.decisions if d.action == QUANTIZE and d.kind == FUSED_EXPERTS]

    def kept(self) -> list[Decision]:
        return [d for d in self.decisions if d.action == KEEP]

    def get(self, name: str) -> Decision | None:
        for d in self.decisions:
            if d.name == name:
                return d
        return None

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": PLAN_VERSION,
            "method": self.method,
            "config": self.config,
            "compute_dtype": self.compute_dtype,
            "decisions": [asdict(d) for d in self.decisions],
            "notes": list(self.notes),
        }

    @staticmethod
    def from_dict(d: dict[str, Any]) -> "Plan":
        return Plan(
            method=d["method"],
            config=d["config"],
            compute_dtype=d["compute_dtype"],
            decisions=[Decision(**x) for x in d["decisions"]],
            notes=list(d.get("notes", [])),
        )


OVERRIDE_KEYS = ("method", "group_size")


def check_override_action(pattern: str, action: Any, where: str) -> str | dict[str, Any]:
    """An override's action: "keep", "quantize", a method name, or {"method": ..., "group_size": ...}
    (either key may be left out). Returned as given; a malformed one is refused by name."""
    if isinstance(action, str):
        return action
    if isinstance(action, dict):
        unknown = sorted(set(action) - set(OVERRIDE_KEYS))
        if unknown:
            raise AnyquantError(f"{where}: override {pattern!r} has key(s) {', '.join(unknown)}; an override object "
                                f"takes {', '.join(OVERRIDE_KEYS)} (e.g. {{\"method\": \"int4\", \"group_size\": 64}})")
        if "method" in action and not isinstance(action["method"], str):
            raise AnyquantError(f"{where}: override {pattern!r}: method must be a string, got {action['method']!r}")
        g = action.get("group_size")
        if g is not None and (isinstance(g, bool) or not isinstance(g, int) or g <= 0 or g % 8):
            raise AnyquantError(f"{where}: override {pattern!r}: group_size={g!r} must be a positive multiple of 8 "
                                "(32, 64 or 128 are the usual choices)")
        return dict(action)
    raise AnyquantError(f"{where}: override {pattern!r} -> {action!r}: expected \"keep\", \"quantize\", a method "
                        "name or {\"method\": ..., \"group_size\": ...}")


def load_overrides(path: str | Path) -> list[tuple[str, str | dict[str, Any]]]:
    """Read a plan file: either {"overrides": [[pattern, action], ...]} / {"overrides": {pattern: action}},
    or a plan written by `anyquant plan --json` (then each decision is an exact-name override).
    An action is "keep", "quantize", the run's method, or an object {"method": ..., "group_size": ...}
    setting one module's method (the run's, or its alias) and group size (int4-family methods).

    Order matters: later entries win over earlier ones for the same module."""
    path = Path(path).expanduser()
    data = read_json_file(path, "--plan")
    out: list[tuple[str, str]] | None = None
    if isinstance(data, dict) and isinstance(data.get("decisions"), list):
        try:
            out = [(str(d["name"]), d["action"] if d["action"] == KEEP else str(d.get("method") or QUANTIZE))
                   for d in data["decisions"]]
        except (KeyError, TypeError):
            out = None
    else:
        ov = data.get("overrides") if isinstance(data, dict) else data
        if isinstance(ov, dict):
            out = [(str(a), check_override_action(str(a), b, f"--plan {path}")) for a, b in ov.items()]
        elif isinstance(ov, list) and all(isinstance(x, (list, tuple)) and len(x) == 2 for x in ov):
            out = [(str(a), check_override_action(str(a), b, f"--plan {path}")) for a, b in ov]
    if out is not None:
        for pattern, _ in out:
            check_pattern(pattern, f"--plan {path}: pattern")
        return out
    raise AnyquantError(
        f"--plan {path}: expected {{\"overrides\": {{\"<name or re:pattern>\": \"keep\" | \"<method>\" | "
        "{\"method\": \"<method>\", \"group_size\": <int>}}} "
        "or the output of `anyquant plan --json`"
    )


def check_patterns(overrides: list[tuple[str, str]], names: list[str]) -> None:
    """A pattern that matches nothing is an error, never a silent no-op."""
    for pattern, _ in overrides:
        if not any(matches(pattern, n) for n in names):
            probe = pattern[3:] if pattern.startswith("re:") else pattern
            close = difflib.get_close_matches(probe, names, n=3, cutoff=0.3)
            hint = f"; closest module names: {', '.join(close)}" if close else ""
            raise AnyquantError(
                f"plan override {pattern!r} matches no module{hint} "
                "(exact names match whole module names; prefix a regular expression with 're:')"
            )
