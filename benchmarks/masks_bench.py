"""Speed, memory and size of subnetwork masks: `rlsubnet mask` and `rlsubnet overlap` against `compare`.

    .venv/bin/python benchmarks/masks_bench.py [--work bench-out/compare] [--layers 8]

Uses compare_bench's generated pair (Llama naming, hidden 1024, MLP 4096, 20% of entries one bf16 ULP apart;
8 layers is 0.55 GiB per side) and its measurement method: every measurement in a fresh process, peak RssAnon
(anonymous memory, sampled every 2 ms) less a bare ``import torch`` process, warm page cache, best of --repeat.
Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from compare_bench import BARE, best_of, make_pair, run_child, warm  # noqa: E402

COMPARE = """
import rlsubnet
t0 = time.perf_counter()
r = rlsubnet.compare(sys.argv[1], sys.argv[2], atol=(1e-5,))
print(json.dumps({"seconds": time.perf_counter() - t0, "changed": r.changed(1e-5), "numel": r.numel}))
"""

BUILD = """
from rlsubnet.masks import build_mask
t0 = time.perf_counter()
m = build_mask(sys.argv[1], sys.argv[2], atol=1e-5, hash_content=sys.argv[4] == "hash")
t1 = time.perf_counter()
m.save(sys.argv[3])
print(json.dumps({"seconds": t1 - t0, "save_seconds": time.perf_counter() - t1, "changed": m.changed, "numel": m.numel}))
"""

OVERLAP = """
from rlsubnet.masks import Mask, overlap_many
t0 = time.perf_counter()
masks = [Mask.load(p) for p in sys.argv[2:4]]
t1 = time.perf_counter()
base = sys.argv[1] if sys.argv[1] != "-" else None
r = overlap_many(masks, sys.argv[2:4], base=base)
p = r.pairs[0]
print(json.dumps({"seconds": time.perf_counter() - t1, "load_seconds": t1 - t0, "o1": p.o1, "chance_o1": p.chance_o1,
                  "magnitude_chance_o1": p.figures.get("magnitude_chance_o1")}))
"""

RANDOM = """
from rlsubnet.masks import Mask, random_mask
m = Mask.load(sys.argv[1])
t0 = time.perf_counter()
r = random_mask(m, scope=sys.argv[3], seed=0)
t1 = time.perf_counter()
r.save(sys.argv[2])
print(json.dumps({"seconds": t1 - t0, "changed": r.changed}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="bench-out/compare")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    base, tuned, changed, nbytes = make_pair(Path(args.work), args.layers)
    warm(base, tuned)
    _, bare = run_child(BARE)
    out = Path(tempfile.mkdtemp(prefix="masks-bench-"))
    gib = nbytes / 2**30
    print(f"pair: {base.parent} ({gib:.2f} GiB per side, bf16); figures are best of {args.repeat}, memory above a bare torch import")

    rows = []
    r, peak = best_of(args.repeat, COMPARE, str(base), str(tuned))
    numel = r["numel"]
    rows.append(("compare, atol 1e-5", r["seconds"], peak - bare, f"changed {r['changed']:,}"))
    for hashed in ("hash", "nohash"):
        path = out / f"m-{hashed}.safetensors"
        r, peak = best_of(args.repeat, BUILD, str(base), str(tuned), str(path), hashed)
        size = path.stat().st_size
        rows.append((f"mask build ({'with' if hashed == 'hash' else 'without'} content hash)", r["seconds"], peak - bare,
                     f"changed {r['changed']:,}; file {size / 2**20:.1f} MiB = {8 * size / numel:.3f} bits/param; save {r['save_seconds']:.2f} s"))
    mask = out / "m-hash.safetensors"
    for scope in ("per_tensor", "global"):
        rpath = out / f"r-{scope}.safetensors"
        r, peak = best_of(1, RANDOM, str(mask), str(rpath), scope)
        rows.append((f"random mask ({scope})", r["seconds"], peak - bare, f"changed {r['changed']:,}"))
    for b in ("-", str(base)):
        r, peak = best_of(1, OVERLAP, b, str(mask), str(out / "r-per_tensor.safetensors"))
        what = "overlap of 2 masks" + (" + magnitude-matched chance (--base)" if b != "-" else "")
        extra = f"o1 {r['o1']:.4f}, chance {r['chance_o1']:.4f}"
        if r["magnitude_chance_o1"] is not None:
            extra += f", magnitude-matched {r['magnitude_chance_o1']:.4f}"
        rows.append((what, r["seconds"], peak - bare, f"load {r['load_seconds']:.2f} s; {extra}"))

    print(f"{'measurement':58s} {'seconds':>8s} {'GiB/s':>6s} {'peak MiB':>9s}  notes")
    for name, sec, kib, note in rows:
        rate = 2 * gib / sec if name.startswith(("compare", "mask build")) else float("nan")
        print(f"{name:58s} {sec:8.2f} {rate:6.2f} {kib / 1024:9.0f}  {note}")
    print(json.dumps({"numel": numel, "gib_per_side": gib, "rows": rows}))


if __name__ == "__main__":
    main()
