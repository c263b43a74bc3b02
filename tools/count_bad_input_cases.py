"""Count the bad-input cases the test suite covers (a figure for docs/development.md, not a test).

    PYTHONPATH=src python tools/count_bad_input_cases.py

A test function is a bad-input test when its body checks a refusal: ``pytest.raises(...)``, the reliability
fixture ``expect_error``, a CLI exit status compared with 2, or a ``try``/``except`` of an rlsubnet error (the
fuzz tests' "refused in one line, or read correctly"). Each such function counts once per collected test item
(``pytest --collect-only``, so every parametrization is one case). The fuzz tests' generated inputs are counted
separately: their ``@examples(n)`` bounds, summed over the fuzz tests that feed damaged or out-of-range input.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

REFUSAL_EXCEPTIONS = {"RlsubnetError", "Exception"}


def _is_refusal_check(node: ast.AST) -> bool:
    if isinstance(node, ast.Call):
        f = node.func
        name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
        if name in ("raises", "expect_error"):
            return True
    if isinstance(node, ast.Compare) and any(
        isinstance(c, ast.Constant) and c.value == 2 for c in node.comparators
    ):
        left = node.left
        if isinstance(left, ast.Call) and getattr(left.func, "id", getattr(left.func, "attr", "")) in ("main", "cli"):
            return True
    if isinstance(node, ast.ExceptHandler) and node.type is not None:
        names = [n.id for n in ast.walk(node.type) if isinstance(n, ast.Name)]
        if REFUSAL_EXCEPTIONS & set(names) or any(n.endswith("Error") for n in names):
            return True
    return False


def bad_input_tests(root: Path) -> tuple[set[tuple[str, str]], dict[tuple[str, str], int]]:
    """{(file, test name)} of bad-input tests, and {(file, fuzz test name): examples} of the fuzz tests."""
    found: set[tuple[str, str]] = set()
    fuzz: dict[tuple[str, str], int] = {}
    for path in sorted(root.rglob("test_*.py")):
        tree = ast.parse(path.read_text())
        rel = str(path.relative_to(root.parent))
        for fn in ast.walk(tree):
            if not isinstance(fn, ast.FunctionDef) or not fn.name.startswith("test_"):
                continue
            if any(_is_refusal_check(n) for n in ast.walk(fn)):
                found.add((rel, fn.name))
                for d in fn.decorator_list:
                    if isinstance(d, ast.Call) and getattr(d.func, "id", "") == "examples":
                        fuzz[(rel, fn.name)] = int(ast.literal_eval(d.args[0]))
    return found, fuzz


def main() -> int:
    root = Path("tests")
    found, fuzz = bad_input_tests(root)
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", str(root)],
        capture_output=True,
        text=True,
    ).stdout
    items = Counter()
    for line in out.splitlines():
        m = re.match(r"^(tests/[^:]+)::(\w+)", line)
        if m and (m.group(1), m.group(2)) in found:
            items[m.group(1).split("/")[1]] += 1
    print(f"bad-input test functions: {len(found)}; collected cases (with parametrizations): {sum(items.values())}")
    for folder, n in sorted(items.items()):
        print(f"  tests/{folder}: {n}")
    print(f"fuzz tests feeding bad input: {len(fuzz)}; generated inputs per run: {sum(fuzz.values())}")
    for (f, name), n in sorted(fuzz.items()):
        print(f"  {f}::{name}: {n}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
