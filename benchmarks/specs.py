"""Method specs on benchmark command lines: `name` or `name:{json options}`, separated by ';' or
by commas outside the JSON (so `gptq:{"awq_scales": true, "tune_steps": 100}` stays one spec)."""

from __future__ import annotations

import json


def split_specs(text: str) -> list[str]:
    specs, depth, cur = [], 0, ""
    for ch in text:
        depth += ch == "{"
        depth -= ch == "}"
        if ch in ",;" and depth == 0:
            specs.append(cur)
            cur = ""
        else:
            cur += ch
    specs.append(cur)
    return [s.strip() for s in specs if s.strip()]


def parse_spec(spec: str) -> tuple[str, dict]:
    method, _, extra = spec.partition(":")
    return method, (json.loads(extra) if extra else {})


if __name__ == "__main__":  # a check that runs without pytest: python benchmarks/specs.py
    assert split_specs('nf4,gptq:{"a": 1, "b": true};awq') == ["nf4", 'gptq:{"a": 1, "b": true}', "awq"]
    assert parse_spec('gptq:{"a": 1, "b": true}') == ("gptq", {"a": 1, "b": True})
    print("ok")
