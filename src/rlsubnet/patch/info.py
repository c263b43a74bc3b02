"""What a patch holds: sizes, densities, hashes and a per-module breakdown, read from its manifest alone."""

from __future__ import annotations

from typing import Any

from rlsubnet.diff.names import MODULE_KINDS, layer_of, module_kind
from rlsubnet.patch.format import PatchFile


def _record_nbytes(e: dict) -> int:
    return sum(e["record"]["nbytes"]) if e.get("record") else 0


def _group(entries: list[dict], key) -> list[dict]:
    groups: dict = {}
    for e in entries:
        g = groups.setdefault(key(e), {"tensors": 0, "numel": 0, "changed": 0, "patch_nbytes": 0, "full": 0})
        g["tensors"] += 1
        g["numel"] += e["numel"] if e["op"] != "remove" else 0
        g["changed"] += e["changed"]
        g["patch_nbytes"] += _record_nbytes(e)
        g["full"] += e["op"] == "full"
    rows = []
    for k, g in groups.items():
        g["density"] = g["changed"] / g["numel"] if g["numel"] else 0.0
        g["bits_per_changed"] = 8 * g["patch_nbytes"] / g["changed"] if g["changed"] else None
        rows.append({"group": k, **g})
    return rows


def patch_info(patch, *, verify: bool = False, trusted_keys=None) -> dict:
    """A JSON-ready summary of a patch. ``verify`` also checks every record's hash and, on a signed patch, the
    signature against the key that signed it (reads the whole file). ``trusted_keys``: refuse the patch
    unless one of these keys signed it (as ``apply`` would)."""
    p = patch if isinstance(patch, PatchFile) else PatchFile.open(patch)
    sig = p.signature
    signature: dict[str, Any] | None = None
    if sig is not None:
        signature = {"fingerprint": sig.fingerprint, "public_key": sig.public_key.hex(), "valid": None, "trusted": None}
    if trusted_keys is not None:
        p.check_signature(trusted_keys)
        if signature is not None:  # always: check_signature refuses an unsigned patch
            signature.update(valid=True, trusted=True)
    elif verify and sig is not None and signature is not None:
        p.check_signature([sig.public_key])  # is it intact, whoever signed it
        signature["valid"] = True
    if verify:
        p.verify()
    m = p.manifest
    entries = m["tensors"]
    totals = m["totals"]
    target_nbytes = m["target"]["nbytes"]
    order = {k: i for i, k in enumerate(MODULE_KINDS)}
    modules = sorted(_group(entries, lambda e: module_kind(e["name"])), key=lambda r: order.get(r["group"], 99))
    layers = sorted(_group(entries, lambda e: layer_of(e["name"])), key=lambda r: (r["group"] is None, r["group"] or 0))
    files = m.get("files")
    return {
        "path": str(p.path),
        "nbytes": p.nbytes,
        "patch_id": p.manifest_sha256,
        "format_version": m["format_version"],
        "rlsubnet_version": m["rlsubnet_version"],
        "kind": m["kind"],
        "values": m["values"],
        "zstd_level": m["zstd_level"],
        "block_numel": m["block_numel"],
        "hash_scheme": m["hash_scheme"],
        "base": m["base"],
        "target": m["target"],
        "totals": totals,
        "density": totals["compared_changed"] / totals["compared_numel"] if totals["compared_numel"] else None,
        "ratio_to_target": target_nbytes / p.nbytes if p.nbytes else None,
        "bits_per_changed": 8 * p.nbytes / totals["changed"] if totals["changed"] else None,
        "dtypes": _dtype_counts(entries),
        "modules": modules,
        "layers": layers,
        "tensors": [
            {k: e.get(k) for k in ("name", "op", "dtype", "shape", "numel", "changed")}
            | {"patch_nbytes": _record_nbytes(e), "density": e["changed"] / e["numel"] if e["numel"] else 0.0}
            for e in entries
        ],
        "files": files,
        "skipped_files": m.get("skipped_files") or [],
        "metadata": m.get("metadata") or {},
        "signature": signature,
        "verified": verify,
    }


def _dtype_counts(entries: list[dict]) -> dict[str, dict]:
    """Per stored dtype of the target: tensors and parameters (removed tensors have none)."""
    out: dict[str, dict] = {}
    for e in entries:
        if e["op"] == "remove":
            continue
        d = out.setdefault(e["dtype"], {"tensors": 0, "numel": 0})
        d["tensors"] += 1
        d["numel"] += e["numel"]
    return out


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return str(n)


