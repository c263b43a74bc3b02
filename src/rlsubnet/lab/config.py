"""The lab's configurations: the model sizes, the demo's (:class:`DemoConfig`, :class:`DemoOptions`) and a
finetuning stage's (:class:`StageSpec`). ``rlsubnet demo`` and ``rlsubnet train`` build their options from these fields (help,
choices, defaults: ``rlsubnet.cli.config_args``), and ``__post_init__`` checks them, naming the option at fault.

Nothing heavy is imported here, so that ``--help`` stays instant.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from rlsubnet import limits
from rlsubnet.errors import UsageError
from rlsubnet.fileio import safe_member_name
from rlsubnet.lab.tasks import TASKS


@dataclass(frozen=True)
class ModelSize:
    """The shape of a lab model (:func:`rlsubnet.lab.model.build_model`)."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int = 64


SIZES: dict[str, ModelSize] = {
    "micro": ModelSize(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64),
    "small": ModelSize(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=512),
    "medium": ModelSize(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024),
}


def model_size(name: str) -> ModelSize:
    if name not in SIZES:
        raise UsageError(f"unknown --size {name!r} (choose from {', '.join(SIZES)})")
    return SIZES[name]


@dataclass(frozen=True)
class SizedSettings:
    """The demo settings whose defaults depend on the model size (:data:`SIZE_DEFAULTS`); as given here, the
    small model's (the demo's default size)."""

    steps: int = 100
    batch_size: int = 32
    num_generations: int = 8
    snapshot_every: int = 10
    pretrain_max_steps: int = 2000
    pretrain_eval_every: int = 50
    pretrain_target: float = 0.6
    pretrain_lr: float = 2e-3
    pretrain_batch: int = 64
    pretrain_threads: int = 2
    sample_prompts: int = 8000


# Per-size defaults of the demo's training; every one can be overridden from the command line.
SIZE_DEFAULTS: dict[str, SizedSettings] = {
    "micro": SizedSettings(
        steps=4,
        batch_size=8,
        snapshot_every=2,
        pretrain_max_steps=300,
        pretrain_target=0.05,
        pretrain_lr=5e-3,
        pretrain_threads=1,  # a micro model's operations are too small to share between threads
        sample_prompts=512,
    ),
    "small": SizedSettings(),
    # the larger model trains like the small one; only its pretraining runs longer, at a lower learning rate
    "medium": SizedSettings(pretrain_max_steps=3000, pretrain_lr=1e-3),
}

ALGORITHMS = ("grpo", "dpo", "sft")
OPTIMIZERS = ("adamw", "sgd")
# The learning rate of the demo's plain-SGD stages, chosen by a trial on another seed and the validation split
# (docs/demo.md: "Choosing the SGD learning rate"), never on the scored run.
SGD_LR = 3e-4
DATA_SOURCES = {
    "grpo": ("prompts",),
    "dpo": ("own-pairs",),
    "sft": ("gold", "own-correct"),
}
DEFAULT_DATA = {"grpo": "prompts", "dpo": "own-pairs", "sft": "gold"}
DEFAULT_BETA = {"grpo": 0.0, "dpo": 0.1, "sft": 0.0}


