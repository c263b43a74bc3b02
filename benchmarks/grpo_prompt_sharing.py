"""What a GRPO loss step would save by running each prompt once for all of its completions.

    .venv/bin/python benchmarks/grpo_prompt_sharing.py [--prompts 32] [--generations 8] [--completion 4] [--repeat 10]

TRL's GRPO trainer computes the loss's log-probabilities with one forward pass over every [prompt; completion] row,
so a prompt's tokens go through the model once for each of its completions, and the backward pass goes through them
as often. This benchmark builds the demo's small lab model (random weights: the time does not depend on them), 32
training prompts of the `add` task, left-padded as TRL pads them, and 8 random 4-token completions each (the demo's
GRPO shapes), and times one forward + backward pass of the mean completion log-probability two ways, on one thread:

- full:   every row in full, as TRL runs it;
- shared: the prompts once (32 rows, their key/value cache kept with its gradient), the cache repeated for the
          completions, then the completion tokens on top of it; the log-probability of each completion's first token
          comes from its prompt's last position.

It also prints how far the two are apart (the largest difference of a log-probability, the largest relative
difference of a parameter's gradient): the same mathematics, summed in another order, so not the same bits.
Prints figures; asserts nothing. The lab's GRPO stages use the shared form (rlsubnet.lab.shared_prompts, which
finds the shared prefix in the batch itself); this script writes it out by hand, to time it against the full pass.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--generations", type=int, default=8)
    ap.add_argument("--completion", type=int, default=4, help="completion tokens (the demo's add task: 4)")
    ap.add_argument("--repeat", type=int, default=10)
    args = ap.parse_args()
    torch.set_num_threads(1)

    from transformers import DynamicCache

    from rlsubnet.lab.model import build_model
    from rlsubnet.lab.tasks import get_task
    from rlsubnet.lab.tokenizer import build_tokenizer

    tok = build_tokenizer()
    model = build_model("small", tok, seed=0)
    model.train()
    p, g, c = args.prompts, args.generations, args.completion
    tok.padding_side = "left"
    enc = tok([q.prompt for q in get_task("add").split("train")[:p]], return_tensors="pt", padding=True)
    pid, pm = enc["input_ids"], enc["attention_mask"]
    digits = torch.tensor([tok.convert_tokens_to_ids(str(i)) for i in range(10)])
    comp = digits[torch.randint(0, 10, (p * g, c), generator=torch.Generator().manual_seed(0))]

    def logprobs(logits):
        return torch.log_softmax(logits.float(), -1).gather(-1, comp.unsqueeze(-1)).squeeze(-1)

    def full():
        ids = torch.cat([pid.repeat_interleave(g, 0), comp], 1)
        mask = torch.cat([pm.repeat_interleave(g, 0), torch.ones_like(comp)], 1)
        pos = (mask.cumsum(1) - 1).clamp(min=0)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=c + 1).logits[:, :-1]
        lp = logprobs(logits)
        (-lp.mean()).backward()
        return lp.detach()

    def shared():
        pos = (pm.cumsum(1) - 1).clamp(min=0)
        out = model(input_ids=pid, attention_mask=pm, position_ids=pos, use_cache=True)
        cache = DynamicCache()
        for i, layer in enumerate(out.past_key_values.layers):
            cache.update(layer.keys.repeat_interleave(g, 0), layer.values.repeat_interleave(g, 0), i)
        mask = torch.cat([pm.repeat_interleave(g, 0), torch.ones(p * g, c - 1, dtype=pm.dtype)], 1)
        pos2 = pos[:, -1:].repeat_interleave(g, 0) + torch.arange(1, c)
        out2 = model(input_ids=comp[:, :-1], attention_mask=mask, position_ids=pos2, past_key_values=cache)
        lp = logprobs(torch.cat([out.logits[:, -1:].repeat_interleave(g, 0), out2.logits], 1))
        (-lp.mean()).backward()
        return lp.detach()

    def grads():
        out = {n: q.grad.clone() for n, q in model.named_parameters()}
        model.zero_grad()
        return out

    a = full()
    ga = grads()
    b = shared()
    gb = grads()
    rel = max(((gb[n] - ga[n]).norm() / ga[n].norm().clamp(min=1e-30)).item() for n in ga)
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, 1 thread")
    print(f"{p} prompts x {g} completions, prompt {pid.shape[1]} tokens (padded), completion {c} tokens")
    print(f"largest log-probability difference {(a - b).abs().max().item():.2e}, largest relative gradient "
          f"difference {rel:.2e}")
    best = {}
    for f in (full, shared) * 2:
        t = time.process_time()
        for _ in range(args.repeat):
            f()
            model.zero_grad()
        s = (time.process_time() - t) / args.repeat
        best[f.__name__] = min(best.get(f.__name__, s), s)
    print(f"forward + backward, CPU seconds (best of 2 x {args.repeat}): full {best['full']:.3f}, "
          f"shared {best['shared']:.3f} ({1 - best['shared'] / best['full']:.0%} less)")


if __name__ == "__main__":
    main()
