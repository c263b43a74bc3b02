"""Which layer and which kind of module a tensor name belongs to.

Covers the naming of Llama, Qwen2/3, Mistral/Mixtral, Gemma 1-3, Phi-3, GPT-2, GPT-NeoX and OPT checkpoints.
Anything unrecognised is kind ``other``: it is still counted everywhere, just not grouped.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Hashable, Iterable
from functools import lru_cache
from typing import TypeVar

T = TypeVar("T")

# The order the tables print in.
MODULE_KINDS = (
    "q",
    "k",
    "v",
    "qkv",
    "o",
    "gate",
    "up",
    "gate_up",
    "down",
    "mlp other",
    "embed",
    "lm_head",
    "norm",
    "other",
)

_LAYER = re.compile(r"(?:^|\.)(?:layers|h|layer|blocks|decoder\.layers|encoder\.layers)\.(\d+)(?:\.|$)")

# (pattern on the name, kind), first match wins. Patterns look at the module path without the final
# ".weight"/".bias" so a bias is grouped with its matrix.
_KIND_RULES: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(p), k)
    for p, k in (
        (r"(?:^|\.)(?:[a-z_]*norm[a-z_0-9]*|ln_\w+|ln\d*|layernorm\w*|final_layer_norm)$", "norm"),
        (r"(?:^|\.)(?:q_norm|k_norm)$", "norm"),
        (r"(?:^|\.)(?:embed_tokens|wte|wpe|embed_in|embed_positions|word_embeddings|embeddings?)$", "embed"),
        (r"(?:^|\.)(?:lm_head|embed_out|output)$", "lm_head"),
        (r"(?:^|\.)(?:q_proj|query|wq)$", "q"),
        (r"(?:^|\.)(?:k_proj|key|wk)$", "k"),
        (r"(?:^|\.)(?:v_proj|value|wv)$", "v"),
        (r"(?:^|\.)(?:qkv_proj|c_attn|query_key_value|Wqkv|wqkv)$", "qkv"),
        (r"(?:^|\.)(?:o_proj|out_proj|wo)$", "o"),
        (r"(?:attn|attention)\.(?:c_proj|dense)$", "o"),
        (r"(?:^|\.)(?:gate_up_proj)$", "gate_up"),
        (r"(?:^|\.)(?:gate_proj|w1)$", "gate"),
        (r"(?:^|\.)(?:up_proj|w3|c_fc|dense_h_to_4h|fc1)$", "up"),
        (r"(?:^|\.)(?:down_proj|w2|dense_4h_to_h|fc2)$", "down"),
        (r"(?:mlp|ffn|feed_forward)\.c_proj$", "down"),
        (r"(?:mlp|moe|ffn|feed_forward|block_sparse_moe)(?:\.|$)", "mlp other"),
    )
)


@lru_cache(maxsize=65536)
def layer_of(name: str) -> int | None:
    """Transformer block index in a tensor name, or None for tensors outside the blocks (embeddings, final norm)."""
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


@lru_cache(maxsize=65536)
def module_kind(name: str) -> str:
    """One of :data:`MODULE_KINDS` for a tensor name."""
    path = re.sub(r"\.(?:weight|bias|scale|g|b)$", "", name)
    for pattern, kind in _KIND_RULES:
        if pattern.search(path):
            return kind
    return "other"


def is_norm(name: str) -> bool:
    return module_kind(name) == "norm"


def table_order(keys: Iterable[Hashable], by: str) -> list:
    """Group keys in the order tables print them: layers ascending with None (outside the blocks) last;
    module kinds in :data:`MODULE_KINDS` order, anything else after them."""
    keys = list(keys)
    if by == "layer":
        return sorted(keys, key=lambda k: (k is None, k if k is not None else 0))
    return [k for k in MODULE_KINDS if k in keys] + [k for k in keys if k not in MODULE_KINDS]


def grouped(items: Iterable[T], key: Callable[[T], Hashable], by: str) -> list[tuple[Hashable, list[T]]]:
    """``items`` pooled by ``key`` (a layer, ``by="layer"``, or a module kind, ``by="module"``), in table order."""
    groups: dict[Hashable, list[T]] = {}
    for item in items:
        groups.setdefault(key(item), []).append(item)
    return [(k, groups[k]) for k in table_order(groups, by)]
