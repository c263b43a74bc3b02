"""Kill rate per module of the last `make mutate` run, from mutmut's result files under mutants/.

    python tools/mutation_summary.py [NAME_GLOB ...]      # the mutant-name globs `make mutate` ran (default: all)

Counts every mutant whose name matches a glob: killed (a test failed, or it timed out), survived, and not run
(no test reached it, or the run was cut short). Lists the survivors, which docs/development.md examines.
"""

from __future__ import annotations

import fnmatch
import json
import sys
from collections import Counter, defaultdict
from pathlib import Path

KILLED = {1, 3, 36, -24, 24, 152, 255}  # mutmut's exit codes for "killed" and "timeout"
SURVIVED = {0}


def main(globs: list[str]) -> int:
    root = Path("mutants")
    metas = sorted(root.rglob("*.py.meta"))
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
            module = name.split(".x")[0].split(".xǁ")[0]
            status = "killed" if code in KILLED else "survived" if code in SURVIVED else "not run"
            by_module[module][status] += 1
            if status == "survived":
                survivors.append(name)
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
