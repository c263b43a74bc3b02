"""The inputs of ``rlsubnet train --model``, each checked before anything is trained or written: a JSONL dataset
with the columns the trainer needs, a reward function given as ``MODULE:FUNCTION`` and a model folder with its
tokenizer. Every problem is a one-line :class:`~rlsubnet.errors.UsageError` naming the file, line or option."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from rlsubnet.errors import UsageError

# The columns TRL's trainers read, per algorithm (standard, not conversational, format)
COLUMNS = {"grpo": ("prompt",), "dpo": ("prompt", "chosen", "rejected"), "sft": ("prompt", "completion")}
# What GRPOTrainer passes a reward function besides the dataset's other columns (TRL 1.x)
REWARD_ARGUMENTS = ("prompts", "completions", "completion_ids", "trainer_state", "log_extra", "log_metric")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")


def _text_or_messages(value) -> bool:
    return isinstance(value, str) or (isinstance(value, list) and all(isinstance(m, dict) for m in value))


def load_dataset_rows(path: str | Path, algorithm: str) -> tuple[list[dict], dict]:
    """The rows of a JSONL file (one JSON object a line; blank lines skipped) and a record of the file.

    Every row must have the columns ``algorithm``'s trainer reads (:data:`COLUMNS`), each a string (or a list of
    chat messages); the first row that lacks one, or holds something else, is named with its line number.
    """
    path = Path(path)
    need = COLUMNS[algorithm]
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UsageError(f"--dataset {path}: cannot read ({exc.strerror or exc})") from None
    rows: list[dict] = []
    for lineno, raw in enumerate(data.decode("utf-8", errors="replace").splitlines(), 1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw)
        except ValueError as exc:
            raise UsageError(f"--dataset {path}: line {lineno} is not JSON ({exc})") from None
        if not isinstance(row, dict):
            raise UsageError(f"--dataset {path}: line {lineno} is not a JSON object")
        missing = [c for c in need if c not in row]
        if missing:
            raise UsageError(
                f"--dataset {path}: line {lineno} has no {missing[0]!r} column ({algorithm} needs {', '.join(need)})"
            )
        bad = [c for c in need if not _text_or_messages(row[c])]
        if bad:
            raise UsageError(
                f"--dataset {path}: line {lineno}: column {bad[0]!r} is {type(row[bad[0]]).__name__}, "
                "not text (or a list of chat messages)"
            )
        rows.append(row)
    if not rows:
        raise UsageError(f"--dataset {path}: holds no rows")
    columns = sorted(set().union(*(r.keys() for r in rows)))
    record = {
        "path": str(path),
        "sha256": hashlib.sha256(data).hexdigest(),
        "rows": len(rows),
        "columns": columns,
    }
    return rows, record


def _import_module(spec: str, module: str):
    if module.endswith(".py") or os.sep in module:
        path = Path(module)
        if not path.is_file():
            raise UsageError(f"--reward {spec}: no file {path}")
        name = f"_rlsubnet_reward_{hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]}"
        loader = importlib.util.spec_from_file_location(name, path)
        if loader is None or loader.loader is None:
            raise UsageError(f"--reward {spec}: {path} is not a Python module")
        mod = importlib.util.module_from_spec(loader)
        sys.modules[name] = mod
        loader.loader.exec_module(mod)
        return mod
    # like `python -m`: a module in the current folder is found
    added = os.getcwd() not in sys.path and "" not in sys.path
    if added:
        sys.path.insert(0, os.getcwd())
    try:
        return importlib.import_module(module)
    finally:
        if added:
            sys.path.remove(os.getcwd())


def load_reward(spec: str, columns: Sequence[str] = ()) -> Callable:
    """The function ``MODULE:FUNCTION`` names (MODULE: a dotted module name, or a ``.py`` file), checked to take
    what GRPOTrainer passes: ``prompts``, ``completions``, ``completion_ids``, the dataset's other ``columns``,
    ``trainer_state``, ``log_extra`` and ``log_metric``, as keywords (``def f(completions, **kwargs)``)."""
    module, sep, name = spec.rpartition(":")
    if not sep or not module or not name:
        raise UsageError(f"--reward {spec!r}: expected MODULE:FUNCTION (e.g. my_rewards:exact_match)")
    try:
        mod = _import_module(spec, module)
    except UsageError:
        raise
    except Exception as exc:  # any error the user's module raises while importing
        raise UsageError(f"--reward {spec}: cannot import {module} ({type(exc).__name__}: {exc})") from None
    fn = getattr(mod, name, None)
    if fn is None:
        raise UsageError(f"--reward {spec}: {module} has no {name!r}")
    if not callable(fn):
        raise UsageError(f"--reward {spec}: {name!r} is a {type(fn).__name__}, not a function")
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return fn  # a builtin or C function: nothing to check
    params = sig.parameters.values()
    passed = set(REWARD_ARGUMENTS) | (set(columns) - {"prompt", "completion", "completion_ids"})
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)
    named = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    required = [
        p.name
        for p in params
        if p.default is inspect.Parameter.empty
        and p.kind not in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)
    ]
    positional_only = [p.name for p in params if p.kind is inspect.Parameter.POSITIONAL_ONLY]
    unknown = [n for n in required if n not in passed]
    unaccepted = sorted(passed - named) if not takes_any else []
    if positional_only or unknown or unaccepted:
        why = (
            f"it needs {', '.join(unknown or positional_only)}, which TRL does not pass by that name"
            if unknown or positional_only
            else f"it does not accept {', '.join(unaccepted)}"
        )
        raise UsageError(
            f"--reward {spec}: signature {name}{sig} does not fit TRL's reward call ({why}); "
            f"write it as def {name}(completions, **kwargs) returning one float per completion"
        )
    return fn


def check_model_folder(path: str | Path) -> Path:
    """``path`` is a folder with ``config.json``, weights and a tokenizer; which one is missing is the error."""
    path = Path(path)
    if not path.is_dir():
        raise UsageError(f"--model {path}: no such folder")
    if not (path / "config.json").is_file():
        raise UsageError(f"--model {path}: not a Hugging Face model folder (no config.json)")
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        raise UsageError(f"--model {path}: no weights (*.safetensors) in the folder")
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise UsageError(
            f"--model {path}: no tokenizer in the folder (none of {', '.join(TOKENIZER_FILES[:2])}...): "
            "save it beside the model with tokenizer.save_pretrained(DIR)"
        )
    return path


def load_tokenizer_of(path: Path):
    """The folder's tokenizer, offline; a pad token is the end-of-sequence token when it has none (TRL pads)."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:  # transformers raises many kinds for a broken tokenizer folder
        raise UsageError(f"--model {path}: the tokenizer does not load ({type(exc).__name__}: {exc})") from None
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise UsageError(f"--model {path}: the tokenizer has neither a pad nor an end-of-sequence token")
        tok.pad_token = tok.eos_token
    return tok