def option(cls, name: str) -> str:
    """The command-line option of field ``name`` (``metadata["flag"]`` or ``--field-name``)."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    return f.metadata.get("flag", "--" + name.replace("_", "-"))


def check_choices(obj) -> None:
    """Every field with ``metadata["choices"]`` holds one of them (or None where the field allows it)."""
    for f in dataclasses.fields(obj):
        choices = f.metadata.get("choices")
        values = getattr(obj, f.name)
        for value in values if isinstance(values, (list, tuple)) else [values]:
            if choices and value is not None and value not in choices:
                none = " or none" if "None" in str(f.type) and not isinstance(values, (list, tuple)) else ""
                raise UsageError(
                    f"unknown {option(type(obj), f.name)} {value!r} (choose from {', '.join(choices)}{none})"
                )


def check_at_least(obj, names, low, prefix: str = "") -> None:
    for name in names:
        v = getattr(obj, name)
        if v is not None and v < low:
            raise UsageError(f"{prefix}{option(type(obj), name)} must be at least {low}, got {v}")


def _per_size(name: str) -> str:
    return "per --size: " + ", ".join(f"{s} {getattr(d, name):g}" for s, d in SIZE_DEFAULTS.items())


def _sized(help: str, name: str, group: str = "training") -> dict:
    return {"help": help, "default_help": _per_size(name), "group": group}


TRAINING = "training"
PRETRAINING = "θ0: pretraining and its samples"


@dataclass(frozen=True)
class DemoConfig:
    """The whole run. Two runs with equal configs compute the same numbers (on the same machine and threads)."""

    size: str = field(
        default="small",
        metadata={
            "help": "model size: micro (seconds; the tests), small (~1M parameters), medium (~4M)",
            "choices": tuple(SIZES),
        },
    )
    task: str = field(default="add", metadata={"help": "task of every stage's training set", "choices": tuple(TASKS)})
    second_task: str | None = field(
        default="other",
        metadata={
            "help": "second training set, a different task; 'none' to skip it",
            "choices": tuple(TASKS),
            "metavar": "TASK",
            "default_help": "the other task",
        },
    )
    seed: int = field(default=0, metadata={"help": "seed of every stage"})
    threads: int = field(
        default=1,
        metadata={
            "help": "torch CPU threads; part of the configuration, as the thread count "
            "changes floating-point reduction order, hence the numbers"
        },
    )
    steps: int | None = field(default=None, metadata=_sized("optimizer steps of every finetuning stage", "steps"))
    batch_size: int | None = field(default=None, metadata=_sized("prompts, pairs or examples per step", "batch_size"))
    rl_lr: float = field(
        default=1e-6, metadata={"help": "learning rate of GRPO and DPO (TRL's default)", "group": TRAINING}
    )
    sft_lr: float = field(default=1e-5, metadata={"help": "usual SFT learning rate", "group": TRAINING})
    sgd_lr: float = field(
        default=SGD_LR,
        metadata={"help": "learning rate of the plain-SGD stages grpo-sgd and sft-sgd", "group": TRAINING},
    )
    kl_beta: float = field(default=0.04, metadata={"help": "KL coefficient of grpo-kl", "group": TRAINING})
    dpo_beta: float = field(default=0.1, metadata={"help": "β of the DPO stages", "group": TRAINING})
    clip: float = field(
        default=1.0, metadata={"help": "max gradient norm of every stage but grpo-noclip", "group": TRAINING}
    )
    num_generations: int | None = field(default=None, metadata=_sized("GRPO completions per prompt", "num_generations"))
    snapshot_every: int | None = field(default=None, metadata=_sized("steps between bf16 snapshots", "snapshot_every"))
    samples_per_prompt: int = field(
        default=4,
        metadata={
            "help": "θ0's samples per training prompt (DPO pairs and rejection-sampling FT data)",
            "group": PRETRAINING,
        },
    )
    sample_prompts: int | None = field(
        default=None, metadata=_sized("training prompts θ0 samples", "sample_prompts", PRETRAINING)
    )
    pretrain_target: float | None = field(
        default=None,
        metadata=_sized("validation accuracy (every task) that ends pretraining", "pretrain_target", PRETRAINING),
    )
    pretrain_max_steps: int | None = field(
        default=None, metadata=_sized("pretraining step cap", "pretrain_max_steps", PRETRAINING)
    )
    pretrain_eval_every: int | None = field(
        default=None, metadata=_sized("pretraining steps between validation checks", "pretrain_eval_every", PRETRAINING)
    )
    pretrain_lr: float | None = field(
        default=None, metadata=_sized("pretraining learning rate", "pretrain_lr", PRETRAINING)
    )
    pretrain_batch: int | None = field(
        default=None, metadata=_sized("pretraining batch size", "pretrain_batch", PRETRAINING)
    )
    pretrain_threads: int | None = field(
        default=None,
        metadata=_sized(
            "torch threads of pretraining, which runs alone (everything else waits for θ0); part of the "
            "configuration like --threads",
            "pretrain_threads",
            PRETRAINING,
        ),
    )

    def __post_init__(self):
        if self.second_task == "other":
            object.__setattr__(self, "second_task", next(t for t in TASKS if t != self.task))
        check_choices(self)
        # Finite first: NaN and inf pass no comparison below.
        for name, positive in (
            ("rl_lr", True),
            ("sft_lr", True),
            ("sgd_lr", True),
            ("dpo_beta", True),
            ("pretrain_lr", True),
            ("kl_beta", False),
            ("clip", False),
        ):
            if getattr(self, name) is not None:
                limits.real(getattr(self, name), option(DemoConfig, name), lo_open=positive)
        if self.pretrain_target is not None:
            limits.real(self.pretrain_target, "--pretrain-target", 0.0, 1.0)
        if self.second_task == self.task:
            raise UsageError("--second-task must differ from --task")
        check_at_least(
            self,
            (
                "threads",
                "steps",
                "batch_size",
                "snapshot_every",
                "sample_prompts",
                "pretrain_max_steps",
                "pretrain_eval_every",
                "pretrain_batch",
                "pretrain_threads",
            ),
            1,
        )
        check_at_least(self, ("num_generations", "samples_per_prompt"), 2)  # a GRPO group; a DPO pair
        limits.seed(self.seed, "--seed")
        for name, hi in (
            ("threads", limits.MAX_THREADS),
            ("steps", limits.MAX_STEPS),
            ("batch_size", limits.MAX_BATCH),
            ("num_generations", limits.MAX_GENERATIONS),
            ("snapshot_every", limits.MAX_STEPS),
            ("sample_prompts", limits.MAX_STEPS),
            ("pretrain_max_steps", limits.MAX_STEPS),
            ("pretrain_eval_every", limits.MAX_STEPS),
            ("pretrain_batch", limits.MAX_BATCH),
            ("pretrain_threads", limits.MAX_THREADS),
            ("samples_per_prompt", limits.MAX_GENERATIONS),
        ):
            if getattr(self, name) is not None:
                limits.integer(getattr(self, name), option(DemoConfig, name), 1, hi)
        for name in ("rl_lr", "sft_lr", "sgd_lr", "pretrain_lr"):
            v = getattr(self, name)
            if v is not None and not v > 0:
                raise UsageError(f"{option(DemoConfig, name)} must be positive, got {v}")
        if self.pretrain_target is not None and not 0 <= self.pretrain_target <= 1:
            raise UsageError(f"--pretrain-target must be in [0, 1], got {self.pretrain_target}")
        if self.kl_beta < 0 or not self.dpo_beta > 0 or self.clip < 0:
            raise UsageError("--kl-beta and --clip must be non-negative, --dpo-beta positive")

    def sized(self) -> SizedSettings:
        """The per-size settings: each given value, else the size's default."""
        d = SIZE_DEFAULTS[self.size]
        given = {f.name: getattr(self, f.name) for f in dataclasses.fields(d)}
        return dataclasses.replace(d, **{k: v for k, v in given.items() if v is not None})

    def resolved(self) -> DemoConfig:
        """The config with every per-size default filled in (what run.json records)."""
        return dataclasses.replace(self, **dataclasses.asdict(self.sized()))

    def to_json(self) -> dict:
        return dataclasses.asdict(self.resolved())

    @property
    def tasks(self) -> list[str]:
        return [self.task] + ([self.second_task] if self.second_task else [])


