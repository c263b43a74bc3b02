"""Memory and time of training only a subnetwork: the sparse-state optimizer against plain AdamW and the dense
MaskedOptimizer, on a Llama-shaped model on the CPU.

    .venv/bin/python benchmarks/subnet_train_bench.py [--small] [--steps 6] [--threads 1] [--json OUT]

Model: ``LlamaForCausalLM`` from a ``LlamaConfig`` (tied embeddings): hidden 768, 12 layers, MLP 2048, vocab 32000,
110M parameters; ``--small``: hidden 320, 8 layers, MLP 864, 20M. One sequence of 64 tokens per step, so
parameters and optimizer state, not activations, dominate memory. Random masks (per tensor) at densities 1%, 5%,
30% and 100%. Variants, all AdamW (lr 1e-5, weight decay 0.1) with clipping at norm 1 by the full gradient:

- ``adamw``:        plain torch AdamW on fp32 weights under bf16 autocast (what TRL's ``bf16=True`` does);
- ``dense-masked``: the same plus :class:`rlsubnet.train.MaskedOptimizer` (dense state, gradients masked in step);
- ``sparse-bf16``:  :class:`rlsubnet.train.SparseMaskedOptimizer` on bf16 weights (fp32 masters of the k trainable
                    entries only; gradients reduced in backward);
- ``sparse-fp32``:  the sparse optimizer on fp32 weights under bf16 autocast (the weights are the masters).

Each run is a fresh process. Peak memory is the child's peak RssAnon (anonymous memory), sampled every 2 ms
from /proc as compare_bench.py does, during the training steps only (the child prints a marker when its
model, mask and optimizer are built), less the RssAnon of a bare child that imports the same modules. Children
run with ``MALLOC_MMAP_THRESHOLD_=65536`` so that freed tensors go back to the system and construction
leftovers do not count as training memory. "state" is the optimizer's own bytes between steps (moments; fp32
masters and indices for the sparse optimizer; the dense masks the MaskedOptimizer holds). Step time is the
median over --steps timed steps (after 2 warm-up steps) of forward + backward + step + zero_grad; "opt" is the
median of the optimizer-step part alone (clip_grad_norm_ + step() for the dense variants; step(), which clips,
for the sparse one, whose gradient gathering runs inside backward and counts in the step time only).
Prints figures and the CPU; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import select
import subprocess
import sys
import textwrap
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from compare_bench import rss_anon_kib

SIZES = {
    "default": {"hidden_size": 768, "num_hidden_layers": 12, "intermediate_size": 2048, "num_attention_heads": 12},
    "small": {"hidden_size": 320, "num_hidden_layers": 8, "intermediate_size": 864, "num_attention_heads": 5},
}
DENSITIES = (0.01, 0.05, 0.30, 1.0)
VARIANTS = ("adamw", "dense-masked", "sparse-bf16", "sparse-fp32")
MARKER = "-- built --"

BARE = """
import json, sys, torch, transformers
from transformers import LlamaConfig, LlamaForCausalLM
import rlsubnet.train, rlsubnet.train.sparse_optim, rlsubnet.masks
print(json.dumps({}))
"""

CHILD = """
import json, statistics, sys, time, warnings
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from rlsubnet.masks import Mask, random_mask
from rlsubnet.train import MaskedOptimizer, SparseMaskedOptimizer

warnings.simplefilter("ignore")
args = json.loads(sys.argv[1])
torch.set_num_threads(args["threads"])
variant, density = args["variant"], args["density"]
cfg = LlamaConfig(vocab_size=32000, max_position_embeddings=256, tie_word_embeddings=True, num_key_value_heads=None,
                  **args["size"])
weights_dtype = torch.bfloat16 if variant == "sparse-bf16" else torch.float32
torch.manual_seed(0)
default = torch.get_default_dtype()
torch.set_default_dtype(weights_dtype)  # built in its storage dtype: no transient fp32 copy of a bf16 model
model = LlamaForCausalLM(cfg)
torch.set_default_dtype(default)
model.train()
numel = sum(p.numel() for p in model.parameters())
shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
mask = random_mask(shapes, density=density, seed=1) if density < 1 else Mask.full(shapes, True)
lr, wd = 1e-5, 0.1
if variant in ("adamw", "dense-masked"):
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=wd)
    masked = MaskedOptimizer(opt, mask, model, compare_mode=None, allow_full=True, verify_steps=0) \\
        if variant == "dense-masked" else None
else:
    opt = SparseMaskedOptimizer(model, mask, "adamw", lr=lr, weight_decay=wd, max_grad_norm=1.0,
                                compare_mode=None, allow_full=True)
    masked = None
del mask
autocast = variant != "sparse-bf16"
g = torch.Generator().manual_seed(2)
batches = [torch.randint(0, cfg.vocab_size, (1, 64), generator=g) for _ in range(args["steps"] + 2)]


