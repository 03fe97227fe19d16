"""llama.cpp's side of the GGUF check: runs in the llama-cpp-python venv (`make llama-venv`; numpy
and llama_cpp only, no torch, no anyquant), so what scores the file is llama.cpp's own reader.

    .venv-llama/bin/python benchmarks/llama_cpp_logits.py MODEL.gguf WINDOWS.npy OUT.npz [--text FILE]

WINDOWS.npy: int64 [n_windows, length] token ids (anyquant's evaluation windows). Each window is
evaluated from an empty context (the KV cache reset), token ids fed as they are. OUT.npz holds
`nll` (float64 [n_windows, length - 1]: -log p(token t+1 | tokens <= t), log-softmax in float64
of llama.cpp's float32 logits), `logits0` (the first window's logits, float32 [length, vocab]) and,
with --text, `text_ids`: llama.cpp's tokenization of that UTF-8 text (no BOS added), to compare
with the Hugging Face tokenizer's."""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("windows")
    ap.add_argument("out")
    ap.add_argument("--text", default=None)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    import llama_cpp

    windows = np.load(a.windows)
    n_ctx = int(windows.shape[1])
    llm = llama_cpp.Llama(model_path=a.model, n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=True,
                          n_threads=a.threads, verbose=False)
    nll = np.zeros((windows.shape[0], n_ctx - 1), dtype=np.float64)
    logits0 = None
    t0 = time.perf_counter()
    for i, row in enumerate(windows):
        llm.reset()
        llm.eval([int(t) for t in row])
        logits = np.asarray(llm.scores[:n_ctx], dtype=np.float32)
        if i == 0:
            logits0 = logits.copy()
        x = logits[:-1].astype(np.float64)
        x -= x.max(axis=1, keepdims=True)
        logp = x - np.log(np.exp(x).sum(axis=1, keepdims=True))
        nll[i] = -logp[np.arange(n_ctx - 1), row[1:]]
        print(f"window {i + 1}/{windows.shape[0]}: {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    extra = {}
    if a.text:
        with open(a.text, "rb") as f:
            extra["text_ids"] = np.asarray(llm.tokenize(f.read(), add_bos=False, special=False), dtype=np.int64)
    np.savez(a.out, nll=nll, logits0=logits0, llama_cpp_version=np.array(llama_cpp.__version__),
             seconds=np.array(time.perf_counter() - t0), **extra)


if __name__ == "__main__":
    main()
