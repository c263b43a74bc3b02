"""Speed and memory of `rlsubnet compare` against the read floor and the load-everything approach.

    .venv/bin/python benchmarks/compare_bench.py [--work bench-out] [--layers 32] [--keep]

Generates a sharded bf16 checkpoint pair (Llama naming, hidden 1024, MLP 4096; 32 layers is 1.1 GiB per side)
in which exactly 20% of the entries differ by one bf16 ULP, then runs each measurement in a fresh process:

- read floor: read every tensor of both checkpoints through rlsubnet's reader into one reused 16 MiB buffer,
              no arithmetic;
- compare:    rlsubnet.compare(base, tuned) at the default atols (0, 1e-5);
- load-both:  load both state dicts whole into RAM and compute the paper's isclose sparsity per tensor (what
              a two-script repository does with from_pretrained; safetensors' load_file would memory-map the
              files instead, and file pages do not count as anonymous memory, so the bytes are loaded).

Peak memory is the child's peak RssAnon (anonymous memory: file pages the kernel can drop do not count),
sampled every 2 ms from /proc, less the RssAnon of a bare `import torch` process. Times are the best of
--repeat runs, warm (the pair read once before timing: the floor is a memory copy from the page cache) and
cold (each file's pages dropped with posix_fadvise before each run: the floor is the disk). Memory is also measured for a
model with a quarter of the layers, to show it does not grow with depth. Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

CHILD_PRELUDE = "import json, sys, time, torch\n"

BARE = "pass"

READ_FLOOR = """
import numpy as np
from rlsubnet.checkpoint import open_checkpoint
t0 = time.perf_counter()
buf = np.empty(16 << 20, dtype=np.uint8)  # one reused buffer: the cheapest way to read with rlsubnet's reader
n = 0
for path in sys.argv[1:3]:
    with open_checkpoint(path) as ck:
        for name in ck.names():
            numel, size = ck.infos[name].numel, ck.infos[name].dtype.itemsize
            step = len(buf) // size
            for start in range(0, numel, step):
                n += len(ck.read_flat_into(name, start, min(numel, start + step), buf)) // size
print(json.dumps({"seconds": time.perf_counter() - t0, "numel": n}))
"""

COMPARE = """
import rlsubnet
t0 = time.perf_counter()
r = rlsubnet.compare(sys.argv[1], sys.argv[2], atol=(0.0, 1e-5))
print(json.dumps({"seconds": time.perf_counter() - t0, "changed": r.changed(0.0), "numel": r.numel,
                  "sparsity_1e-5": r.sparsity(1e-5)}))
"""

LOAD_BOTH = """
from pathlib import Path
from safetensors.torch import load
t0 = time.perf_counter()
sds = []
for path in sys.argv[1:3]:
    sd = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        sd.update(load(f.read_bytes()))  # both state dicts in RAM, as from_pretrained leaves them
    sds.append(sd)
base, tuned = sds
changed = 0
for name, b in base.items():
    d = tuned[name].bfloat16() - b.bfloat16()
    changed += (~torch.isclose(d, torch.zeros_like(d), atol=0.0)).sum().item()