def format_info(info: dict, *, tensors: bool = False, layers: bool = False) -> str:
    from rlsubnet.report.tables import render_table

    t, base, target = info["totals"], info["base"], info["target"]
    lines = [
        f"patch    {info['path']}  {_size(info['nbytes'])}  (format {info['format_version']}, rlsubnet "
        f"{info['rlsubnet_version']}, {info['kind']}, values {info['values']}, zstd level {info['zstd_level']})",
        f"id       {info['patch_id']}",
    ]
    if base:
        lines.append(
            f"base     {base['hash']}  {base['tensors']} tensors, {base['numel']:,} params, "
            f"{_size(base['nbytes'])}  ({base['source']})"
        )
    else:
        lines.append("base     none: a full anchor, applies without a base")
    lines.append(
        f"target   {target['hash']}  {target['tensors']} tensors, {target['numel']:,} params, "
        f"{_size(target['nbytes'])}  ({target['source']})"
    )
    if info["density"] is not None:
        lines.append(
            f"changed  {t['compared_changed']:,} of {t['compared_numel']:,} params: "
            f"density {100 * info['density']:.4f}%, sparsity {100 * (1 - info['density']):.4f}% "
            f"(bitwise, stored dtype); {t['tensors_changed']} tensors changed"
        )
    if t["tensors_full"] or t["tensors_removed"]:
        lines.append(f"whole    {t['tensors_full']} tensors stored whole, {t['tensors_removed']} removed")
    if info.get("dtypes"):
        lines.append(
            "dtypes   "
            + ", ".join(f"{k}: {v['tensors']} tensors, {v['numel']:,} params" for k, v in info["dtypes"].items())
        )
    ratio = info["ratio_to_target"]
    bits = info["bits_per_changed"]
    share = (
        f"= 1/{ratio:.1f} of the target's {_size(target['nbytes'])}"
        if ratio
        else "(the target holds 0 bytes of weights)"
    )
    lines.append(
        f"size     {_size(info['nbytes'])} {share}"
        + (f"; {bits:.2f} bits per changed param" if bits else "")
        + f" (positions {_size(t['positions_nbytes'])}, values {_size(t['values_nbytes'])})"
    )
    if info["files"] is not None:
        parts = [f"{f['name']} ({'from base' if f['source'] == 'base' else _size(f['nbytes'])})" for f in info["files"]]
        lines.append("files    " + (", ".join(parts) if parts else "none"))
    for s in info["skipped_files"]:
        lines.append(f"skipped  {s['name']}: {s['reason']}")
    if info["metadata"]:
        lines.append("metadata " + ", ".join(f"{k}={v}" for k, v in info["metadata"].items()))
    sig = info.get("signature")
    if sig is None:
        lines.append("signed   no")
    else:
        state = (
            "signature valid, key trusted"
            if sig["trusted"]
            else "signature valid (no trusted keys given)"
            if sig["valid"]
            else "signature not checked (pass --verify, or --trust KEY.pub)"
        )
        lines.append(f"signed   by Ed25519 key {sig['fingerprint']}: {state}")

    def rows(groups, label):
        return [
            [
                label(g["group"]),
                g["tensors"],
                f"{g['numel']:,}",
                f"{g['changed']:,}",
                f"{100 * g['density']:.4f}",
                _size(g["patch_nbytes"]),
                "-" if g["bits_per_changed"] is None else f"{g['bits_per_changed']:.2f}",
            ]
            for g in groups
        ]

    headers = ["tensors", "params", "changed", "density %", "patch", "bits/changed"]
    lines += ["", render_table(["module", *headers], rows(info["modules"], str))]
    if layers:
        lines += ["", render_table(["layer", *headers], rows(info["layers"], lambda g: "-" if g is None else str(g)))]
    if tensors:
        trows = [
            [
                e["name"],
                e["op"],
                e["dtype"],
                "x".join(map(str, e["shape"])) or "scalar",
                f"{e['changed']:,}",
                f"{100 * e['density']:.4f}",
                _size(e["patch_nbytes"]),
            ]
            for e in info["tensors"]
        ]
        theaders = ["tensor", "op", "dtype", "shape", "changed", "density %", "patch"]
        lines += ["", render_table(theaders, trows, "lllrrrr")]
    if info["verified"]:
        lines += ["", "verified: every record matches its sha256"]
    return "\n".join(lines)
