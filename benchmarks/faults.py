"""Fault injection (issue 17): kill -9 and SIGTERM at random points during save and during
calibration, a full disk, a read-only output, two concurrent runs on the same output; counted
into benchmarks/results/faults.json.

Each run is a forked child of this process (anyquant and torch imported once), quantizing a
tiny Llama. After every faulted run the output is classified (complete: its manifest and every
safetensors file read back whole; absent; partial: anything else, which must never happen),
then the next run on the same output (not killed) must leave no `.OUT.tmp-*` / `.OUT.old-*`
behind. Killed gptq runs are resumed from their block checkpoints and compared, tensor by
tensor, to an uninterrupted run.

    python benchmarks/faults.py [--kills 60] [--seed 0]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

torch.set_num_threads(1)  # forked children: no OpenMP pool inherited mid-use

import anyquant  # noqa: E402
from anyquant.errors import AnyquantError  # noqa: E402
from anyquant.formats.io import leftovers  # noqa: E402

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))
from tests.conftest import make_tiny_llama  # noqa: E402


def word_tokenizer(path: Path, vocab_size: int = 512) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from anyquant.calib.text import calibration_text

    words = Counter(calibration_text()[:100_000].split())
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for w, _ in words.most_common(vocab_size - 3):
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>").save_pretrained(path)


def state_hash(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes() if v.numel() else b"")
    return h.hexdigest()


def classify(out: Path) -> str:
    if not out.exists():
        return "absent"
    try:
        manifest = json.loads((out / "anyquant.json").read_text())
        assert manifest.get("method")
        from safetensors import safe_open

        files = sorted(out.glob("*.safetensors"))
        assert files and (out / "config.json").is_file()
        for f in files:
            with safe_open(str(f), framework="pt") as st:
                for k in st.keys():
                    st.get_tensor(k)
        return "complete"
    except Exception:  # noqa: BLE001 — anything unreadable is a partial output
        return "partial"


def child(fn, *args, fsize: int | None = None) -> tuple[int, int]:
    """Fork; the child runs fn(*args) and exits 0, 2 (AnyquantError), 130/143 (interrupted) or 1.
    Returns (pid, read end of a pipe the child writes progress lines to)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        code = 1
        try:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            if fsize is not None:
                signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
                resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
            fn(w, *args)
            code = 0
        except AnyquantError as e:
            os.write(w, f"error {e}\n".encode())
            code = 2
        except KeyboardInterrupt:
            code = 143
        except BaseException as e:  # noqa: BLE001
            os.write(w, f"crash {type(e).__name__}: {e}\n".encode())
        finally:
            os._exit(code)
    os.close(w)
    return pid, r


def wait(pid: int) -> int:
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def say(w: int, msg: str) -> None:
    os.write(w, (msg + "\n").encode())


def job_save(w, src, out, method, force):
    result = anyquant.quantize(str(src), method, progress=False)
    say(w, "saving")
    t0 = time.perf_counter()
    anyquant.save(result, out, force=force)
    say(w, f"saved in {time.perf_counter() - t0:.4f}")


def job_gptq(w, src, out, ck, force):
    say(w, "calibrating")
    result = anyquant.quantize(str(src), "gptq", progress=False, checkpoint_dir=ck, n_samples=4, seq_len=32)
    say(w, "hash " + state_hash(result.model))
    say(w, "resumed %d" % result.report.get("calibration", {}).get("resumed_blocks", 0))
    anyquant.save(result, out, force=force)
    say(w, "done")


def read_lines(fd: int) -> list[str]:
    data = b""
    while chunk := os.read(fd, 65536):
        data += chunk
    os.close(fd)
    return data.decode().splitlines()


def wait_for(fd: int, word: str, timeout: float = 120) -> bool:
    """Read progress lines until one starts with `word` (the pipe stays open for the rest)."""
    buf = b""
    t0 = time.time()
    while time.time() - t0 < timeout:
        c = os.read(fd, 1)
        if not c:
            return False
        buf += c
        if c == b"\n":
            if buf.decode().startswith(word):
                return True
            buf = b""
    return False