print(json.dumps({"seconds": time.perf_counter() - t0, "changed": changed}))
"""


def rss_anon_kib(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def run_child(code: str, *args: str) -> tuple[dict, int]:
    """Run code in a fresh interpreter; return its JSON output and its peak RssAnon in KiB."""
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD_PRELUDE + textwrap.dedent(code), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    peak = 0
    while proc.poll() is None:
        kib = rss_anon_kib(proc.pid)
        if kib:
            peak = max(peak, kib)
        time.sleep(0.002)
    out, err = proc.communicate()
    if proc.returncode:
        raise SystemExit(f"child failed ({proc.returncode}):\n{err}")
    line = out.strip().splitlines()[-1] if out.strip() else "{}"
    return json.loads(line), peak


def drop_cache(*paths: Path) -> None:
    """Evict the checkpoints' pages from the page cache (posix_fadvise DONTNEED), so the next read is cold."""
    for p in paths:
        for f in sorted(p.glob("*.safetensors")):
            fd = os.open(f, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def best_of(repeat: int, code: str, *args: str, cold_paths: tuple[Path, ...] = ()) -> tuple[dict, int]:
    runs = []
    for _ in range(repeat):
        if cold_paths:
            drop_cache(*cold_paths)
        runs.append(run_child(code, *args))
    return min(runs, key=lambda r: r[0].get("seconds", 0))[0], max(r[1] for r in runs)


def make_pair(work: Path, layers: int) -> tuple[Path, Path, int, int]:
    from rlsubnet.checkpoint import open_checkpoint
    from rlsubnet.testing import llama_specs, write_synthetic_pair

    base, tuned = work / f"L{layers}" / "base", work / f"L{layers}" / "tuned"
    specs = llama_specs(layers=layers, hidden=1024, intermediate=4096, vocab=32000)
    stamp = work / f"L{layers}" / "changed.txt"
    if not stamp.exists():
        shutil.rmtree(work / f"L{layers}", ignore_errors=True)
        t0 = time.perf_counter()
        changed = write_synthetic_pair(base, tuned, specs=specs, density=0.2, seed=0, max_shard_bytes=256 << 20)
        stamp.write_text(str(changed))
        print(f"  generated L{layers} pair in {time.perf_counter() - t0:.1f} s")
    changed = int(stamp.read_text())
    with open_checkpoint(base) as ck:
        nbytes = ck.nbytes
    return base, tuned, changed, nbytes


def warm(*paths: Path) -> None:
    for p in paths:
        for f in sorted(p.glob("*.safetensors")):
            with open(f, "rb") as fh:
                while fh.read(64 << 20):
                    pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="bench-out/compare", help="where to write the generated pairs")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--keep", action="store_true", help="keep the generated checkpoints")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)

    _, bare_kib = best_of(3, BARE)
    print(f"bare `import torch` process: RssAnon {bare_kib / 1024:.0f} MiB (subtracted below)")

    results = {}
    for layers in (max(1, args.layers // 4), args.layers):
        base, tuned, changed, nbytes = make_pair(work, layers)
        warm(base, tuned)
        floor, floor_kib = best_of(args.repeat, READ_FLOOR, str(base), str(tuned))
        comp, comp_kib = best_of(args.repeat, COMPARE, str(base), str(tuned))
        assert comp["changed"] == changed, (comp, changed)  # the benchmark measures a correct run
        cold_floor, _ = best_of(args.repeat, READ_FLOOR, str(base), str(tuned), cold_paths=(base, tuned))
        cold_comp, _ = best_of(args.repeat, COMPARE, str(base), str(tuned), cold_paths=(base, tuned))
        warm(base, tuned)
        row = {
            "layers": layers,
            "bytes_per_side": nbytes,
            "read_floor_s": floor["seconds"],
            "compare_s": comp["seconds"],
            "ratio": comp["seconds"] / floor["seconds"],
            "cold_read_floor_s": cold_floor["seconds"],
            "cold_compare_s": cold_comp["seconds"],
            "cold_ratio": cold_comp["seconds"] / cold_floor["seconds"],
            "compare_peak_mib": (comp_kib - bare_kib) / 1024,
            "read_floor_peak_mib": (floor_kib - bare_kib) / 1024,
        }
        if layers == args.layers:
            load, load_kib = best_of(1, LOAD_BOTH, str(base), str(tuned))
            assert load["changed"] == changed
            row["load_both_s"] = load["seconds"]
            row["load_both_peak_mib"] = (load_kib - bare_kib) / 1024
        results[layers] = row
        print(
            f"{layers:3d} layers, {nbytes / 2**30:.2f} GiB per side: warm: read floor {row['read_floor_s']:.2f} s, "
            f"compare {row['compare_s']:.2f} s (ratio {row['ratio']:.2f}x); cold: read floor "
            f"{row['cold_read_floor_s']:.2f} s, compare {row['cold_compare_s']:.2f} s (ratio {row['cold_ratio']:.2f}x); "
            f"compare peak {row['compare_peak_mib']:.0f} MiB"
            + (
                f", load-both {row['load_both_s']:.2f} s / peak {row['load_both_peak_mib']:.0f} MiB "
                f"(compare uses 1/{row['load_both_peak_mib'] / max(row['compare_peak_mib'], 1):.0f})"
                if "load_both_s" in row
                else ""
            )
        )
    print(json.dumps(results, indent=2))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
