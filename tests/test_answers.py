"""`anyquant inspect` asked again about an unchanged directory answers from its stored answer
(anyquant/answers.py), without importing torch; any change to the files is a fresh answer."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

from typer.testing import CliRunner

import anyquant.api
from anyquant.cli import app


def _inspect(path) -> str:
    r = CliRunner().invoke(app, ["inspect", str(path), "--json"])
    assert r.exit_code == 0, r.output
    return r.output


def test_second_inspect_is_the_stored_answer_and_a_change_is_not(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setenv("ANYQUANT_CACHE", str(tmp_path / "cache"))
    src = tmp_path / "m"
    shutil.copytree(tiny_llama, src)
    first = _inspect(src)

    def no_work(*a, **k):
        raise AssertionError("inspect ran again on an unchanged directory")
    monkeypatch.setattr(anyquant.api, "inspect", no_work)
    assert _inspect(src) == first

    # a changed config (same size or not: its mtime moves) is asked again
    config = json.loads((src / "config.json").read_text())
    config["rms_norm_eps"] = 1e-5 if config.get("rms_norm_eps") != 1e-5 else 1e-6
    (src / "config.json").write_text(json.dumps(config))
    r = CliRunner().invoke(app, ["inspect", str(src), "--json"])
    assert r.exit_code != 0 and isinstance(r.exception, AssertionError)
    monkeypatch.undo()
    monkeypatch.setenv("ANYQUANT_CACHE", str(tmp_path / "cache"))
    assert json.loads(_inspect(src))["total_params"] == json.loads(first)["total_params"]


def _cold_and_warm_without_torch(tmp_path, argv: list[str]) -> None:
    """The command run twice in fresh processes: the first imports torch, the second (its stored
    answer) does not, and both print the same."""
    env = dict(os.environ, ANYQUANT_CACHE=str(tmp_path / "cache"))
    run = [sys.executable, "-c",
           "import sys; from anyquant.cli import main; sys.argv = ['anyquant'] + sys.argv[1:]\n"
           "try:\n    main()\nexcept SystemExit:\n    pass\n"
           "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')", *argv]
    cold = subprocess.run(run, env=env, capture_output=True, text=True, timeout=600)
    warm = subprocess.run(run, env=env, capture_output=True, text=True, timeout=600)
    assert cold.stdout.strip().endswith("TORCH") and "NO-TORCH" not in cold.stdout, cold.stderr[-1000:]
    assert warm.stdout.strip().endswith("NO-TORCH"), warm.stderr[-1000:]
    assert cold.stdout.replace("\nTORCH", "") == warm.stdout.replace("\nNO-TORCH", "")


def test_stored_answer_does_not_import_torch(tiny_llama, tmp_path):
    _cold_and_warm_without_torch(tmp_path, ["inspect", str(tiny_llama)])


def _plan(path, *args) -> str:
    r = CliRunner().invoke(app, ["plan", str(path), *args])
    assert r.exit_code == 0, r.output
    return r.output


def test_second_plan_is_the_stored_answer_for_the_same_arguments_only(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setenv("ANYQUANT_CACHE", str(tmp_path / "cache"))
    overrides = tmp_path / "keep.json"
    overrides.write_text(json.dumps({"overrides": {"model.layers.0.mlp.down_proj": "keep"}}))
    first = {args: _plan(tiny_llama, *args) for args in [(), ("--json",), ("--all",), ("-m", "int4"),
                                                        ("--plan", str(overrides))]}
    assert first[()] != first[("-m", "int4")] and first[()] != first[("--plan", str(overrides))]

    def no_work(*a, **k):
        raise AssertionError("plan ran again on an unchanged directory with the same arguments")
    monkeypatch.setattr(anyquant.api, "plan", no_work)
    for args, out in first.items():
        assert _plan(tiny_llama, *args) == out
    # a different argument, or a changed overrides file, is a new question
    for args in [("-m", "int8"), ("--plan", str(overrides))]:
        if args[0] == "--plan":
            overrides.write_text(json.dumps({"overrides": {"model.layers.1.mlp.down_proj": "keep"}}))
        r = CliRunner().invoke(app, ["plan", str(tiny_llama), *args])
        assert r.exit_code != 0 and isinstance(r.exception, AssertionError), args


def test_stored_plan_does_not_import_torch(tiny_llama, tmp_path):
    _cold_and_warm_without_torch(tmp_path, ["plan", str(tiny_llama), "-m", "int4"])
