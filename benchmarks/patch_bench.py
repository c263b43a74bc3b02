"""Patch size and speed on generated 1 GiB bf16 pairs and on the demo's RL checkpoints.

    .venv/bin/python benchmarks/patch_bench.py                       # 1%, 5%, 30%; one-bit flips and ULP moves
    .venv/bin/python benchmarks/patch_bench.py --gib 0.25 --densities 0.01 --kinds flip
    .venv/bin/python benchmarks/patch_bench.py --demo-only           # only runs/demo (after `make demo`)

For each pair it prints the patch size (default settings: XOR values, zstd level 1) against the bf16
checkpoint, against zstd of the tuned checkpoint's tensor bytes and against zstd of the bitwise XOR of the two
(each at levels 1 and 3, the smaller counted), and the time to create
and to apply the patch (default: one pass; also with ``verify_base_first``) against the time to read both
checkpoints (rlsubnet's reader into one reused buffer), with the page cache cold (each file's pages dropped
with posix_fadvise) and warm, wall-clock and CPU seconds (all threads of this process), and whether the
speed goal (each within 3x the cold read) is met. Generated pairs are Llama-shaped (hidden 2048, MLP 5632,
N(0, 0.02) weights, unit norms), written in 256 MiB shards:

  flip  the lowest mantissa bit of a random ``density`` share of entries flips (rlsubnet.testing): every
        changed entry moves one ULP and its XOR word is always 1, the easiest case for XOR coding;
  ulp   each changed entry moves by ±1 ULP (70%), ±2 (20%) or ±3 (10%), random sign: closer to what an Adam
        step at RL learning rates does to bf16 weights.

Timings are wall-clock on whatever machine runs this, with whatever else it runs: report them with the load.
Results also go to bench-out/patch_bench.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import zstandard

from rlsubnet.checkpoint import SafetensorsWriter, open_checkpoint
from rlsubnet.checkpoint.writer import plan_shards, shard_file_names, write_checkpoint
from rlsubnet.patch import apply_patches, create_patch
from rlsubnet.testing import base_tensor, changed_positions, llama_specs

READ_BLOCK = 16 << 20
GOAL = 3.0  # the speed goal: create and apply each within 3x the time to read both checkpoints


def specs_for(gib: float):
    """Llama-shaped bf16 specs of about ``gib`` GiB (hidden 2048, MLP 5632)."""
    layers = max(1, round(8 * gib))
    vocab = max(1000, int(32000 * gib))
    return llama_specs(layers, 2048, 5632, vocab)


def tuned_tensor(name, dtype, shape, density, kind, seed=0):
    t = base_tensor(name, dtype, shape, seed).reshape(-1).clone()
    pos = changed_positions(name, t.numel(), density, seed)
    words = t.view(torch.int16)
    if kind == "flip":
        words[pos] ^= 1
    else:
        g = torch.Generator().manual_seed(len(name) * 7919 + int(density * 1e6))
        u = torch.rand(len(pos), generator=g)
        step = torch.where(u < 0.7, 1, torch.where(u < 0.9, 2, 3)).to(torch.int16)
        sign = torch.where(torch.rand(len(pos), generator=g) < 0.5, -1, 1).to(torch.int16)
        words[pos] += step * sign
    return t.reshape(shape)


def write_pair(root: Path, gib: float, density: float, kind: str, shard_bytes: int) -> tuple[Path, Path]:
    specs = specs_for(gib)
    shards = plan_shards(specs, shard_bytes)
    layout = list(zip(shard_file_names(len(shards)), shards))
    lookup = {n: (d, s) for n, d, s in specs}
    base = root / "base"
    if not base.exists():
        write_checkpoint(base, layout, lambda n: base_tensor(n, *lookup[n]))
    tuned = root / f"tuned-{kind}-{density:g}"
    if not tuned.exists():
        write_checkpoint(tuned, layout, lambda n: tuned_tensor(n, *lookup[n], density, kind))
    return base, tuned


def files_of(path: Path) -> list[Path]:
    return sorted(p for p in Path(path).rglob("*") if p.is_file()) if Path(path).is_dir() else [Path(path)]


def drop_cache(*paths: Path) -> None:
    for path in paths:
        for f in files_of(path):
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def read_all(*paths: Path) -> float:
    """Read every tensor of each checkpoint once, block by block, into one reused buffer: the fastest way
    rlsubnet's reader reads (no fresh memory per block), so the baseline is not inflated."""
    t0 = time.perf_counter()
    buf = np.empty(READ_BLOCK, dtype=np.uint8)
    for path in paths:
        ck = open_checkpoint(path)
        for name in ck.names():
            info = ck.infos[name]
            step = max(1, READ_BLOCK // info.dtype.itemsize)
            for start in range(0, info.numel, step):
                ck.read_flat_into(name, start, min(info.numel, start + step), buf)
        ck.close()
    return time.perf_counter() - t0


def zstd_sizes(base: Path, tuned: Path, levels=(1, 3)) -> dict:
    """zstd of the tuned tensor bytes and of base XOR tuned, at each level, streamed as one frame each."""
    b, t = open_checkpoint(base), open_checkpoint(tuned)
    comp = {(what, lv): zstandard.ZstdCompressor(level=lv).compressobj() for what in ("tuned", "xor") for lv in levels}
    size = dict.fromkeys(comp, 0)
    for name in t.names():
        info = t.infos[name]
        step = max(1, READ_BLOCK // info.dtype.itemsize)
        for start in range(0, info.numel, step):
            stop = min(info.numel, start + step)
            tb = t.read_flat(name, start, stop).view(torch.uint8).numpy()
            bb = b.read_flat(name, start, stop).view(torch.uint8).numpy()
            data = {"tuned": tb.tobytes(), "xor": (tb ^ bb).tobytes()}
            for key, c in comp.items():
                size[key] += len(c.compress(data[key[0]]))
    for key, c in comp.items():
        size[key] += len(c.flush())
    return {f"zstd{lv}_{what}": size[(what, lv)] for what, lv in comp}


def tensor_bytes(path: Path) -> int:
    return open_checkpoint(path).nbytes


def rewrite_time(src: Path, dst: Path) -> float:
    """Seconds to read a checkpoint and write it again, block by block, with fsync: what any tool that
    rebuilds a checkpoint in Python pays in I/O before doing anything else (apply's floor)."""
    shutil.rmtree(dst, ignore_errors=True)
    ck = open_checkpoint(src)
    t0 = time.perf_counter()
    groups: dict = {}
    for info in ck.infos.values():
        groups.setdefault(info.file, []).append((info.name, info.dtype, info.shape))
    for file, specs in groups.items():
        with SafetensorsWriter(dst / file.name, specs) as w:
            for name, _, _ in specs:
                info = ck.infos[name]
                step = max(1, READ_BLOCK // info.dtype.itemsize)
                for start in range(0, info.numel, step):
                    w.write_part(ck.read_flat(name, start, min(info.numel, start + step)))
                w.end_tensor(name)
    dt = time.perf_counter() - t0
    ck.close()
    shutil.rmtree(dst, ignore_errors=True)
    return dt


def measure(label: str, base: Path, tuned: Path, work: Path, *, timings: bool = True, reps: int = 3) -> dict:
    """Sizes once; timings ``reps`` times per cache state, the median reported (all runs kept in the JSON)."""
    patch = work / f"{label}.rlpatch"
    out = work / f"{label}-out"
    row: dict = {"pair": label, "base": str(base), "tuned": str(tuned), "ckpt_nbytes": tensor_bytes(tuned)}
    z = zstd_sizes(base, tuned)
    row.update(z)
    row["zstd_tuned"] = min(v for k, v in z.items() if k.endswith("_tuned"))  # the better level, to be fair
    row["zstd_xor"] = min(v for k, v in z.items() if k.endswith("_xor"))
    patch.unlink(missing_ok=True)
    s = create_patch(base, tuned, patch, values="absolute")
    row["patch_absolute_nbytes"] = s.nbytes
    patch.unlink()
    s = create_patch(base, tuned, patch)
    m = s.manifest
    row.update(
        patch_nbytes=s.nbytes,
        positions_nbytes=m["totals"]["positions_nbytes"],
        values_nbytes=m["totals"]["values_nbytes"],
        changed=m["totals"]["changed"],
        numel=m["totals"]["numel"],
        density=m["totals"]["compared_changed"] / max(1, m["totals"]["compared_numel"]),
    )
    if not timings:  # still check the round trip
        shutil.rmtree(out, ignore_errors=True)
        res = apply_patches(base, [patch], out)
        assert res.target_hash == m["target"]["hash"]
        shutil.rmtree(out, ignore_errors=True)
        return row
    runs: dict[str, list[float]] = {}

    def timed(key: str, fn):
        """Wall seconds, and CPU seconds of this process (all its threads): the CPU figure barely moves
        with the machine's load, the wall figure does."""
        c0, t0 = time.process_time(), time.perf_counter()
        result = fn()
        runs.setdefault(key, []).append(time.perf_counter() - t0)
        runs.setdefault(key.replace("_s_", "_cpu_s_"), []).append(time.process_time() - c0)
        return result

    row["load_before"] = os.getloadavg()
    for rep in range(reps):
        for cache in ("cold", "warm"):
            if cache == "cold":
                drop_cache(base, tuned)
            timed(f"read_s_{cache}", lambda: read_all(base, tuned))
            if cache == "cold":
                drop_cache(base, tuned)
            patch.unlink(missing_ok=True)
            timed(f"create_s_{cache}", lambda: create_patch(base, tuned, patch))
            shutil.rmtree(out, ignore_errors=True)
            if cache == "cold":
                drop_cache(base)
            res = timed(f"apply_s_{cache}", lambda: apply_patches(base, [patch], out))
            assert res.target_hash == m["target"]["hash"]
            shutil.rmtree(out, ignore_errors=True)
            if cache == "cold":
                drop_cache(base)
            timed(f"apply_first_s_{cache}", lambda: apply_patches(base, [patch], out, verify_base_first=True))
            shutil.rmtree(out, ignore_errors=True)
        timed("rewrite_s_warm", lambda: rewrite_time(tuned, work / "rewrite"))
    row["load_after"] = os.getloadavg()
    row["runs"] = runs
    row.update({k: float(np.median(v)) for k, v in runs.items()})
    return row


def find_demo(root: Path) -> tuple[Path | None, list[tuple[str, Path]]]:
    """θ0 and the finetuned model folders of a demo run (``OUT/stages/<name>/model``, θ0 = the pretrain stage)."""
    base = root / "stages" / "pretrain" / "model"
    if not base.is_dir():
        return None, []
    tuned = []
    for model in sorted((root / "stages").glob("*/model")):
        if model != base and ((model / "model.safetensors").is_file() or (model / "model.safetensors.index.json").is_file()):
            tuned.append((model.parent.name, model))
    return base, tuned


def sync_rows(base: Path, stage: Path, work: Path) -> dict | None:
    """Sizes of the patches between a stage's consecutive bf16 snapshots (θ0 first): what a live sync every
    ``snapshot_every`` steps would send, against sending the whole checkpoint each time."""
    snaps = sorted((stage / "snapshots").glob("step-*.safetensors"))
    if not snaps:
        return None
    chain = [base, *snaps]
    sizes, changed = [], []
    for i, (a, b) in enumerate(zip(chain, chain[1:])):
        p = work / f"sync-{stage.name}-{i}.rlpatch"
        s = create_patch(a, b, p, overwrite=True, include_files=False)
        sizes.append(s.nbytes)
        changed.append(s.manifest["totals"]["compared_changed"] / max(1, s.manifest["totals"]["compared_numel"]))
        p.unlink()
    ck = tensor_bytes(snaps[0])
    return {
        "pair": f"demo-sync:{stage.name}",
        "patches": len(sizes),
        "ckpt_nbytes": ck,
        "patch_nbytes_mean": float(np.mean(sizes)),
        "density_mean": float(np.mean(changed)),
        "traffic_ratio": ck * len(sizes) / sum(sizes),
    }


def fmt_row(r: dict) -> str:
    ck = r["ckpt_nbytes"]
    parts = [
        f"{r['pair']:<22}",
        f"density {100 * r['density']:7.3f}%",
        f"patch {r['patch_nbytes'] / 1e6:9.3f} MB",
        f"1/{ck / r['patch_nbytes']:7.1f} of ckpt",
        f"{r['patch_nbytes'] / r['zstd_tuned']:.4f}x zstd(tuned)",
        f"{r['patch_nbytes'] / r['zstd_xor']:.3f}x zstd(xor)",
        f"{8 * r['patch_nbytes'] / max(1, r['changed']):5.2f} bits/chg",
        f"absolute-values patch {r['patch_absolute_nbytes'] / 1e6:.3f} MB ({r['patch_absolute_nbytes'] / r['zstd_xor']:.3f}x zstd(xor))",
    ]
    if "rewrite_s_warm" in r:
        parts.append(f"read+write+fsync of tuned {r['rewrite_s_warm']:.2f}s")
    for cache in ("cold", "warm"):
        if f"read_s_{cache}" in r:
            rd = r[f"read_s_{cache}"]
            parts.append(
                f"{cache}: read {rd:.2f}s create {r[f'create_s_{cache}']:.2f}s ({r[f'create_s_{cache}'] / rd:.1f}x) "
                f"apply {r[f'apply_s_{cache}']:.2f}s ({r[f'apply_s_{cache}'] / rd:.1f}x) "
                f"[--verify-base-first {r[f'apply_first_s_{cache}']:.2f}s]; CPU s: read "
                f"{r[f'read_cpu_s_{cache}']:.2f} create {r[f'create_cpu_s_{cache}']:.2f} apply {r[f'apply_cpu_s_{cache}']:.2f}"
            )
    if "read_s_cold" in r:
        rd = r["read_s_cold"]
        ok = r["create_s_cold"] <= GOAL * rd and r["apply_s_cold"] <= GOAL * rd
        parts.append(f"goal (create and apply <= {GOAL:g}x the cold read of both): {'met' if ok else 'NOT met'}")
    if "load_before" in r:
        parts.append(f"load {r['load_before'][0]:.1f} -> {r['load_after'][0]:.1f}")
    return "  ".join(parts)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gib", type=float, default=1.0, help="size of each generated checkpoint (default 1 GiB)")
    ap.add_argument("--densities", type=float, nargs="+", default=[0.01, 0.05, 0.30])
    ap.add_argument("--kinds", nargs="+", choices=["flip", "ulp"], default=["flip", "ulp"])
    ap.add_argument("--work", default="bench-out/patch", help="scratch folder (deleted afterwards unless --keep)")
    ap.add_argument("--demo", default="runs/demo", help="where the demo's checkpoints are")
    ap.add_argument("--demo-only", action="store_true")
    ap.add_argument("--no-timings", action="store_true", help="sizes only")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--json", default="bench-out/patch_bench.json")
    args = ap.parse_args(argv)

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    print(f"load average at start: {os.getloadavg()}; {os.cpu_count()} CPUs; torch {torch.__version__}", flush=True)

    demo_base, demo = find_demo(Path(args.demo))
    if not demo:
        print(f"{args.demo}: no demo checkpoints found (no stages/pretrain/model and finetuned stages there yet: "
              "run `make demo`); demo rows skipped", flush=True)
    for label, tuned in demo:
        row = measure(f"demo:{label}", demo_base, tuned, work, timings=not args.no_timings)
        rows.append(row)
        print(fmt_row(row), flush=True)
        sync = sync_rows(demo_base, tuned.parent, work)
        if sync:
            rows.append(sync)
            print(f"{sync['pair']:<22}  {sync['patches']} patches between consecutive snapshots: mean "
                  f"{sync['patch_nbytes_mean'] / 1e3:.1f} KB at density {100 * sync['density_mean']:.2f}%; "
                  f"{sync['traffic_ratio']:.1f}x less traffic than sending the checkpoint each time", flush=True)

    if not args.demo_only:
        for kind in args.kinds:
            for density in args.densities:
                t0 = time.perf_counter()
                base, tuned = write_pair(work / "pairs", args.gib, density, kind, shard_bytes=256 << 20)
                gen = time.perf_counter() - t0
                row = measure(f"{kind}@{density:g}", base, tuned, work, timings=not args.no_timings)
                row["generate_s"] = gen
                rows.append(row)
                print(fmt_row(row), flush=True)
                if not args.keep:
                    shutil.rmtree(tuned)
    print(f"load average at end: {os.getloadavg()}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"load_end": os.getloadavg(), "rows": rows}, indent=1) + "\n")
    print(f"wrote {args.json}")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
