import os
import warnings
from pathlib import Path

import pytest
import torch

warnings.filterwarnings("ignore", message=".*MatMul8bitLt.*")


def make_tiny_llama(path: Path, hidden: int = 256, inter: int = 512, layers: int = 2, vocab: int = 512,
                    tie: bool = True, seed: int = 0) -> Path:
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab,
                      tie_word_embeddings=tie, max_position_embeddings=256)
    torch.manual_seed(seed)
    m = AutoModelForCausalLM.from_config(cfg)
    m.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture(scope="session")
def tiny_llama_576(tmp_path_factory) -> Path:
    """SmolLM2's awkward width: 576 is not divisible by 128."""
    return make_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama-576", hidden=576, inter=1536, layers=1)


@pytest.fixture
def ids():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 512, (2, 24), generator=g)
