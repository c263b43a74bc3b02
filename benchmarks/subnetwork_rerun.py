"""A small end-to-end check of the subnetwork tools on a lab model: masks, overlap against both chance
baselines, and a masked GRPO re-run (the paper's Table 3 protocol, one seed, one algorithm).

    .venv/bin/python benchmarks/subnetwork_rerun.py [--work bench-out/subnet] [--size small] [--steps 100]

1. θ0: the lab's pretraining (SFT from scratch on 2-digit addition until 50% validation accuracy), saved bf16.
2. Two full GRPO runs from θ0 (seeds 0 and 1; lr 1e-6, batch 32 prompts × 8 completions, clip 1, no KL).
3. Masks at atol 1e-5 (bf16): M0 from the seed-0 run, M1 from the seed-1 run; their overlap with the density
   chance and the magnitude-matched chance.
4. GRPO re-runs from θ0 with seed 0's settings (same rows, same order, same sampling seed): restricted to M0
   (θ_sub), and to a random per-tensor mask of M0's density (θ_rand). Identity with θ_full at atol 0, 1e-5, 1e-4,
   overall and inside M0; held-out accuracy. Every stage is cached under --work by its settings.

Prints figures; asserts nothing. Takes a few minutes on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def identity_table(full_dir, other_dir, mask) -> dict:
    """{atol: (identity overall, identity inside the mask)} at atol 0, 1e-5, 1e-4."""
    from rlsubnet.masks import identity

    return {repr(r["atol"]): {"overall": r["identity"], "inside_mask": r["identity_in_mask"]}
            for r in identity(full_dir, other_dir, atols=(0.0, 1e-5, 1e-4), inside=mask)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="bench-out/subnet")
    ap.add_argument("--size", default="small")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--lr", type=float, default=1e-6)
    args = ap.parse_args()

    from rlsubnet.lab.pretrain import PretrainSpec, run_pretrain
    from rlsubnet.lab.stages import StageResult, StageSpec, run_stage
    from rlsubnet.masks import build_mask, overlap, random_mask
    from rlsubnet.train import attach_mask

    work = Path(args.work)
    t0 = time.monotonic()
    pre_dir = work / f"pretrain-{args.size}"
    if not (pre_dir / "stage.json").exists():
        run_pretrain(PretrainSpec(size=args.size, tasks=("add",), seed=0, target_accuracy=0.5, max_steps=2000), pre_dir,
                     progress=False, overwrite=True)
    pre = StageResult.load(pre_dir)
    base = pre.dir / "model"
    print(f"θ0: {pre.record['settings']}; {pre.record['steps_done']} steps; held-out accuracy "
          f"{pre.record['accuracy']['add']['bf16']['accuracy']:.3f}  [{time.monotonic() - t0:.0f} s]")

    def spec(name, seed):
        return StageSpec(name=name, algorithm="grpo", task="add", data="prompts", learning_rate=args.lr, steps=args.steps,
                         batch_size=32, seed=seed, num_generations=8, max_grad_norm=1.0, beta=0.0, snapshot_every=args.steps)

    def stage(name, seed, mask=None, label=None):
        out = work / f"{args.size}-{name}-seed{seed}-lr{args.lr:g}-s{args.steps}"
        if not (out / "stage.json").exists():
            extra, configure = None, None
            if mask is not None:
                extra = {"mask": label, "bits_sha256": mask.bits_sha256()}
                configure = lambda trainer: attach_mask(trainer, mask)  # noqa: E731
            run_stage(spec(name, seed), base_dir=base, out_dir=out, configure_trainer=configure, extra_record=extra,
                      progress=False, overwrite=True)
        r = StageResult.load(out)
        print(f"{name}: {r.record['settings']}; accuracy {r.record['accuracy']['add']['bf16']['accuracy']:.3f}; "
              f"train {r.record['timings']['train_s']:.0f} s  [{time.monotonic() - t0:.0f} s]")
        return r

    full0, full1 = stage("grpo-full", 0), stage("grpo-full", 1)
    m0 = build_mask(base, full0.model_dir, atol=1e-5)
    m1 = build_mask(base, full1.model_dir, atol=1e-5)
    rand = random_mask(m0, scope="per_tensor", seed=0)
    sub = stage("grpo-sub", 0, m0, "M0 (seed-0 full run, atol 1e-5, bf16)")
    rnd = stage("grpo-rand", 0, rand, "random per-tensor mask of M0's density, seed 0")

    ov = overlap(m0, m1, base=base, labels=("seed 0", "seed 1"))
    ov_rand = overlap(m0, rand, base=base, labels=("seed 0", "random"))
    result = {
        "settings": spec("grpo", 0).settings_line(),
        "density": {"M0": m0.density, "M1": m1.density},
        "overlap_seeds": {k: ov.figures[k] for k in ("o1", "o2", "chance_o1", "chance_o2", "magnitude_chance_o1", "magnitude_chance_o2", "jaccard")},
        "overlap_random": {k: ov_rand.figures[k] for k in ("o1", "o2", "chance_o1", "magnitude_chance_o1")},
        "identity_sub_vs_full": identity_table(full0.model_dir, sub.model_dir, m0),
        "identity_rand_vs_full": identity_table(full0.model_dir, rnd.model_dir, m0),
        "identity_seed1_vs_seed0": identity_table(full0.model_dir, full1.model_dir, m0),
        "accuracy": {name: r.record["accuracy"]["add"]["bf16"]["accuracy"]
                     for name, r in (("theta0", pre), ("full", full0), ("full_seed1", full1), ("sub", sub), ("rand", rnd))},
        "per_module_density_M0": {r["module"]: r["density"] for r in m0.modules()},
        "overlap_buckets": ov.buckets,
        "seconds": time.monotonic() - t0,
    }
    print(json.dumps({k: v for k, v in result.items() if k != "overlap_buckets"}, indent=1))
    (work / f"result-{args.size}-lr{args.lr:g}-s{args.steps}.json").write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
