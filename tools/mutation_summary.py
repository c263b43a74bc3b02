"""Kill rate per module of the last `make mutate` run, from mutmut's result files under mutants/.

    python tools/mutation_summary.py [NAME_GLOB ...]      # the mutant-name globs `make mutate` ran (default: all)

Counts every mutant whose name matches a glob, by mutmut's own status of its exit code: killed (a test failed,
timed out or crashed), survived (every test passed, or no test reached it), and not run (not yet checked, or
interrupted). Lists the survivors; docs/development.md examines them (`mutmut show NAME` prints the change).
"""

from __future__ import annotations

import fnmatch
import json
import sys
from collections import Counter, defaultdict
from pathlib import Path

from mutmut.stats import status_by_exit_code

KILLED = {"killed", "timeout", "segfault", "caught by type check"}
SURVIVED = {"survived", "no tests", "suspicious"}


def main(globs: list[str]) -> int:
    metas = sorted(Path("mutants").rglob("*.py.meta"))
    if not metas:
        print("no mutmut results under mutants/ (run `make mutate` first)", file=sys.stderr)
        return 1
    by_module: dict[str, Counter] = defaultdict(Counter)
    survivors: list[str] = []
    for meta in metas:
        codes = json.loads(meta.read_text())["exit_code_by_key"]
        for name, code in sorted(codes.items()):
            if globs and not any(fnmatch.fnmatch(name, g) for g in globs):
                continue
            module = name.split(".xǁ")[0].split(".x_")[0]
            status = status_by_exit_code[code]
            kind = "killed" if status in KILLED else "survived" if status in SURVIVED else "not run"
            by_module[module][kind] += 1
            if kind == "survived":
                survivors.append(f"{name} ({status})")
    print(f"{'module':32} {'mutants':>8} {'killed':>7} {'survived':>9} {'not run':>8} {'kill rate':>10}")
    for module, c in sorted(by_module.items()):
        tested = c["killed"] + c["survived"]
        rate = f"{100 * c['killed'] / tested:.1f}%" if tested else "-"
        print(f"{module:32} {sum(c.values()):8} {c['killed']:7} {c['survived']:9} {c['not run']:8} {rate:>10}")
    if survivors:
        print("\nsurvivors (`mutmut show NAME` prints the change):")
        for name in survivors:
            print(f"  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
