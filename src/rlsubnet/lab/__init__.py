"""The lab: tiny language models built offline, synthetic tasks with exact rewards, and TRL training stages.

Needs the ``train`` extra (transformers, trl, datasets, accelerate), imported lazily by each module.

- ``tokenizer``: character-level Hugging Face tokenizer with a real <unk>.
- ``model``: tiny Llama models by size (micro, small ≈ 1M, medium ≈ 4M); bf16 / fp32 checkpoints.
- ``tasks``, ``rewards``: 2-digit addition and subtraction, fixed held-out splits, exact-match reward.
- ``pretrain``: θ0 (SFT from scratch until a validation accuracy target) and θ0's own samples.
- ``stages``: :class:`~rlsubnet.lab.stages.StageSpec` and :func:`~rlsubnet.lab.stages.run_stage`, one TRL trainer
  per stage, with hooks for a masked optimizer and extra callbacks.
- ``measure``, ``pipeline``: the measurements and the whole demo (``rlsubnet demo``).
- ``subnet``: the demo's subnetwork phase: masked re-runs, baselines, identity and overlap tables.
"""
