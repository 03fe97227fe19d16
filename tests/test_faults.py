"""Issue 17, part B: every bad input on the command line ends in one line on stderr and exit 2
(an exception that escapes fails the test), --force replaces only anyquant outputs, preflight
refuses before quantizing, killed runs leave nothing behind that the next run does not clean,
outputs follow the umask. Each fault is built here on tiny models; the disk state afterwards is
checked (source byte-identical, output complete or absent, no temporary folders)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import anyquant
from anyquant.cli import app
from anyquant.errors import AnyquantError
from tests.conftest import make_tiny_llama

RUNNER = CliRunner()


def cli(*args, cwd: Path | None = None):
    old = os.getcwd()
    if cwd is not None:
        os.chdir(cwd)
    try:
        r = RUNNER.invoke(app, [str(a) for a in args])
    finally:
        os.chdir(old)
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise AssertionError(f"exception escaped the CLI: {type(r.exception).__name__}: {r.exception}") from r.exception
    return r


def bad(r, *needles) -> str:
    assert r.exit_code == 2, (r.exit_code, r.output)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("anyquant: error: ")
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def tree_hash(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(path.rglob("*")):
        if f.is_file():
            h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()


def no_temp(parent: Path) -> bool:
    return not [p for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name or ".probe-" in p.name]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("faults") / "src", hidden=64, inter=128, layers=1)


@pytest.fixture(scope="module")
def output(base, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("faults-out") / "q"
    r = cli("quantize", base, "-m", "int8", "--out", out)
    assert r.exit_code == 0, r.output
    return out


def copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_config(d: Path, **kv) -> None:
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(kv)
    (d / "config.json").write_text(json.dumps(cfg))


# ---- 3. every bad input: one line, exit 2, nothing written --------------------------------------------------


def test_config_field_not_an_integer(base, tmp_path):
    src = copy(base, tmp_path / "src")
    edit_config(src, hidden_size="abc")
    bad(cli("quantize", src, "-m", "int8", "--out", tmp_path / "o"), "config.json", "hidden_size", "'abc'", "integer")
    bad(cli("inspect", src), "hidden_size")
    assert not (tmp_path / "o").exists()


def test_config_is_a_list(base, tmp_path):
    src = copy(base, tmp_path / "src")
    (src / "config.json").write_text("[1, 2]")
    bad(cli("quantize", src, "-m", "int8", "--out", tmp_path / "o"), "config.json", "list")
    bad(cli("plan", src, "-m", "int8"), "config.json", "list")


def test_shape_mismatch(base, tmp_path):
    src = copy(base, tmp_path / "src")
    sd = load_file(src / "model.safetensors")
    sd["model.layers.0.mlp.up_proj.weight"] = sd["model.layers.0.mlp.up_proj.weight"][:, :32].contiguous()
    save_file(sd, src / "model.safetensors", metadata={"format": "pt"})
    bad(cli("quantize", src, "-m", "int8", "--out", tmp_path / "o"),
        "model.layers.0.mlp.up_proj.weight", "[128, 32]", "[128, 64]")
    assert not (tmp_path / "o").exists()
    # the Python API gets the same one-line refusal, not transformers' report
    with pytest.raises(AnyquantError, match=r"up_proj.weight has shape \[128, 32\].*config.json makes it \[128, 64\]"):
        anyquant.quantize(str(src), "int8", progress=False)


def test_missing_shard(base, tmp_path):
    from transformers import AutoModelForCausalLM

    src = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(base).save_pretrained(src, max_shard_size="100KB")
    shard = sorted(src.glob("model-*.safetensors"))[1]
    shard.unlink()
    bad(cli("quantize", src, "-m", "int8", "--out", tmp_path / "o"), shard.name, "missing")
    assert not (tmp_path / "o").exists()


def test_fifo_named_safetensors_does_not_hang(base, tmp_path):
    src = copy(base, tmp_path / "src")
    os.mkfifo(src / "extra.safetensors")
    t0 = time.time()
    bad(cli("quantize", src, "-m", "int8", "--out", tmp_path / "o"), "extra.safetensors", "FIFO")
    bad(cli("inspect", src), "FIFO")
    assert time.time() - t0 < 60


def test_unknown_architecture_one_line(base, tmp_path):
    src = copy(base, tmp_path / "src")
    edit_config(src, model_type="zzz", architectures=["ZzzForCausalLM"])
    bad(cli("quantize", src, "-m", "int8", "--out", tmp_path / "o"), "zzz", "transformers")


@pytest.mark.parametrize("flag", ["--keep", "--only"])
def test_invalid_regex_on_the_command_line(base, tmp_path, flag):
    bad(cli("quantize", base, "-m", "int8", "--out", tmp_path / "o", flag, "re:("), flag, "re:(", "regular expression")
    bad(cli("plan", base, "-m", "int8", flag, "re:["), flag)
    assert not (tmp_path / "o").exists()


def test_invalid_regex_in_plan_file(base, tmp_path):
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"overrides": {"re:(": "keep"}}))
    bad(cli("quantize", base, "-m", "int8", "--out", tmp_path / "o", "--plan", plan), str(plan), "re:(")


@pytest.mark.parametrize("kind", ["binary", "directory", "invalid", "fifo", "list-of-junk"])
def test_bad_plan_files(base, tmp_path, kind):
    plan = tmp_path / "plan.json"
    if kind == "binary":
        plan.write_bytes(bytes(range(256)))
    elif kind == "directory":
        plan.mkdir()
    elif kind == "invalid":
        plan.write_text("{overrides: nope")
    elif kind == "fifo":
        os.mkfifo(plan)
    else:
        plan.write_text(json.dumps({"decisions": [1, 2]}))
    bad(cli("quantize", base, "-m", "int8", "--out", tmp_path / "o", "--plan", plan), "--plan", str(plan))
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("content", ["{nope", "", "[]", "{}"])
def test_invalid_or_empty_manifest(output, tmp_path, content):
    o = copy(output, tmp_path / "o")
    (o / "anyquant.json").write_text(content)
    bad(cli("eval", o, "--max-tokens", "64"), "anyquant.json")


def test_truncated_output(output, tmp_path):
    o = copy(output, tmp_path / "o")
    f = o / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    bad(cli("eval", o, "--max-tokens", "64"), "model.safetensors", "truncated")


def test_remote_code_output_needs_the_flag(output, tmp_path):
    o = copy(output, tmp_path / "o")
    edit_config(o, auto_map={"AutoModelForCausalLM": "modeling_x.XForCausalLM"})
    (o / "modeling_x.py").write_text("raise SystemExit('remote code ran')\n")
    bad(cli("eval", o, "--max-tokens", "64"), "--trust-remote-code")


@pytest.mark.parametrize("kind", ["directory", "binary", "fifo", "empty"])
def test_eval_text_must_be_text(output, tmp_path, kind):
    t = tmp_path / "t.txt"
    if kind == "directory":
        t.mkdir()
    elif kind == "binary":
        t.write_bytes(b"\x00\x01\xff" * 100)
    elif kind == "fifo":
        os.mkfifo(t)
    else:
        t.write_text("  \n")
    bad(cli("eval", output, "--text", t, "--max-tokens", "64"), "--text", str(t))


@pytest.mark.parametrize("kind", ["directory", "binary", "latin1", "fifo", "empty"])
def test_calib_must_be_text(base, tmp_path, kind):
    t = tmp_path / "c.txt"
    if kind == "directory":
        t.mkdir()
    elif kind == "binary":
        t.write_bytes(b"\x00\x01\xff" * 100)
    elif kind == "latin1":
        t.write_bytes("café au lait ".encode("latin-1") * 50)
    elif kind == "fifo":
        os.mkfifo(t)
    else:
        t.write_text("")
    line = bad(cli("quantize", base, "-m", "gptq", "--out", tmp_path / "o", "--calib", t), "--calib", str(t))
    if kind == "empty":
        assert "calibration text" in line and "evaluation" not in line
    assert not (tmp_path / "o").exists()


def test_seq_len_above_the_models_positions(base, tmp_path):
    bad(cli("quantize", base, "-m", "gptq", "--out", tmp_path / "o", "--seq-len", "100000"), "100000", "256")


def test_gptq_without_tokenizer_says_what_to_copy(base, tmp_path):
    line = bad(cli("quantize", base, "-m", "gptq", "--out", tmp_path / "o", "--n-samples", "1", "--seq-len", "8"),
               "no loadable tokenizer", "copy the source model's tokenizer files", str(base))
    assert "calib=" not in line and "LongTensor" not in line
    assert not (tmp_path / "o").exists()


def test_exact_override_quantizing_a_norm_or_embedding_is_refused(base, tmp_path):
    for name in ("model.norm", "model.embed_tokens"):
        plan = tmp_path / "plan.json"
        plan.write_text(json.dumps({"overrides": {name: "int8"}}))
        bad(cli("quantize", base, "-m", "int8", "--out", tmp_path / "o", "--plan", plan), name, "Linear layers only")
    assert not (tmp_path / "o").exists()


# ---- 1. --force -----------------------------------------------------------------------------------------------


def test_force_never_replaces_a_users_directory(base, tmp_path):
    d = tmp_path / "thesis"
    d.mkdir()
    (d / "thesis.txt").write_text("four years")
    line = bad(cli("quantize", base, "-m", "int8", "--out", d, "--force"), "not an anyquant output")
    assert "pass --force" not in line
    assert (d / "thesis.txt").read_text() == "four years"
    assert no_temp(tmp_path)


def test_force_replaces_an_empty_directory_and_an_output(base, tmp_path):
    d = tmp_path / "empty"
    d.mkdir()
    bad(cli("quantize", base, "-m", "int8", "--out", d), "pass --force")
    assert cli("quantize", base, "-m", "int8", "--out", d, "--force").exit_code == 0
    assert (d / "anyquant.json").is_file()
    first = json.loads((d / "anyquant.json").read_text())
    assert cli("quantize", base, "-m", "nf4", "--out", d, "--force").exit_code == 0
    assert json.loads((d / "anyquant.json").read_text())["method"] == "nf4" != first["method"]
    assert no_temp(tmp_path)


def test_out_dot_and_parents_are_refused(base, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    (work / "anyquant.json").write_text("{}")  # even one that looks like an output
    for out in (".", work, tmp_path):
        bad(cli("quantize", base, "-m", "int8", "--out", out, "--force", cwd=work), "working directory")
    bad(cli("quantize", base, "-m", "int8", "--out", base.parent, "--force"), "contains the source")
    assert no_temp(tmp_path) and no_temp(work) and sorted(p.name for p in work.iterdir()) == ["anyquant.json"]


def test_a_file_as_out_gets_a_correct_message(base, tmp_path):
    f = tmp_path / "model.bin"
    f.write_text("x")
    for extra in ([], ["--force"]):
        line = bad(cli("quantize", base, "-m", "int8", "--out", f, *extra), "is a file")
        assert "pass --force" not in line
    assert f.read_text() == "x"


def test_killed_between_the_renames_the_old_output_is_restored(base, output, tmp_path):
    out = copy(output, tmp_path / "q")
    before = tree_hash(out)
    aside = tmp_path / ".q.old-abc123"
    os.rename(out, aside)  # what a kill between "rename old aside" and "rename new in" leaves
    tmp = tmp_path / ".q.tmp-def456"
    tmp.mkdir()
    (tmp / "model.safetensors").write_bytes(b"partial")
    r = cli("quantize", base, "-m", "int8", "--out", out)
    bad(r, "already exists", "pass --force")  # restored first, so the output is there again
    assert "restored" in r.stdout and "removed" in r.stdout
    assert tree_hash(out) == before and no_temp(tmp_path)


# ---- 2. preflight: output location ----------------------------------------------------------------------------


def _mount_tmpfs(path: Path, size: str, ro: bool = False) -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    path.mkdir(parents=True, exist_ok=True)
    opts = f"size={size}" + (",ro" if ro else "")
    return subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True).returncode == 0


def _umount(path: Path) -> None:
    subprocess.run(["umount", str(path)], capture_output=True)


def test_read_only_output_fails_before_quantizing(base, tmp_path, monkeypatch):
    ro = tmp_path / "ro"
    mounted = _mount_tmpfs(ro, "4m", ro=True)
    if not mounted:
        if os.geteuid() == 0:
            pytest.skip("root without mount: a read-only directory cannot be made")
        ro.mkdir()
        os.chmod(ro, 0o555)
    import anyquant.api

    def never(*a, **k):
        raise AssertionError("quantized despite an unwritable output location")

    monkeypatch.setattr(anyquant.api, "quantize", never)
    try:
        bad(cli("quantize", base, "-m", "int8", "--out", ro / "o"), "cannot write", str(ro))
    finally:
        if mounted:
            _umount(ro)
        else:
            os.chmod(ro, 0o755)


def test_full_disk_fails_before_quantizing(base, tmp_path, monkeypatch):
    small = tmp_path / "small"
    if not _mount_tmpfs(small, "64k"):
        pytest.skip("needs root to mount a small tmpfs")
    import anyquant.api

    monkeypatch.setattr(anyquant.api, "quantize", lambda *a, **k: (_ for _ in ()).throw(AssertionError("ran")))
    try:
        bad(cli("quantize", base, "-m", "int8", "--out", small / "o"), "MiB free", "needs about")
        assert list(small.iterdir()) == []
    finally:
        _umount(small)


def test_api_save_refuses_a_full_disk_before_writing(base, tmp_path):
    import anyquant
    from anyquant.errors import AnyquantError

    small = tmp_path / "small"
    if not _mount_tmpfs(small, "64k"):
        pytest.skip("needs root to mount a small tmpfs")
    try:
        result = anyquant.quantize(str(base), "int8", progress=False)
        with pytest.raises(AnyquantError, match="MiB free"):
            anyquant.save(result, small / "o")
        assert list(small.iterdir()) == []
    finally:
        _umount(small)


# ---- 4. leftovers, signals, umask -----------------------------------------------------------------------------


def test_outputs_follow_the_umask(base, tmp_path):
    old = os.umask(0o022)
    try:
        out = tmp_path / "q"
        assert cli("quantize", base, "-m", "int8", "--out", out).exit_code == 0
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o755
    assert all(f.stat().st_mode & 0o777 == 0o644 for f in out.iterdir() if f.is_file())


SAVE_SLOWLY = r"""
import os, sys, time
import anyquant
import anyquant.formats.io as io
result = anyquant.quantize(sys.argv[1], "int8", progress=False)
real = io.write_manifest
def slow(*a, **k):
    real(*a, **k)
    print("saving", flush=True)
    time.sleep(60)
io.write_manifest = slow
try:
    anyquant.save(result, sys.argv[2])
except KeyboardInterrupt as e:
    print("cleaned", type(e).__name__, flush=True)
    sys.exit(143)
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_signal_during_save(base, tmp_path, sig):
    out = tmp_path / "q"
    src_before = tree_hash(base)
    p = subprocess.Popen([sys.executable, "-c", SAVE_SLOWLY, str(base), str(out)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "saving"
    p.send_signal(sig)
    p.wait(timeout=60)
    assert not out.exists()
    if sig == signal.SIGTERM:
        assert p.returncode == 143 and no_temp(tmp_path)  # the handler removed its temporary folder
    else:
        assert not no_temp(tmp_path)  # kill -9 cannot clean: the next run does
        r = cli("quantize", base, "-m", "int8", "--out", out)
        assert r.exit_code == 0 and "removed" in r.stdout and ".q.tmp-" in r.stdout
        assert no_temp(tmp_path) and (out / "anyquant.json").is_file()
    assert tree_hash(base) == src_before
