"""Tiny Llama-style causal LMs built from a config: nothing is downloaded.

Sizes (parameters counted once, embeddings tied to the LM head, vocabulary of the default tokenizer):
``micro`` for tests (~26k), ``small`` (~1.05M, the demo default) and ``medium`` (~4.2M). Their linear weights
start at N(0, 0.02), the magnitude of an LLM's, which matters here: whether a bf16 weight can change at all
depends on |w|.

Checkpoints are Hugging Face folders (config.json + model.safetensors [+ tokenizer]) that
``AutoModelForCausalLM.from_pretrained`` opens offline; each parameter is stored once (the tied LM head is not
written twice, so it is not counted twice by the compare engine either).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from rlsubnet.checkpoint import SafetensorsWriter, save_state_dict
from rlsubnet.errors import UsageError
from rlsubnet.fileio import atomic_write_text
from rlsubnet.lab.config import model_size


def llama_config(size: str, tokenizer):
    from transformers import LlamaConfig

    s = model_size(size)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        **dataclasses.asdict(s),  # ModelSize's fields are LlamaConfig's own keys
        num_key_value_heads=s.num_attention_heads,
        initializer_range=0.02,
        tie_word_embeddings=True,
        attention_dropout=0.0,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    # save_pretrained would set this; TRL reads it to rebuild the reference model from the folder.
    config.architectures = ["LlamaForCausalLM"]
    return config


def build_model(size: str, tokenizer, seed: int):
    """A freshly initialised fp32 model; the same size, tokenizer and seed give bit-identical weights."""
    from transformers import LlamaForCausalLM

    config = llama_config(size, tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model.float()


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())  # shared (tied) parameters are yielded once


def unique_state(model, dtype=None) -> dict:
    """name -> detached tensor for every parameter, each stored once (tied weights under their first name)."""
    out = {}
    for name, p in model.named_parameters():
        t = p.detach()
        out[name] = t.to(dtype).contiguous() if dtype is not None else t.contiguous().clone()
    return out


def save_weights_file(tensors: dict, path: str | Path, metadata: dict | None = None) -> Path:
    """One safetensors file (fp32 masters, snapshots), written under a temporary name and renamed."""
    specs = [(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]
    meta = {"format": "pt", **{str(k): str(v) for k, v in (metadata or {}).items()}}
    with SafetensorsWriter(path, specs, meta) as w:
        for n, t in tensors.items():
            w.write(n, t)
    return Path(path)


def save_model(model, out_dir: str | Path, dtype, *, tokenizer=None, metadata: dict | None = None) -> Path:
    """Write ``model`` as a Hugging Face folder with its weights cast to ``dtype`` (a torch dtype)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {"format": "pt", **{k: json.dumps(v) if not isinstance(v, str) else v for k, v in (metadata or {}).items()}}
    save_state_dict(unique_state(model, dtype), out_dir, metadata=meta)
    config = model.config.to_dict()
    config["dtype"] = str(dtype).removeprefix("torch.")
    atomic_write_text(out_dir / "config.json", json.dumps(config, indent=2, sort_keys=True) + "\n")
    model.generation_config.save_pretrained(str(out_dir))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out_dir))
    return out_dir


def load_model(path: str | Path, dtype: torch.dtype | None = None):
    """Load a folder written by :func:`save_model` (or any local Llama folder) and upcast it to ``dtype``
    (fp32 by default): training keeps fp32 master weights whose starting values are the stored ones exactly."""
    from transformers import AutoModelForCausalLM

    path = Path(path)
    if not (path / "config.json").is_file():
        raise UsageError(f"{path}: not a model folder (no config.json)")
    model = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True, dtype=torch.float32)
    # transformers wraps PreTrainedModel.to in functools.wraps(nn.Module.to), whose stub loses the bound self
    return model.to(dtype or torch.float32)  # type: ignore[arg-type]
