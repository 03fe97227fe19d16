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


def assert_stock_matches(stock, result_model, ids, method: str) -> None:
    """Stock transformers' reload of an anyquant output computes what anyquant's model computes.

    bitsandbytes outputs: the same kernels, so the same logits (to 1e-5). int4 outputs:
    compressed-tensors dequantizes at load in the dtype of the stored 16-bit scales, so each of
    its weights is anyquant's exact (q - zp) * scale rounded once to float16 / bfloat16: checked
    to the bit, then the logits, whose difference comes only from that rounding (measured on the
    tiny Llamas: relative error 1e-4 to 2e-4)."""
    from anyquant.runtime.int4_linear import Int4Linear

    got = stock(ids).logits.float()
    ref = result_model(ids).logits.float()
    int4 = {n: m for n, m in result_model.named_modules() if isinstance(m, Int4Linear)}
    if not int4:
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
        return
    for name, m in int4.items():
        exact = m.dequantized_weight(torch.float32)
        w = stock.get_submodule(name).weight.detach().float()
        assert torch.equal(w, exact.to(m.weight_scale.dtype).float()), f"{method}: {name} weight differs"
    rel = ((got - ref).norm() / ref.norm()).item()
    assert rel < 1e-3, f"{method}: stock transformers logits differ by {rel:.2e} (relative)"
