"""Tiny Llama models built from a config, saved as Hugging Face folders that reload offline."""

from __future__ import annotations

import json

import pytest
import torch

from rlsubnet.errors import UsageError
from rlsubnet.lab.config import model_size
from rlsubnet.lab.model import build_model, count_parameters, load_model, save_model
from rlsubnet.lab.tokenizer import build_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.mark.parametrize("size, lo, hi", [("micro", 1e4, 5e4), ("small", 1.0e6, 1.1e6), ("medium", 3.8e6, 4.5e6)])
def test_sizes(tok, size, lo, hi):
    from transformers import LlamaForCausalLM

    from rlsubnet.lab.model import llama_config

    with torch.device("meta"):  # count without allocating
        n = count_parameters(LlamaForCausalLM(llama_config(size, tok)))
    assert lo <= n <= hi  # small ≈ 1M, medium ≈ 4M


def test_unknown_size():
    with pytest.raises(UsageError, match="unknown --size 'huge'"):
        model_size("huge")


def test_same_seed_same_weights_and_llm_like_magnitudes(tok):
    a, b, c = build_model("micro", tok, 3), build_model("micro", tok, 3), build_model("micro", tok, 4)
    pa, pb, pc = (dict(m.named_parameters()) for m in (a, b, c))
    assert all(torch.equal(pa[n], pb[n]) for n in pa)
    assert not all(torch.equal(pa[n], pc[n]) for n in pa)
    w = build_model("small", tok, 0).model.layers[0].mlp.up_proj.weight
    assert 0.012 < w.abs().mean().item() < 0.02  # N(0, 0.02): mean |w| = 0.02·√(2/π) ≈ 0.016


def test_save_bf16_and_reload(tok, tmp_path):
    model = build_model("micro", tok, 0)
    save_model(model, tmp_path, torch.bfloat16, tokenizer=tok, metadata={"stage": "test"})
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["dtype"] == "bfloat16"
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        names = list(f.keys())
        assert all(f.get_tensor(n).dtype == torch.bfloat16 for n in names)
        assert f.metadata()["stage"] == "test"
    assert "lm_head.weight" not in names  # tied to the embeddings: stored (and counted) once
    again = load_model(tmp_path)
    assert next(again.parameters()).dtype == torch.float32
    for (n, p), (_, q) in zip(model.named_parameters(), again.named_parameters()):
        assert torch.equal(p.to(torch.bfloat16).float(), q), n  # fp32 masters start at the bf16 values exactly
    assert again.lm_head.weight.data_ptr() == again.model.embed_tokens.weight.data_ptr()


def test_load_refuses_a_folder_without_config(tmp_path):
    with pytest.raises(UsageError, match="not a model folder"):
        load_model(tmp_path)
