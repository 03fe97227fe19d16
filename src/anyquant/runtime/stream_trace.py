"""Per-CTA phase timestamps of cuda_stream launches (diagnostics for sm_90 GPUs).

`build(device)` compiles the CUDA extension a second time with ANYQUANT_STREAM_TRACE, so that
thread 0 of every CTA of a cuda_stream launch records the GPU's global timer (ns) at: entry,
release by the kernel before (griddepcontrol.wait), x staged, every stage consumed, rows
written, and the multiprocessor it ran on. Launch through it with
`kernels.use_kernels(cuda_extension=build(device))`; it computes exactly what the plain build
does. `reset` numbers launches from 0 again (call it before capturing a sequence), `records`
reads them back, `summarize` gives per-shape medians. benchmarks/stream_trace.py is the command
line around this.
"""

from __future__ import annotations

import statistics

import torch

from anyquant.runtime import cuda_int4

# As in cuda_int4_stream.cu: launches recorded, CTAs per launch, int64 fields per CTA.
SLOTS, CTAS, FIELDS = 256, 512, 8

_TRACE_CPP = """
void anyquant_stream_trace_reset();
void anyquant_stream_trace_read(void* host, size_t bytes);
torch::Tensor trace_read(int64_t n) {
  auto t = torch::empty({n}, torch::dtype(torch::kInt64));
  anyquant_stream_trace_read(t.data_ptr(), (size_t)n * 8);
  return t;
}
void trace_reset() { anyquant_stream_trace_reset(); }
"""


def build(device: torch.device | None = None):
    """The traced extension for `device`'s architecture (default: the current CUDA device)."""
    major, minor = torch.cuda.get_device_capability(device)
    return cuda_int4.build_extension(f"{major}{minor}", _TRACE_CPP, ("trace_read", "trace_reset"),
                                     ("ANYQUANT_STREAM_TRACE",))


def reset(ext) -> None:
    """Number the next launches from slot 0 (the buffer keeps the last records per slot)."""
    ext.trace_reset()


def records(ext, launches: list[tuple[str, int, int, tuple[int, int, int, int]]], sms: int) -> list[dict]:
    """One record per launch since `reset`, in order; launches = (name, N, K, cfg) of each. A
    record holds name, n, k, grid, sm_max (the most CTAs of the launch on one multiprocessor)
    and per-CTA float64 timestamps entry, release, staged, consumed, written."""
    if len(launches) > SLOTS:
        raise ValueError(f"anyquant.runtime.stream_trace: {len(launches)} launches, the trace holds {SLOTS}; "
                         f"trace a shorter sequence")
    raw = ext.trace_read(SLOTS * CTAS * FIELDS).view(SLOTS, CTAS, FIELDS)[:len(launches)]
    out = []
    for i, (name, n, k, cfg) in enumerate(launches):
        grid = min(sms * max(cfg[2], 1), -(-n // 16))
        r = raw[i, :grid].double()
        sm_max = int(torch.bincount(raw[i, :grid, 7]).max().item())
        out.append({"shape": name, "n": n, "k": k, "grid": grid, "sm_max": sm_max,
                    "entry": r[:, 0], "release": r[:, 1], "staged": r[:, 2], "consumed": r[:, 3], "written": r[:, 4]})
    return out


def summarize(recs: list[dict], names: list[str]) -> dict[str, dict]:
    """Per shape name, medians in us over its launches (each but the first against the launch
    before it): start (first CTA's entry after the previous kernel's end; negative: it overlapped),
    release, stage_x, body, tail (slowest CTA of each phase), kernel (end to end), and sm_max."""
    per = {name: {"start": [], "release": [], "stage_x": [], "body": [], "tail": [], "kernel": [], "sm_max": []}
           for name in names}
    for prev, cur in zip(recs, recs[1:]):
        prev_end = prev["written"].max().item()
        s = per[cur["shape"]]
        s["start"].append((cur["entry"].min().item() - prev_end) / 1e3)
        s["release"].append((cur["release"].min().item() - prev_end) / 1e3)
        s["stage_x"].append((cur["staged"] - cur["release"]).max().item() / 1e3)
        s["body"].append((cur["consumed"] - cur["staged"]).max().item() / 1e3)
        s["tail"].append((cur["written"] - cur["consumed"]).max().item() / 1e3)
        s["kernel"].append((cur["written"].max().item() - prev_end) / 1e3)
        s["sm_max"].append(cur["sm_max"])
    out = {name: {key: round(statistics.median(v), 3) for key, v in d.items() if v} for name, d in per.items()}
    for name, d in per.items():  # the most CTAs of one launch on one multiprocessor, any launch
        out[name]["sm_max"] = max(d["sm_max"]) if d["sm_max"] else 0
    return out