def timed(job, *args) -> tuple[float, list[str], int]:
    t0 = time.time()
    pid, r = child(job, *args)
    lines = read_lines(r)
    return time.time() - t0, lines, wait(pid)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kills", type=int, default=60, help="kills in all (half during save, half during calibration)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=ROOT / "results" / "faults.json")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="anyquant-faults-"))
    t_start = time.time()
    src = make_tiny_llama(work / "src", hidden=64, inter=128, layers=4, vocab=512)
    word_tokenizer(src)
    src_hash = hashlib.sha256(b"".join(f.read_bytes() for f in sorted(src.iterdir()))).hexdigest()

    counts = Counter()
    by_case: dict[str, Counter] = {}
    problems: list[str] = []

    def record(case: str, out: Path, state: str | None = None) -> None:
        state = state or classify(out)
        c = by_case.setdefault(case, Counter())
        for k in ("runs", f"outputs {state}"):
            counts[k] += 1
            c[k] += 1
        if state == "partial":
            problems.append(f"{case}: partial output at {out}")

    def next_run(case: str, out: Path, job=job_save, *extra) -> None:
        """The next, unkilled run on the same output; then nothing may be left next to it."""
        _, lines, code = timed(job, *extra) if extra else timed(job, src, out, "int8", True)
        if code != 0:
            problems.append(f"{case}: next run failed ({code}): {lines[-1:]}")
        left = leftovers(out)
        counts["next runs"] += 1
        counts["leftovers after the next run"] += len(left)
        by_case.setdefault(case, Counter())["leftovers after the next run"] += len(left)
        if left:
            problems.append(f"{case}: left after the next run: {[p.name for p in left]}")

    # Warm-up in this process: the children are forked with every lazy import already done.
    anyquant.quantize(str(src), "int8", progress=False)
    anyquant.quantize(str(src), "nf4", progress=False)
    anyquant.quantize(str(src), "gptq", progress=False, checkpoint_dir=None, n_samples=4, seq_len=32)
    # Reference timings and the uninterrupted gptq result.
    t_save, lines, code = timed(job_save, src, work / "ref-int8", "int8", False)
    assert code == 0, lines
    save_seconds = float(next(x.split()[-1] for x in lines if x.startswith("saved in")))
    t_gptq, lines, code = timed(job_gptq, src, work / "ref-gptq", work / "ck-ref", False)
    assert code == 0, lines
    ref_hash = next(x.split()[1] for x in lines if x.startswith("hash "))
    print(f"reference: int8 run {t_save:.1f} s (its save {save_seconds:.3f} s), gptq run {t_gptq:.1f} s")

    n_save = args.kills // 2
    n_calib = args.kills - n_save
    # 1. kills during save: after the child says "saving", wait a random part of a save.
    save_only = save_seconds * 1.1  # the kill lands at a random point of the save (or just after it)
    for i in range(n_save):
        sig = signal.SIGKILL if i % 2 == 0 else signal.SIGTERM
        out = work / f"save-{i}" / "q"
        out.parent.mkdir()
        replace = i % 4 >= 2  # half of them replace an earlier output (--force)
        if replace:
            shutil.copytree(work / "ref-int8", out)
        pid, r = child(job_save, src, out, "int8", replace)
        if not wait_for(r, "saving"):
            problems.append(f"save-{i}: never reached the save")
        time.sleep(rng.uniform(0, save_only))
        os.kill(pid, sig)
        read_lines(r)
        wait(pid)
        counts["kills during save"] += 1
        record("kill during save" + (" (--force replacement)" if replace else ""), out)
        next_run("kill during save" + (" (--force replacement)" if replace else ""), out)

    # 2. kills during calibration, then a resume from the block checkpoints.
    identical = 0
    for i in range(n_calib):
        sig = signal.SIGKILL if i % 2 == 0 else signal.SIGTERM
        out = work / f"calib-{i}" / "q"
        out.parent.mkdir()
        ck = work / f"ck-{i}"
        pid, r = child(job_gptq, src, out, ck, False)
        wait_for(r, "calibrating")
        time.sleep(rng.uniform(0.2, t_gptq * 0.8))
        os.kill(pid, sig)
        read_lines(r)
        wait(pid)
        counts["kills during calibration"] += 1
        record("kill during calibration", out)
        _, lines, code = timed(job_gptq, src, out, ck, True)
        h = next((x.split()[1] for x in lines if x.startswith("hash ")), None)
        resumed = next((int(x.split()[1]) for x in lines if x.startswith("resumed ")), 0)
        counts["resumes"] += 1
        counts["resumes that reused blocks"] += int(resumed > 0)
        if code == 0 and h == ref_hash:
            identical += 1
        else:
            problems.append(f"calib-{i}: resume {'differs' if code == 0 else 'failed'} ({lines[-1:]})")
        left = leftovers(out)
        counts["next runs"] += 1
        counts["leftovers after the next run"] += len(left)
        shutil.rmtree(ck, ignore_errors=True)
    counts["resumes bit-identical"] = identical

    # 3. full disk: a file-size limit in the child (writes past it fail with EFBIG), and a small tmpfs if root.
    for i, limit in enumerate([64 << 10, 256 << 10, 1 << 20]):
        out = work / f"fsize-{i}" / "q"
        out.parent.mkdir()
        pid, r = child(job_save, src, out, "int8", False, fsize=limit)
        lines = read_lines(r)
        code = wait(pid)
        counts["full disk runs"] += 1
        # refused with an AnyquantError (the limit is below the output's size), or, where it fits, complete
        ok = (code == 2 and any(x.startswith("error ") for x in lines)) or (code == 0 and classify(out) == "complete")
        counts["full disk refused in one line" if code == 2 else "full disk runs that fitted"] += int(ok)
        if not ok:
            problems.append(f"fsize-{i}: exit {code}: {lines[-1:]}")
        record("full disk (RLIMIT_FSIZE)", out)
        next_run("full disk (RLIMIT_FSIZE)", out)
    mounted = []
    if os.geteuid() == 0:
        for name, opts in (("tmpfs-full", "size=64k"), ("tmpfs-ro", "size=1m,ro")):
            mnt = work / name
            mnt.mkdir()
            if subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(mnt)], capture_output=True).returncode:
                continue
            mounted.append(mnt)
            t0 = time.time()
            p = subprocess.run([sys.executable, "-m", "anyquant.cli", "quantize", str(src), "-m", "int8", "--out",
                                str(mnt / "q")], capture_output=True, text=True)
            err = [x for x in p.stderr.splitlines() if x.strip()]
            case = "full disk (tmpfs)" if name == "tmpfs-full" else "read-only output (tmpfs ro)"
            ok = p.returncode == 2 and len(err) == 1
            counts[f"{case}: refused in one line"] += int(ok)
            if not ok:
                problems.append(f"{case}: exit {p.returncode}: {err}")
            record(case, mnt / "q")
            counts[f"{case}: seconds to refuse"] = round(time.time() - t0, 1)
            subprocess.run(["umount", str(mnt)], capture_output=True)

    # 4. two concurrent runs on the same output (with --force, and without).
    for i in range(6):
        force = i % 2 == 0
        out = work / f"conc-{i}" / "q"
        out.parent.mkdir()
        if force and i % 4 == 0:
            shutil.copytree(work / "ref-int8", out)
        kids = [child(job_save, src, out, m, force) for m in ("int8", "nf4")]
        codes = []
        for pid, r in kids:
            read_lines(r)
            codes.append(wait(pid))
        counts["concurrent pairs"] += 1
        both = sorted(codes)
        ok = both == [0, 0] if force else both == [0, 2]
        counts["concurrent pairs as expected"] += int(ok)
        if not ok:
            problems.append(f"conc-{i}: exit codes {codes} (force={force})")
        record("two concurrent runs" + (" (--force)" if force else ""), out)
        next_run("two concurrent runs", out)

    src_hash_after = hashlib.sha256(b"".join(f.read_bytes() for f in sorted(src.iterdir()))).hexdigest()
    data = {
        "kills": counts["kills during save"] + counts["kills during calibration"],
        "runs": counts["runs"],
        "outputs complete": counts["outputs complete"],
        "outputs absent": counts["outputs absent"],
        "partial outputs": counts["outputs partial"],
        "leftovers after the next run": counts["leftovers after the next run"],
        "resumes": counts["resumes"],
        "resumes bit-identical": counts["resumes bit-identical"],
        "source byte-identical": src_hash == src_hash_after,
        "details": dict(sorted(counts.items())),
        "by case": {k: dict(sorted(v.items())) for k, v in by_case.items()},
        "problems": problems,
        "seconds": round(time.time() - t_start, 1),
        "seed": args.seed,
        "save seconds (reference)": round(save_seconds, 4),
        "model": "tiny Llama (hidden 64, 4 layers, vocab 512), int8/nf4 saves, gptq n_samples=4 seq_len=32",
        "cpu_threads": 1,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(data, indent=2) + "\n")
    print(f"{'case':44s} {'runs':>5s} {'complete':>9s} {'absent':>7s} {'partial':>8s} {'leftovers':>10s}")
    for case, c in by_case.items():
        print(f"{case:44s} {c['runs']:5d} {c['outputs complete']:9d} {c['outputs absent']:7d} "
              f"{c['outputs partial']:8d} {c['leftovers after the next run']:10d}")
    print(f"{'total':44s} {data['runs']:5d} {data['outputs complete']:9d} {data['outputs absent']:7d} "
          f"{data['partial outputs']:8d} {data['leftovers after the next run']:10d}")
    print(f"kills: {data['kills']}; resumes bit-identical: {data['resumes bit-identical']}/{data['resumes']}; "
          f"source unchanged: {data['source byte-identical']}; problems: {len(problems)}; {data['seconds']} s")
    for p in problems:
        print("  problem:", p)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