def state_bytes():
    if isinstance(opt, SparseMaskedOptimizer):
        return opt.state_bytes()
    n = sum(t.numel() * t.element_size() for st in opt.state.values() for t in st.values() if torch.is_tensor(t))
    if masked is not None:
        n += sum(pm.frozen.numel() for pm in masked._active if pm.frozen is not None)  # bool: 1 byte each
    return n


print("__MARKER__", flush=True)
step_s, opt_s = [], []
for i, x in enumerate(batches):
    t0 = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(input_ids=x, labels=x).loss
    loss.backward()
    t1 = time.perf_counter()
    if not isinstance(opt, SparseMaskedOptimizer):
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    t2 = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    t3 = time.perf_counter()
    if i >= 2:
        step_s.append(t3 - t0)
        opt_s.append(t2 - t1)
print(json.dumps({"numel": numel, "state_bytes": state_bytes(), "step_s": statistics.median(step_s),
                  "opt_s": statistics.median(opt_s), "loss": float(loss)}))
""".replace("__MARKER__", MARKER)


def run_child(code: str, arg: str = "{}") -> tuple[dict, int, int]:
    """Run ``code`` in a fresh interpreter: (its JSON output, peak RssAnon KiB before / after the marker)."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), arg], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, bufsize=1)
    peaks, phase, lines = [0, 0], 0, []
    while True:
        ready, _, _ = select.select([proc.stdout], [], [], 0.002)
        if ready:
            line = proc.stdout.readline()
            if not line:
                break
            if line.strip() == MARKER:
                phase = 1
            else:
                lines.append(line)
        kib = rss_anon_kib(proc.pid)
        if kib:
            peaks[phase] = max(peaks[phase], kib)
    proc.wait()
    err = proc.stderr.read()
    if proc.returncode:
        raise SystemExit(f"child failed ({proc.returncode}):\n{err[-3000:]}")
    out = json.loads(lines[-1]) if lines else {}
    return out, peaks[0], peaks[1]


def cpu_line() -> str:
    model, flags = platform.processor() or "?", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and model in ("?", "", "x86_64"):
                    model = line.split(":", 1)[1].strip()
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    wanted = [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    avx512 = sorted(f for f in flags if f.startswith("avx512"))
    return (f"{model}; flags: {' '.join(wanted) or 'none of avx2/avx512'}; avx512 flags: {' '.join(avx512) or 'none'}; "
            f"{os.cpu_count()} CPUs")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--small", action="store_true", help="~20M parameters instead of ~110M")
    ap.add_argument("--steps", type=int, default=6, help="timed steps per run (after 2 warm-up steps)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()
    import torch
    import transformers

    size = SIZES["small" if args.small else "default"]
    print(f"CPU: {cpu_line()}")
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {args.threads} thread(s); "
          f"model {size}, one sequence of 64 tokens, {args.steps} timed steps")
    _, bare_kib, _ = run_child(BARE)
    print(f"bare child (imports): {bare_kib / 1024:.0f} MiB RssAnon, subtracted below")

    results = []

    def measure(variant, density):
        spec = json.dumps({"variant": variant, "density": density, "size": size, "steps": args.steps,
                           "threads": args.threads})
        out, build_kib, train_kib = run_child(CHILD, spec)
        rec = {"variant": variant, "density": density, **out, "peak_train_mib": (train_kib - bare_kib) / 1024,
               "peak_build_mib": (build_kib - bare_kib) / 1024}
        results.append(rec)
        return rec

    base = measure("adamw", 1.0)
    print(f"model: {base['numel'] / 1e6:.1f}M parameters")
    head = (f"{'density':>7} {'variant':<13} {'state MiB':>10} {'peak MiB':>9} {'×adamw':>7} {'step s':>8} "
            f"{'×adamw':>7} {'opt s':>8} {'×adamw':>7}")
    print(head)
    print("-" * len(head))

    def row(rec):
        print(f"{rec['density']:>7.0%} {rec['variant']:<13} {rec['state_bytes'] / 2**20:>10.1f} "
              f"{rec['peak_train_mib']:>9.0f} {rec['peak_train_mib'] / base['peak_train_mib']:>7.2f} "
              f"{rec['step_s']:>8.3f} {rec['step_s'] / base['step_s']:>7.2f} {rec['opt_s']:>8.4f} "
              f"{rec['opt_s'] / base['opt_s']:>7.2f}", flush=True)

    print(f"{'any':>7} {'adamw':<13} {base['state_bytes'] / 2**20:>10.1f} {base['peak_train_mib']:>9.0f} "
          f"{1:>7.2f} {base['step_s']:>8.3f} {1:>7.2f} {base['opt_s']:>8.4f} {1:>7.2f}", flush=True)
    for density in DENSITIES:
        for variant in VARIANTS[1:]:
            row(measure(variant, density))
    print("goals (vs adamw): 5%: peak ≤ 0.5×, opt step ≤ 0.5×; 30%: peak ≤ 0.75×; step ≤ 1.05× at every density")
    if args.json:
        Path(args.json).write_text(json.dumps({"cpu": cpu_line(), "size": size, "bare_mib": bare_kib / 1024,
                                               "results": results}, indent=1))


if __name__ == "__main__":
    main()
