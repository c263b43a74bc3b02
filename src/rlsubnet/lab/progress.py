"""Per-stage progress display on stderr: one bar per stage, and one summary line when it ends."""

from __future__ import annotations

import sys
import time


class StageProgress:
    """A tqdm bar for one stage, showing the metric that tells whether training works (reward, loss, accuracy)."""

    METRICS = ("reward", "loss", "val_acc")

    def __init__(self, label: str, total: int | None, enabled: bool = True):
        self.label = label
        self.enabled = enabled
        self.start = time.monotonic()
        self.bar = None
        if enabled:
            from tqdm import tqdm

            tty = sys.stderr.isatty()
            self.bar = tqdm(
                total=total,
                desc=f"  {label}",
                unit="step",
                file=sys.stderr,
                leave=False,
                dynamic_ncols=True,
                # Without a terminal every refresh is a new line in a log: refresh rarely.
                mininterval=0.5 if tty else 15.0,
                bar_format="{desc}: {n_fmt}/{total_fmt} steps |{bar:20}| {elapsed}<{remaining} {postfix}",
            )

    def update(self, step: int, logs: dict | None = None) -> None:
        if self.bar is None:
            return
        self.bar.update(step - self.bar.n)
        if logs:
            shown = {k: f"{logs[k]:.4g}" for k in self.METRICS if isinstance(logs.get(k), (int, float))}
            if shown:
                self.bar.set_postfix(shown, refresh=False)

    def set_total(self, total: int) -> None:
        if self.bar is not None:
            self.bar.total = total
            self.bar.refresh()

    def close(self) -> float:
        if self.bar is not None:
            self.bar.close()
        return time.monotonic() - self.start


def say(msg: str, enabled: bool = True) -> None:
    if enabled:
        print(msg, file=sys.stderr, flush=True)
