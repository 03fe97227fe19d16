"""A plan as lines a person reads at 80 columns: repeated blocks grouped ("model.layers.0–29 ×
7 Linears: quantize int4 g64"), the modules that differ from their group listed one per line,
modules that are not Linear layers counted, and repeated notes collapsed with a count."""

from __future__ import annotations

import re
from collections import Counter, defaultdict

from anyquant.planning.plan import FUSED_EXPERTS, QUANTIZE, Decision, Plan

_INDEXED = re.compile(r"^(?P<list>.*?)\.(?P<i>\d+)\.(?P<rest>.+)$")


def _what(d: Decision) -> str:
    if d.action == QUANTIZE:
        g = d.options.get("group_size")
        return f"{d.method}" + (f" g{g}" if g else "")
    return f"keep ({d.reason_code})"


def _ranges(indices: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> "0–2, 5, 7–8"."""
    out, start, prev = [], None, None
    for i in sorted(set(indices)):
        if start is None:
            start = prev = i
        elif i == prev + 1:
            prev = i
        else:
            out.append(f"{start}–{prev}" if prev != start else f"{start}")
            start = prev = i
    if start is not None:
        out.append(f"{start}–{prev}" if prev != start else f"{start}")
    return ", ".join(out)


def collapse_notes(notes: list[str]) -> list[str]:
    """Identical notes once, with a count; notes that differ only in a module name (the
    "<module>: <reason>" form) once per reason, with the count and the first module."""
    by_reason: dict[str, list[str]] = defaultdict(list)
    order: list[str] = []
    for n in notes:
        head, sep, reason = n.partition(": ")
        key = reason if sep and " " not in head else n
        if key not in by_reason:
            order.append(key)
        by_reason[key].append(head if sep and " " not in head else n)
    lines = []
    for key in order:
        heads = by_reason[key]
        if len(heads) == 1:
            lines.append(heads[0] if heads[0] == key else f"{heads[0]}: {key}")
        elif len(set(heads)) == 1:
            lines.append(f"{key} (×{len(heads)})" if heads[0] == key else f"{heads[0]}: {key} (×{len(heads)})")
        else:
            lines.append(f"{heads[0]} and {len(heads) - 1} more: {key}")
    return lines


def summarize(plan: Plan) -> list[str]:
    experts = [d for d in plan.decisions if d.kind == FUSED_EXPERTS]
    linear = [d for d in plan.decisions if d.kind != FUSED_EXPERTS and (d.shape is not None or d.action == QUANTIZE)]
    others = [d for d in plan.decisions if d not in linear and d not in experts]
    groups: dict[tuple[str, str], dict[int, list[Decision]]] = defaultdict(lambda: defaultdict(list))
    single: list[Decision] = []
    for d in linear:
        m = _INDEXED.match(d.name)
        if m:
            groups[(m["list"], m["rest"])][int(m["i"])].append(d)
        else:
            single.append(d)
    lines = [f"plan: {plan.method}, compute dtype {plan.compute_dtype}"]
    exceptions: list[Decision] = list(single)
    # one line per block list: the decision most of its Linears share
    by_list: dict[str, dict[str, Counter]] = defaultdict(lambda: defaultdict(Counter))
    for (lst, rest), per_index in groups.items():
        for decisions in per_index.values():
            for d in decisions:
                by_list[lst][rest][_what(d)] += 1
    for lst in sorted(by_list):
        indices = sorted({i for (l2, _), per in groups.items() if l2 == lst for i in per})
        rests = by_list[lst]
        common = Counter()
        for c in rests.values():
            common[c.most_common(1)[0][0]] += 1
        what = common.most_common(1)[0][0]
        n = sum(1 for r, c in rests.items() if c.most_common(1)[0][0] == what)
        lines.append(f"{lst}.{_ranges(indices)} × {n} Linear{'s' if n != 1 else ''}: {what}")
        for (l2, rest), per_index in groups.items():
            if l2 != lst:
                continue
            for decisions in per_index.values():
                exceptions += [d for d in decisions if _what(d) != what]
    if exceptions:
        lines.append("exceptions:")
        lines += [f"  {d.name}: {_what(d)}: {d.reason}" for d in sorted(exceptions, key=lambda d: d.name)]
    if others:
        kinds = Counter(d.kind for d in others)
        lines.append("not quantized (not Linear layers): " + ", ".join(f"{k} {n}" for k, n in sorted(kinds.items())))
    if experts:
        whats = Counter(_what(d) for d in experts)
        lines.append("fused MoE expert tensors: " + ", ".join(f"{n} {w}" for w, n in whats.most_common()))
    lines.append(f"{len(plan.to_quantize())} quantized, {len(plan.kept())} kept"
                 + (f" (fused expert tensors: {len(plan.experts_to_quantize())} quantized)" if experts else ""))
    lines += [f"note: {n}" for n in collapse_notes(plan.notes)]
    return lines
