"""Batch-1 text generation on the fastest path the device has (what `anyquant generate` runs).

    gen = FastDecoder(model, max_cache_len=1024)          # GPU: compile + CUDA graph (once)
    tokens, stats = gen.generate(input_ids, max_new_tokens=128, on_token=print)

On a GPU, `FastDecoder` is the recipe of benchmarks/speed_gpu.py (`e2e_repeat`, "_step"):
a static KV cache whose layers share one position counter (runtime.decode), anyquant's decode
attention (runtime.attention), the whole decode step (forward, next-token choice, token and
position update) compiled with torch.compile and captured in one CUDA graph; each token is one
graph replay. The prompt runs eagerly (prefill). The compile, warm-up and capture happen once
per decoder (`compile_s`); inductor's on-disk cache (torch's default) makes later processes
compile faster. On the CPU, or with compile=False / cuda_graph=False, the same loop runs the
model's forward eagerly: the CPU test of this loop against `model.generate` is what checks the
cache, position and token handling that the GPU path shares.

Greedy decoding (temperature 0) picks runtime.decode.greedy_token (torch.argmax's index);
sampling divides the logits by the temperature and adds Gumbel noise before the same argmax
(the Gumbel-max trick: a draw from softmax(logits / T)), which runs inside the graph.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable

import torch

from anyquant.runtime.attention import set_implementation, use_decode_attention
from anyquant.runtime.decode import greedy_token, share_position_counter


def _next_token(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    if temperature <= 0:
        return greedy_token(logits)
    last = logits[:, -1:, :].float() / temperature
    u = torch.rand_like(last).clamp_(min=1e-20, max=1.0 - 1e-7)
    return greedy_token(last - torch.log(-torch.log(u)))


class FastDecoder:
    """Greedy or sampled batch-1 decoding of a transformers causal LM with a static cache.

    max_cache_len: prompt plus new tokens, at most (the cache and the compiled step are built
    for it once). compile / cuda_graph: default on where the model sits on a CUDA device.
    decode_attention: anyquant's batch-1 attention kernel (CUDA, bf16; elsewhere transformers'
    sdpa runs as before)."""

    def __init__(self, model, max_cache_len: int, *, temperature: float = 0.0, compile: bool | None = None,
                 cuda_graph: bool | None = None, decode_attention: bool | None = None) -> None:
        from transformers import StaticCache

        self.model = model
        self.device = next(model.parameters()).device
        on_gpu = self.device.type == "cuda"
        self.compile = on_gpu if compile is None else compile
        self.cuda_graph = on_gpu if cuda_graph is None else (cuda_graph and on_gpu)
        self.temperature = float(temperature)
        self.max_cache_len = int(max_cache_len)
        self.prev_attn = use_decode_attention(model) if (on_gpu if decode_attention is None else decode_attention) \
            else None
        self.cache = StaticCache(config=model.config, max_cache_len=self.max_cache_len)
        self.shared_counter = share_position_counter(self.cache, self.device) is not None
        self.tok = torch.zeros(1, 1, dtype=torch.long, device=self.device)
        self.pos = torch.zeros(1, dtype=torch.long, device=self.device)
        self._takes_cache_position = "cache_position" in inspect.signature(model.forward).parameters
        self.graph = None
        self.compile_s = 0.0
        self.mode = "eager static cache"
        temperature_ = self.temperature

        def step(tok, pos):
            out = model(input_ids=tok, **self._kw(pos))
            tok.copy_(_next_token(out.logits, temperature_))
            pos.add_(1)

        self._step = torch.compile(step, dynamic=False) if self.compile else step
        if self.compile or self.cuda_graph:
            self._prepare()

    def _kw(self, position: torch.Tensor) -> dict:
        d = {"past_key_values": self.cache, "use_cache": True, "position_ids": position.view(1, -1)}
        if self._takes_cache_position:
            d["cache_position"] = position
        return d

    def set_position(self, p: int) -> None:
        self.pos.fill_(p)
        for layer in getattr(self.cache, "layers", []):
            cl = getattr(layer, "cumulative_length", None)
            if isinstance(cl, torch.Tensor):
                cl.fill_(p)

    def _prepare(self) -> None:
        """Compile and warm up the step (from position 0, a dummy token), capture its graph."""
        t0 = time.perf_counter()
        with torch.inference_mode():
            self.set_position(0)
            self.tok.zero_()
            # one eager token first: the cache's layers allocate their tensors outside the compiled step
            self.model(input_ids=self.tok, **self._kw(self.pos.clone()))
            self.set_position(0)
            if self.device.type == "cuda":
                s = torch.cuda.Stream(self.device)
                s.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(s):
                    for _ in range(2):
                        self._step(self.tok, self.pos)
                torch.cuda.current_stream(self.device).wait_stream(s)
                torch.cuda.synchronize(self.device)
            else:
                for _ in range(2):
                    self._step(self.tok, self.pos)
            self.mode = "compiled step" if self.compile else "eager static cache"
            if self.cuda_graph:
                self.set_position(0)
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g):
                    self._step(self.tok, self.pos)
                self.graph = g
                self.mode += " + CUDA graph"
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
        self.compile_s = time.perf_counter() - t0

    def close(self) -> None:
        """Give the attention implementation back and drop the graph and cache."""
        if self.prev_attn is not None:
            set_implementation(self.model, self.prev_attn)
            self.prev_attn = None
        self.graph = None
        self.cache = None

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, *, eos_token_ids=(),
                 on_token: Callable[[int], None] | None = None) -> tuple[list[int], dict]:
        """New tokens for the prompt `input_ids` [1, P] (stops after an EOS id, which is kept),
        and {time_to_first_token_s, decode_tokens_per_s, new_tokens}. on_token(id) is called
        for each token as it is known on the host."""
        if input_ids.shape[0] != 1:
            raise ValueError(f"FastDecoder.generate: batch 1 only, got input_ids of shape {tuple(input_ids.shape)}; "
                             "give the prompts one at a time")
        p = input_ids.shape[1]
        if p + max_new_tokens > self.max_cache_len:
            raise ValueError(f"FastDecoder.generate: prompt {p} + max_new_tokens {max_new_tokens} exceeds "
                             f"max_cache_len {self.max_cache_len}; build the decoder with a larger max_cache_len")
        eos = set(int(e) for e in eos_token_ids)
        cuda = self.device.type == "cuda"
        out: list[int] = []
        with torch.inference_mode():
            if cuda:
                torch.cuda.synchronize(self.device)
            t0 = time.perf_counter()
            self.set_position(0)
            ids = input_ids.to(self.device)
            logits = self.model(input_ids=ids, **self._kw(torch.arange(p, device=self.device))).logits
            self.tok.copy_(_next_token(logits, self.temperature))
            del logits
            self.set_position(p)
            first = int(self.tok)
            t_first = time.perf_counter()
            out.append(first)
            if on_token:
                on_token(first)
            if first in eos or max_new_tokens <= 1:
                return out, self._stats(t0, t_first, t_first, out)
            n = max_new_tokens - 1
            if cuda:
                # the GPU runs step i while the host hands out token i - 1
                host = torch.empty(n, dtype=torch.long, pin_memory=True)
                events = [torch.cuda.Event() for _ in range(n)]
                for i in range(n + 1):
                    if i < n:
                        self.graph.replay() if self.graph is not None else self._step(self.tok, self.pos)
                        host[i:i + 1].copy_(self.tok.view(1), non_blocking=True)
                        events[i].record()
                    if i > 0:
                        events[i - 1].synchronize()
                        t = int(host[i - 1])
                        out.append(t)
                        if on_token:
                            on_token(t)
                        if t in eos:
                            break
            else:
                for _ in range(n):
                    self._step(self.tok, self.pos)
                    t = int(self.tok)
                    out.append(t)
                    if on_token:
                        on_token(t)
                    if t in eos:
                        break
            t_end = time.perf_counter()
        return out, self._stats(t0, t_first, t_end, out)

    @staticmethod
    def _stats(t0, t_first, t_end, out) -> dict:
        decode = len(out) - 1
        return {"time_to_first_token_s": round(t_first - t0, 4), "new_tokens": len(out),
                "decode_tokens_per_s": round(decode / (t_end - t_first), 2) if decode and t_end > t_first else None}


def plain_generate(model, input_ids: torch.Tensor, max_new_tokens: int, *, temperature: float = 0.0,
                   attention_mask: torch.Tensor | None = None, on_token: Callable[[int], None] | None = None,
                   **generate_kwargs) -> tuple[list[list[int]], dict]:
    """`model.generate` (dynamic cache, any batch) with timing: each row's new tokens and
    {time_to_first_token_s, decode_tokens_per_s, new_tokens}. on_token(id): batch 1 only."""
    times: list[float] = []

    class _Timer:
        def __init__(self):
            self.calls = 0

        def put(self, value):
            self.calls += 1
            if self.calls == 1:     # the prompt
                return
            times.append(time.perf_counter())
            if on_token is not None and value.numel() == 1:
                on_token(int(value.reshape(-1)[0]))

        def end(self):
            pass

    dev = next(model.parameters()).device
    ids = input_ids.to(dev)
    kw = dict(max_new_tokens=max_new_tokens, streamer=_Timer(), **generate_kwargs)
    if attention_mask is not None:
        kw["attention_mask"] = attention_mask.to(dev)
    if temperature > 0:
        kw.update(do_sample=True, temperature=temperature, top_k=None, top_p=None)
    else:
        kw.update(do_sample=False, temperature=None, top_k=None, top_p=None)
    if ids.shape[0] > 1:
        kw.pop("streamer")
    with torch.inference_mode():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        seq = model.generate(ids, **kw)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t_end = time.perf_counter()
    new = seq[:, ids.shape[1]:].tolist()
    n = len(new[0])
    t_first = times[0] if times else t_end
    stats = {"time_to_first_token_s": round(t_first - t0, 4) if times else None, "new_tokens": n,
             "decode_tokens_per_s": round((n - 1) * len(new) / (t_end - t_first), 2) if n > 1 and t_end > t_first
             else None}
    return new, stats
