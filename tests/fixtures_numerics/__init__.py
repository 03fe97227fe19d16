"""Tiny models for the numerics guard (F1, F3).

`make_overflow_llama`: an InternVL-like failure in a tiny Llama: one block's MLP multiplies two
large projections, so the value entering `down_proj` passes 65504 (about 2e5) while every module
output stays small. In float16 it becomes inf and the logits NaN; float32 and bfloat16 are fine.
`escape=True` instead lets the overflow reach the residual stream (no module boundary contains it).
Saved in bfloat16, so its config declares bfloat16 (as InternVL's does).
"""

from __future__ import annotations

from pathlib import Path

import torch


def make_overflow_llama(path: Path, *, escape: bool = False, seed: int = 0) -> Path:
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, tie_word_embeddings=False,
                      max_position_embeddings=64)
    torch.manual_seed(seed)
    m = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        mlp = m.model.layers[1].mlp
        mlp.gate_proj.weight.mul_(1000)
        mlp.up_proj.weight.mul_(1000)
        # contained: the product is large, down_proj brings it back to ~1; escape: it stays large
        mlp.down_proj.weight.mul_(1e-4 if not escape else 10.0)
    m.to(torch.bfloat16).save_pretrained(path)  # declares bfloat16, like InternVL
    return path


def make_glm4v_like(path: Path, *, seed: int = 0) -> Path:
    """Remote-code VLM whose vision forward casts images to bfloat16 before a conv (F1)."""
    import importlib.util
    import shutil
    import sys

    here = Path(__file__).parent / "glm4v_like"
    path.mkdir(parents=True, exist_ok=True)
    for f in ("configuration_glm4vlike.py", "modeling_glm4vlike.py"):
        shutil.copy(here / f, path / f)
    pkg = "anyquant_fixture_glm4v_like"
    spec = importlib.util.spec_from_file_location(pkg, here / "__init__.py", submodule_search_locations=[str(here)])
    mod = importlib.util.module_from_spec(spec)
    sys.modules[pkg] = mod
    spec.loader.exec_module(mod)
    from anyquant_fixture_glm4v_like.configuration_glm4vlike import Glm4vLikeConfig
    from anyquant_fixture_glm4v_like.modeling_glm4vlike import Glm4vLikeForCausalLM

    cfg = Glm4vLikeConfig(auto_map={"AutoConfig": "configuration_glm4vlike.Glm4vLikeConfig",
                                    "AutoModelForCausalLM": "modeling_glm4vlike.Glm4vLikeForCausalLM"})
    torch.manual_seed(seed)
    Glm4vLikeForCausalLM(cfg).to(torch.bfloat16).save_pretrained(path)  # declares bfloat16, like GLM-4V
    return path


def _import_fixture(folder: str, pkg: str):
    import importlib.util
    import sys

    here = Path(__file__).parent / folder
    spec = importlib.util.spec_from_file_location(pkg, here / "__init__.py", submodule_search_locations=[str(here)])
    mod = importlib.util.module_from_spec(spec)
    sys.modules[pkg] = mod
    spec.loader.exec_module(mod)
    return here


def make_internvl_like(path: Path, *, seed: int = 0) -> Path:
    """InternVL-like remote-code VLM (vision tower `vision_model`, MLP projector `mlp1`, Llama
    `language_model`) whose LLM block 1 MLP feeds ~1e5 into `down_proj` (outputs stay ~1): the
    InternVL2.5 float16 overflow (F3). Saved in bfloat16 (its config declares bfloat16)."""
    import shutil

    here = _import_fixture("internvl_like", "anyquant_fixture_internvl_like")
    path.mkdir(parents=True, exist_ok=True)
    files = ("configuration_internvllike.py", "modeling_internvllike.py")
    for f in files:
        shutil.copy(here / f, path / f)
    from anyquant_fixture_internvl_like.configuration_internvllike import (
        InternVLLikeConfig,
    )
    from anyquant_fixture_internvl_like.modeling_internvllike import (
        InternVLLikeForCausalLM,
    )

    cfg = InternVLLikeConfig(auto_map={"AutoConfig": "configuration_internvllike.InternVLLikeConfig",
                                       "AutoModelForCausalLM": "modeling_internvllike.InternVLLikeForCausalLM"})
    torch.manual_seed(seed)
    m = InternVLLikeForCausalLM(cfg)
    with torch.no_grad():
        for lin in m.modules():
            if isinstance(lin, torch.nn.Linear):
                torch.nn.init.normal_(lin.weight, std=0.05)
        mlp = m.language_model.model.layers[1].mlp
        mlp.gate_proj.weight.mul_(1000)
        mlp.up_proj.weight.mul_(1000)
        mlp.down_proj.weight.mul_(1e-4)
    m.to(torch.bfloat16).save_pretrained(path)
    for f in files:
        shutil.copy(here / f, path / f)
    return path
