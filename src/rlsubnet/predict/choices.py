"""The names a plan and a prediction choose from (no imports: the command line's --help reads them)."""

OPTIMIZERS = ("adamw", "adam", "sgd")
SCHEDULES = ("constant", "linear", "cosine")
STORAGE_DTYPES = ("bf16", "fp16", "fp32")
PREDICTORS = ("budget", "probe", "calibrated")