@dataclass(frozen=True)
class DemoOptions:
    """How a demo run is carried out: where it writes, how many stages at once, what it shows. None of it changes a
    number, so none of it is in run.json."""

    out: str = field(default="runs/demo", metadata={"help": "output folder", "metavar": "DIR"})
    jobs: int | None = field(
        default=None,
        metadata={
            "help": "finetuning stages to run at once, each in its own process; never changes a number, only the wall time",
            "aliases": ("-j",),
            "metavar": "N",
            "default_help": "one per CPU core the thread count leaves, at most 4",
        },
    )
    fresh: bool = field(default=False, metadata={"help": "discard the results already in --out and start over"})
    quiet: bool = field(default=False, metadata={"help": "no progress display", "aliases": ("-q",)})

    def __post_init__(self):
        check_at_least(self, ("jobs",), 1)
        if self.jobs is not None:
            limits.integer(self.jobs, "--jobs", 1, limits.MAX_JOBS)


@dataclass(frozen=True)
class StageSpec:
    """Everything that decides what a finetuning stage computes (and so its fingerprint)."""

    name: str = field(metadata={"help": "stage name"})
    algorithm: str = field(metadata={"help": "trainer", "choices": ALGORITHMS, "positional": True})
    task: str = field(
        default="add", metadata={"help": "task whose training split the stage trains on", "choices": tuple(TASKS)}
    )
    data: str | None = field(
        default=None,
        metadata={
            "help": "prompts (GRPO), gold (SFT on reference answers), own-correct (rejection-sampling FT on θ0's correct "
            "samples), own-pairs (DPO on θ0's correct vs incorrect samples)",
            "default_help": ", ".join(f"{d} ({a})" for a, d in DEFAULT_DATA.items()),
        },
    )
    learning_rate: float = field(default=1e-6, metadata={"help": "learning rate", "flag": "--lr", "metavar": "LR"})
    steps: int = field(default=100, metadata={"help": "optimizer steps"})
    batch_size: int = field(default=32, metadata={"help": "prompts (GRPO), pairs (DPO) or examples (SFT) per step"})
    seed: int = field(default=0, metadata={"help": "trainer seed: initial RNG state, GRPO sampling"})
    data_seed: int | None = field(default=None, metadata={"help": "seed of the data order", "default_help": "--seed"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping; 0 disables it"})
    beta: float | None = field(
        default=None,
        metadata={
            "help": "GRPO: KL coefficient (0 = no KL term); DPO: β",
            "default_help": ", ".join(f"{b:g} ({a})" for a, b in DEFAULT_BETA.items() if a != "sft"),
        },
    )
    num_generations: int = field(default=8, metadata={"help": "GRPO completions per prompt"})
    loss_type: str | None = field(
        default=None, metadata={"help": "GRPO: grpo (default); DPO: sigmoid (default)", "cli": False}
    )
    optimizer: str = field(
        default="adamw",
        metadata={
            "help": "adamw (torch AdamW, β 0.9/0.999, ε 1e-8) or sgd (plain SGD: no momentum)",
            "choices": OPTIMIZERS,
        },
    )
    weight_decay: float = field(default=0.0, metadata={"help": "weight decay (masked runs: inside the mask only)"})
    snapshot_every: int = field(default=10, metadata={"help": "steps between bf16 snapshots"})
    description: str = field(default="", metadata={"cli": False})

    def __post_init__(self):
        safe_member_name(self.name, "stage name", UsageError)  # names its folder and mask files
        check_choices(self)
        # The per-algorithm defaults are filled in here, so a spec always records the data and β it trained with.
        if self.data is None:
            object.__setattr__(self, "data", DEFAULT_DATA[self.algorithm])
        if self.beta is None:
            object.__setattr__(self, "beta", DEFAULT_BETA[self.algorithm])
        if self.data not in DATA_SOURCES[self.algorithm]:
            raise UsageError(
                f"stage {self.name}: --data {self.data!r} does not fit {self.algorithm} "
                f"(choose from {', '.join(DATA_SOURCES[self.algorithm])})"
            )
        what = f"stage {self.name}:"
        limits.real(self.learning_rate, f"{what} {option(StageSpec, 'learning_rate')}", lo_open=True)
        for name in ("max_grad_norm", "beta", "weight_decay"):
            limits.real(getattr(self, name), f"{what} {option(StageSpec, name)}")
        check_at_least(self, ("steps", "batch_size", "snapshot_every", "num_generations"), 1, f"stage {self.name}: ")
        if not self.learning_rate > 0:
            raise UsageError(f"stage {self.name}: --lr must be positive, got {self.learning_rate}")
        for name in ("max_grad_norm", "beta", "weight_decay"):
            if getattr(self, name) < 0:
                raise UsageError(f"stage {self.name}: {option(StageSpec, name)} must be non-negative")
        for name, hi in (
            ("steps", limits.MAX_STEPS),
            ("batch_size", limits.MAX_BATCH),
            ("snapshot_every", limits.MAX_STEPS),
        ):
            limits.integer(getattr(self, name), f"{what} {option(StageSpec, name)}", 1, hi)
        limits.integer(self.num_generations, f"{what} --num-generations", 2, limits.MAX_GENERATIONS)  # a GRPO group
        limits.seed(self.seed, f"{what} --seed")
        if self.data_seed is not None:
            limits.seed(self.data_seed, f"{what} --data-seed")

    @property
    def effective_data_seed(self) -> int:
        return self.seed if self.data_seed is None else self.data_seed

    @property
    def resolved_loss_type(self) -> str | None:
        if self.loss_type is not None:
            return self.loss_type
        return {"grpo": "grpo", "dpo": "sigmoid"}.get(self.algorithm)

    @property
    def resolved_beta(self) -> float:
        return DEFAULT_BETA[self.algorithm] if self.beta is None else self.beta

    @property
    def uses_own_samples(self) -> bool:
        return self.data is not None and self.data.startswith("own-")

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["data_seed"] = self.effective_data_seed
        d["loss_type"] = self.resolved_loss_type
        # The default optimizer is left out, so that an AdamW stage keeps the spec record and the fingerprint it had
        # before the optimizer could be chosen (its finished results stay reusable).
        if d["optimizer"] == "adamw":
            del d["optimizer"]
        return d

    def settings_line(self) -> str:
        """The settings a figure or table row states next to the number."""
        parts = [
            f"{self.algorithm.upper()} on {self.task} ({self.data})",
            f"lr {self.learning_rate:g}",
            f"{self.steps} steps",
            f"batch {self.batch_size}",
            f"seed {self.seed}",
        ]
        if self.algorithm == "grpo":
            parts += [f"β {self.beta:g}", f"{self.num_generations} completions/prompt"]
        if self.algorithm == "dpo":
            parts.append(f"β {self.beta:g}")
        if self.optimizer != "adamw":
            parts.append(f"optimizer {self.optimizer}")
        parts.append(f"clip {self.max_grad_norm:g}" if self.max_grad_norm > 0 else "no clipping")
        if self.weight_decay:
            parts.append(f"weight decay {self.weight_decay:g}")
        if self.data_seed is not None and self.data_seed != self.seed:
            parts.append(f"data seed {self.data_seed}")
        return ", ".join(parts)
