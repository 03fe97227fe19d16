"""The public API (anyquant.api, re-exported by `import anyquant`): every function called twice,
after every submodule has been imported, so no submodule can shadow a public name."""

from __future__ import annotations

import importlib
import pkgutil

import pytest
import torch
from transformers import AutoModelForCausalLM

import anyquant
from anyquant.errors import AnyquantError


class WordTokenizer:
    """One id per word (ids 10..209), HF's encode() signature."""

    bos_token_id = 1

    def encode(self, text, add_special_tokens=True, **kwargs):
        return [10 + (sum(map(ord, w)) % 200) for w in text.split()]


TEXT = " ".join(f"word{i % 97} token{i % 13}" for i in range(600))


@pytest.fixture(scope="module", autouse=True)
def every_submodule_imported():
    # Importing a submodule binds it as an attribute of its parent package: a submodule named
    # like a public function would replace that function here.
    for info in pkgutil.walk_packages(anyquant.__path__, "anyquant."):
        if info.name == "anyquant.cli.__main__":
            continue
        try:
            importlib.import_module(info.name)
        except ModuleNotFoundError as e:  # a kernel module whose optional dependency (triton) is absent
            if e.name not in ("triton", "gemlite"):
                raise


def test_public_names_are_the_api_functions():
    from anyquant import api

    for name in ("inspect", "plan", "quantize", "quantize_to_disk", "save", "load", "evaluate", "export", "doctor",
                 "known_methods"):
        assert getattr(anyquant, name) is getattr(api, name), name
        assert callable(getattr(anyquant, name)), name
    with pytest.raises(AttributeError):
        anyquant.no_such_function  # noqa: B018


def test_each_public_function_twice(tiny_llama, tmp_path):
    for _ in range(2):
        data = anyquant.inspect(tiny_llama)
        assert data["total_params"] > 0 and "estimated_size" in data
        mm = anyquant.inspect(AutoModelForCausalLM.from_pretrained(tiny_llama))
        assert mm.linears()

    for _ in range(2):
        p = anyquant.plan(str(tiny_llama), "int4")
        assert p.to_quantize() and p.compute_dtype == "float32"

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    before = {n: t.dtype for n, t in model.named_parameters()}
    anyquant.plan(model, "nf4")
    anyquant.plan(model, "nf4")
    assert {n: t.dtype for n, t in model.named_parameters()} == before  # planning changes nothing

    results = [anyquant.quantize(str(tiny_llama), "int4", progress=False) for _ in range(2)]
    ids = torch.randint(0, 512, (1, 16), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(results[0].model(ids).logits, results[1].model(ids).logits, rtol=0, atol=0)

    outs = [anyquant.save(r, tmp_path / f"out{i}") for i, r in enumerate(results)]
    loaded = [anyquant.load(o) for o in outs for _ in range(2)]
    for m in loaded:
        torch.testing.assert_close(m(ids).logits, results[0].model(ids).logits, rtol=0, atol=1e-5)

    # streamed, from the single-file checkpoint: the same model as the in-memory path's, reloaded
    streamed = [anyquant.quantize_to_disk(str(tiny_llama), "int4", tmp_path / f"st{i}", progress=False)
                for i in range(2)]
    for r in streamed:
        torch.testing.assert_close(anyquant.load(r.output)(ids).logits, results[0].model(ids).logits,
                                   rtol=0, atol=1e-5)

    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    scores = [anyquant.evaluate(loaded[0], base, TEXT, tokenizer=WordTokenizer(), max_tokens=256, progress=False)
              for _ in range(2)]
    assert scores[0] == scores[1]
    assert scores[0]["perplexity"] > 1 and 0 < scores[0]["top1_agreement"] <= 1 and scores[0]["kl_divergence"] >= 0

    for _ in range(2):
        report = anyquant.doctor(tiny_llama)
        assert "bnb_config" in report and "findings" in report

    assert anyquant.known_methods() == anyquant.known_methods()
    assert "gptq" in anyquant.known_methods()


def test_unknown_method_names_the_closest():
    with pytest.raises(AnyquantError, match="did you mean gptq"):
        anyquant.plan(torch.nn.Linear(4, 4), "gtpq")
