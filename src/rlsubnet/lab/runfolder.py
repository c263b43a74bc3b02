"""The demo's output folder: it refuses foreign content and other configurations, cleans up after interrupted runs,
locks itself so that two demos cannot write it at once, and says which finished stages may be reused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from rlsubnet._version import __version__
from rlsubnet.errors import RlsubnetError, UsageError
from rlsubnet.fileio import atomic_write_text, output_lock, temporaries_in
from rlsubnet.lab.config import DemoConfig
from rlsubnet.lab.stages import StageResult

OUR_ENTRIES = ("run.json", "stages", "masks", "figures", "report.md", "results.json")


class RunFolder:
    """OUT, used as a context manager: entering checks and locks it and records the configuration in run.json."""

    def __init__(self, out: str | Path, cfg: DemoConfig, fresh: bool):
        self.out = Path(out)
        self.cfg = cfg
        self.fresh = fresh
        self._lock = None

    def __enter__(self):
        out = self.out
        self._acquire_lock()
        try:
            if out.exists() and not out.is_dir():
                raise UsageError(f"--out {out}: exists and is not a folder")
            run_json = out / "run.json"
            if out.is_dir() and any(out.iterdir()) and not run_json.is_file():
                raise UsageError(
                    f"--out {out}: folder is not empty and holds no demo run (no run.json); choose another folder"
                )
            out.mkdir(parents=True, exist_ok=True)
            if run_json.is_file():
                try:
                    previous = json.loads(run_json.read_text())["config"]
                except (ValueError, KeyError) as exc:
                    raise UsageError(f"{run_json}: unreadable ({exc}); rerun with --fresh to start over") from None
                current = self.cfg.to_json()
                if previous != current and not self.fresh:
                    diff = ", ".join(
                        f"{k}: {previous.get(k)!r} -> {current.get(k)!r}"
                        for k in sorted(set(previous) | set(current))
                        if previous.get(k) != current.get(k)
                    )
                    raise UsageError(
                        f"--out {out} holds the results of another configuration ({diff}); "
                        "pass --fresh to replace them or choose another folder"
                    )
            if self.fresh:
                for name in OUR_ENTRIES:
                    p = out / name
                    if p.is_dir():
                        shutil.rmtree(p)
                    elif p.exists():
                        p.unlink()
            self._remove_stale_temporaries()
            record = {"rlsubnet_version": __version__, "config": self.cfg.to_json()}
            atomic_write_text(run_json, json.dumps(record, indent=2) + "\n")
            (out / "stages").mkdir(exist_ok=True)
        except BaseException:
            self._release_lock()
            raise
        return self

    def __exit__(self, *exc):
        self._release_lock()

    def _acquire_lock(self):
        # Not re-entrant: a second demo on the same folder is refused even inside this process.
        lock = output_lock(self.out, reentrant=False)
        lock.__enter__()
        self._lock = lock

    def _release_lock(self):
        if self._lock is not None:
            self._lock.__exit__(None, None, None)
            self._lock = None

    def _remove_stale_temporaries(self):
        # A killed run leaves its temporaries (".NAME.XXXXXXXX.tmp", ".NAME.old-PID") beside the outputs it
        # was writing; everything in these folders is one of the demo's outputs.
        for parent in (self.out, self.out / "stages", self.out / "masks", self.out / "figures"):
            for p in temporaries_in(parent):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)

    def stage_dir(self, name: str) -> Path:
        return self.out / "stages" / name

    def finished(self, name: str, expected_fp: str) -> StageResult | None:
        """Stage ``name``'s result if it finished with the expected fingerprint, None if it must run; a folder made
        with other settings is an error, or removed under ``--fresh``."""
        stage_dir = self.stage_dir(name)
        if not (stage_dir / "stage.json").is_file():
            if stage_dir.exists():
                shutil.rmtree(stage_dir)  # not ours to trust: a stage folder without its record
            return None
        result = StageResult.load(stage_dir)
        if result.fingerprint == expected_fp:
            return result
        if self.fresh:
            shutil.rmtree(stage_dir)
            return None
        raise RlsubnetError(
            f"{stage_dir}: made with other settings or inputs (fingerprint {result.fingerprint}, expected {expected_fp}); "
            "rerun with --fresh"
        )
