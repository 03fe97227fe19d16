"""`anyquant generate`: text from a saved anyquant output on the fastest path the device has."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import typer

from anyquant.cli.common import app, fails_cleanly, setup_logging
from anyquant.errors import AnyquantError


@app.command("generate")
@fails_cleanly
def generate_cmd(model_dir: str = typer.Argument(..., help="an anyquant output directory"),
                 prompt: Optional[str] = typer.Argument(None, help="the prompt (or --prompts FILE)"),
                 chat: bool = typer.Option(False, "--chat", help="apply the tokenizer's chat template (one user turn)"),
                 max_new_tokens: int = typer.Option(128, "--max-new-tokens", min=1),
                 temperature: float = typer.Option(0.0, "--temperature", min=0.0,
                                                   help="0: greedy; above 0: sampled from softmax(logits / T)"),
                 prompts: Optional[Path] = typer.Option(None, "--prompts",
                                                        help="UTF-8 file, one prompt per line, generated in turn"),
                 device: Optional[str] = typer.Option(None, "--device", help="default: the first GPU, else the CPU"),
                 plain: bool = typer.Option(False, "--plain", help="model.generate as it is (no compile / CUDA graph)"),
                 json_out: bool = typer.Option(False, "--json", help="tokens, text and timings as JSON, no streaming"),
                 trust_remote_code: bool = typer.Option(False, "--trust-remote-code")):
    """Generate text, streaming it as it comes; then time to first token, decode tokens/s, peak
    memory and the int4 kernel that ran. On a GPU: static cache, decode attention and the whole
    step compiled into a CUDA graph (compile time shown; inductor caches it across runs); on the
    CPU: model.generate."""
    if (prompt is None) == (prompts is None):
        raise AnyquantError("give a prompt or --prompts FILE (one of them)")
    texts = [prompt] if prompt is not None else _read_prompts(prompts)
    setup_logging(False)

    import torch
    from transformers import AutoTokenizer, TextStreamer

    import anyquant
    from anyquant.eval.memory import peak_rss_bytes
    from anyquant.runtime.generate import FastDecoder, plain_generate

    t0 = time.perf_counter()
    model = anyquant.load(model_dir, device=device, trust_remote_code=trust_remote_code)
    load_s = time.perf_counter() - t0
    try:
        tok = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001 - any tokenizer failure means the same fix
        raise AnyquantError(f"{model_dir}: no tokenizer could be loaded ({type(e).__name__}: {e}); "
                            "save the tokenizer files with the model") from e
    if chat and not getattr(tok, "chat_template", None):
        raise AnyquantError(f"{model_dir}: the tokenizer has no chat template; drop --chat")
    encoded = [_encode(tok, t, chat) for t in texts]
    dev = next(model.parameters()).device
    eos = model.generation_config.eos_token_id if getattr(model, "generation_config", None) else None
    eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    fast = dev.type == "cuda" and not plain
    decoder = None
    if fast:
        longest = max(e.shape[1] for e in encoded) + max_new_tokens
        max_len = -(-longest // 256) * 256
        decoder = FastDecoder(model, max_len, temperature=temperature)
    results = []
    for text, ids in zip(texts, encoded):
        streamer = None if json_out else TextStreamer(tok, skip_prompt=True, skip_special_tokens=True)
        if streamer is not None:
            streamer.put(ids)   # the prompt (skipped)

        def on_token(t, streamer=streamer):
            if streamer is not None:
                streamer.put(torch.tensor([t]))
        if decoder is not None:
            new, stats = decoder.generate(ids, max_new_tokens, eos_token_ids=eos, on_token=on_token)
        else:
            rows, stats = plain_generate(model, ids, max_new_tokens, temperature=temperature, on_token=on_token)
            new = rows[0]
        if streamer is not None:
            streamer.end()
        results.append({"prompt": text, "tokens": new, "text": tok.decode(new, skip_special_tokens=True), **stats})
    kernels = getattr(model, "anyquant_kernels", None) or {}
    summary = {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "path": decoder.mode if decoder is not None else "model.generate (dynamic cache)",
        "load_s": round(load_s, 2),
        "compile_s": round(decoder.compile_s, 1) if decoder is not None else None,
        "int4_kernels": kernels or ("reference (CPU: dequantize + matmul)" if dev.type != "cuda" else "none"),
        "peak_memory_bytes": torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else peak_rss_bytes(),
        "peak_memory_kind": "GPU (torch max_memory_allocated)" if dev.type == "cuda" else "host RSS (process peak)",
    }
    if decoder is not None:
        decoder.close()
    if json_out:
        typer.echo(json.dumps({"results": results, **summary}, indent=2))
        return
    for r in results:
        rate = r["decode_tokens_per_s"]
        typer.echo(f"[{r['new_tokens']} tokens; time to first token {r['time_to_first_token_s']:.3f} s; "
                   f"decode {rate if rate is not None else '-'} tok/s]", err=True)
    comp = f"; compile + capture {summary['compile_s']} s" if summary["compile_s"] is not None else ""
    typer.echo(f"[{summary['device']}: {summary['path']}; load {summary['load_s']} s{comp}; peak memory "
               f"{summary['peak_memory_bytes'] / 2**30:.2f} GiB ({summary['peak_memory_kind']}); "
               f"int4 kernel: {summary['int4_kernels']}]", err=True)


def _read_prompts(path: Path) -> list[str]:
    try:
        lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
    except OSError as e:
        raise AnyquantError(f"--prompts {path}: cannot read it ({e.strerror})") from e
    lines = [ln for ln in lines if ln]
    if not lines:
        raise AnyquantError(f"--prompts {path}: no prompts (one per line, blank lines skipped)")
    return lines


def _encode(tok, text: str, chat: bool):
    if chat:
        ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)["input_ids"]
    else:
        ids = tok(text, return_tensors="pt")["input_ids"]
    return ids
