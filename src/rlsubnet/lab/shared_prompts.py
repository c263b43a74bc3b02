"""Run each prompt once in GRPO's loss: its 8 completions share the prompt's forward (and backward) pass.

TRL's GRPO trainer scores the completions with one forward pass of the model's backbone over every
[prompt; completion] row, so a prompt's tokens go through the model once per completion (7 of a row's 11 tokens in
the demo, identical work 7 times in 8), and the backward pass goes through them as often. :func:`share_prompts`
wraps the backbone's ``forward``: when a batch's rows repeat the same leading tokens, the backbone runs those once
per distinct prefix, keeping their key/value cache (with its gradient), repeats the cache for the rows, then runs
the remaining tokens of every row on top of it. The rows' hidden states are the same mathematics as the full pass,
summed in another order: the same up to float rounding, not the same bits (the gradient of a shared prefix is
summed over its rows before it reaches the weights). ``benchmarks/grpo_prompt_sharing.py`` measures the difference
and the time (62% less for the demo's shapes).

Only the forward calls that look like the loss's are changed: 2-D ``input_ids`` and ``attention_mask``, no cache
given and none asked for (``use_cache=False``), no position ids and no other input; generation's calls (which carry
a cache) pass through untouched. The model's own positions are kept: the remaining tokens continue the prefix's
positions, as in the full pass.
"""

from __future__ import annotations

import functools

import torch

# A prefix is shared only when it saves at least this many token rows of the backbone's work.
MIN_SAVED_ROWS = 64


def share_prompts(model) -> None:
    """Wrap ``model``'s backbone (``model.model``) once so that repeated prefixes run once (module docstring)."""
    backbone = getattr(model, "model", None)
    if backbone is None or getattr(backbone, "_rlsubnet_shared_prompts", False):
        return
    original = backbone.forward

    @functools.wraps(original)
    def forward(*args, **kwargs):
        # gradient checkpointing turns the prefix's cache off: nothing to share then
        checkpointing = getattr(backbone, "gradient_checkpointing", False) and backbone.training
        plan = None if args or checkpointing else _plan(kwargs)
        if plan is None:
            return original(*args, **kwargs)
        return _run_shared(original, kwargs, *plan)

    backbone.forward = forward
    backbone._rlsubnet_shared_prompts = True


def _plan(kwargs: dict):
    """(prefix length, first row of each distinct prefix, each row's prefix index) when sharing applies, else None."""
    ids, mask = kwargs.get("input_ids"), kwargs.get("attention_mask")
    if ids is None or mask is None or not isinstance(mask, torch.Tensor) or ids.dim() != 2 or mask.shape != ids.shape:
        return None
    if kwargs.get("use_cache") is not False or kwargs.get("cache") is not None:
        return None
    known = {"input_ids", "attention_mask", "use_cache", "return_dict"}
    if any(v is not None and v is not False and k not in known for k, v in kwargs.items()):
        return None  # position ids, embeddings, a cache, router logits: not a call this code knows how to split
    rows, length = ids.shape
    both = torch.cat([ids, mask.to(ids.dtype)], dim=1).view(rows, 2, length)
    best = None
    for cut in range(1, length):  # at least one token of every row runs on top of the shared prefix
        prefixes = both[:, :, :cut].reshape(rows, 2 * cut)
        distinct, inverse = torch.unique(prefixes, dim=0, return_inverse=True)
        saved = (rows - distinct.shape[0]) * cut
        if saved >= MIN_SAVED_ROWS and (best is None or saved > best[0]):
            best = (saved, cut, inverse, distinct.shape[0])
    if best is None:
        return None
    _, cut, inverse, n = best
    first = torch.full((n,), rows, dtype=torch.long)
    first.scatter_reduce_(0, inverse, torch.arange(rows), reduce="amin")
    return cut, first, inverse


def _run_shared(original, kwargs: dict, cut: int, first: torch.Tensor, inverse: torch.Tensor):
    from transformers.cache_utils import DynamicCache
    from transformers.modeling_outputs import BaseModelOutputWithPast

    ids, mask = kwargs["input_ids"], kwargs["attention_mask"]
    head = dict(
        kwargs, input_ids=ids[:, :cut].index_select(0, first), attention_mask=mask[:, :cut].index_select(0, first)
    )
    head["use_cache"] = True
    out = original(**head)
    cache = DynamicCache()
    for i, layer in enumerate(out.cache.layers):
        cache.update(layer.keys.index_select(0, inverse), layer.values.index_select(0, inverse), i)
    tail = dict(kwargs, input_ids=ids[:, cut:], attention_mask=mask, cache=cache)
    tail["use_cache"] = True
    rest = original(**tail)
    hidden = torch.cat([out.last_hidden_state.index_select(0, inverse), rest.last_hidden_state], 1)
    return BaseModelOutputWithPast(last_hidden_state=hidden)  # no cache: the caller asked for none
