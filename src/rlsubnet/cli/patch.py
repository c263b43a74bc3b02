"""``rlsubnet patch create|apply|info``: lossless sparse patches between checkpoints.

rlsubnet patch create base/ grpo/ -o grpo.rlpatch
rlsubnet patch apply base/ grpo.rlpatch -o grpo-rebuilt/
rlsubnet patch apply base/ step-10.rlpatch step-20.rlpatch -o step-20/    # a chain, in order
rlsubnet patch apply anchor.rlpatch step-30.rlpatch -o step-30/          # a chain from a full anchor
rlsubnet patch info grpo.rlpatch --verify
rlsubnet patch keygen -o trainer.key                                   # trainer.key (0600) + trainer.key.pub
rlsubnet patch create base/ grpo/ -o grpo.rlpatch --sign trainer.key
rlsubnet patch apply base/ grpo.rlpatch -o out/ --trust trainer.key.pub
"""

from __future__ import annotations

import argparse
import sys

from rlsubnet.cli.common import Number, add_checkpoint_options, add_output_options, loading_options, print_json
from rlsubnet.errors import UsageError


def add_parser(sub) -> None:
    p = sub.add_parser(
        "patch",
        help="make, apply and inspect lossless sparse patches (ship only the parameters that changed)",
        description="A patch holds, per tensor, the positions whose bits differ and their new values, "
        "zstd-compressed, with content hashes of the base and the target. Applying it rebuilds the target "
        "bit for bit; a wrong base, a chain out of order or a damaged patch is refused and nothing is written. "
        "Patches can be signed (keygen, create --sign) and required to be signed (apply --trust).",
    )
    psub = p.add_subparsers(dest="patch_command", metavar="ACTION")

    c = psub.add_parser(
        "create",
        help="write a patch that turns BASE into TUNED",
        description="Write a patch that turns BASE into TUNED, streaming one tensor at a time. Entries whose "
        "bits differ in the stored dtype are recorded (so -0/+0 and NaN payloads count). With BASE 'none', "
        "write a full anchor of TUNED that applies without a base.",
    )
    c.add_argument("base", help="base checkpoint (folder, .safetensors, or hub id in the local cache), or 'none'")
    c.add_argument("tuned", help="the checkpoint the patch rebuilds")
    c.add_argument("-o", "--out", required=True, metavar="PATCH", help="patch file to write (e.g. grpo.rlpatch)")
    c.add_argument(
        "--values",
        choices=["xor", "absolute"],
        default="xor",
        help="store each changed entry as new bits XOR old bits (default; smallest for RL's ULP-sized changes) "
        "or as the new bits themselves; both rebuild the target exactly, with no float arithmetic",
    )
    c.add_argument(
        "--level",
        type=Number("--level", int, 1, 22),
        default=1,
        help="zstd level, 1-22 (default: %(default)s; on position and XOR-value streams level 1 measured both "
        "smaller and faster than higher levels)",
    )
    c.add_argument(
        "--allow-mismatch",
        action="store_true",
        help="BASE and TUNED may hold different tensors: record removed ones, store new or re-shaped ones whole",
    )
    c.add_argument("--no-files", action="store_true", help="leave out TUNED's non-weight files (config, tokenizer...)")
    c.add_argument("--meta", action="append", default=[], metavar="KEY=VALUE", help="metadata to record (repeatable)")
    c.add_argument("--overwrite", action="store_true", help="replace PATCH if it exists")
    c.add_argument(
        "--sign", metavar="KEY", help="sign the patch with this Ed25519 private key (see `rlsubnet patch keygen`)"
    )
    add_checkpoint_options(c)
    add_output_options(c, "print the patch summary as JSON")
    c.set_defaults(run=run_create)

    a = psub.add_parser(
        "apply",
        usage="rlsubnet patch apply [BASE] PATCH [PATCH ...] -o OUT [options]",
        help="rebuild a checkpoint from BASE and one or more patches",
        description="Rebuild the target of PATCH (or of a chain of patches, in order) from BASE, in BASE's shard "
        "layout, in one pass that checks every base tensor's hash as it is read and every output tensor's "
        "hash as it is written; OUT appears only when every tensor checks out. When the first patch is a full "
        "anchor, give no BASE.",
    )
    a.add_argument(
        "inputs",
        nargs="+",
        metavar="INPUT",
        help="the base checkpoint, then the patches in chain order (no base when the first is an anchor)",
    )
    a.add_argument(
        "-o", "--out", required=True, metavar="OUT", help="output folder (or a .safetensors file for one shard)"
    )
    a.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    a.add_argument(
        "--verify-base-first",
        action="store_true",
        help="hash the whole base before writing anything, even to the temporary output (one more read of the "
        "base); by default each base tensor's hash is checked as it streams, and OUT appears only if all match",
    )
    a.add_argument("--weights-only", action="store_true", help="write only the weights, not config/tokenizer files")
    a.add_argument(*TRUST_ARGS, **TRUST_OPTS)
    add_checkpoint_options(a)
    add_output_options(a, "print the result as JSON")
    a.set_defaults(run=run_apply)

    i = psub.add_parser("info", help="sizes, densities, hashes and a per-module breakdown of a patch")
    i.add_argument("patch", help="patch file")
    i.add_argument("--verify", action="store_true", help="also check every record's hash (reads the whole patch)")
    i.add_argument("--tensors", action="store_true", help="also list every tensor")
    i.add_argument("--layers", action="store_true", help="also break down by layer")
    i.add_argument("--json", action="store_true", help="print everything as JSON")
    i.add_argument(*TRUST_ARGS, **TRUST_OPTS)
    i.set_defaults(run=run_info)

    k = psub.add_parser(
        "keygen",
        help="make an Ed25519 key pair for signing patches",
        description="Write a new Ed25519 private key to KEY (PEM, readable by you only: mode 0600) and its public "
        "key to KEY.pub. Sign patches with `patch create --sign KEY`; give KEY.pub to whoever applies them "
        "(`patch apply --trust KEY.pub`). Keep KEY secret: whoever holds it can sign patches that pass.",
    )
    k.add_argument("-o", "--out", required=True, metavar="KEY", help="private key file to write (KEY.pub beside it)")
    k.add_argument("--overwrite", action="store_true", help="replace KEY and KEY.pub if they exist")
    k.set_defaults(run=run_keygen)

    p.set_defaults(run=lambda args: _usage(p))


TRUST_ARGS = ("--trust",)
TRUST_OPTS = dict(
    nargs="+",
    action="extend",
    metavar="PUBKEY",
    help="require every patch to be signed by one of these Ed25519 public keys (KEY.pub files; repeatable); "
    "an unsigned patch, or one signed by another key, is refused before anything is written",
)


def _usage(p: argparse.ArgumentParser) -> int:
    p.print_help(sys.stderr)
    return 2


def _meta(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--meta {item!r}: expected KEY=VALUE")
        out[key] = value
    return out


def run_create(args: argparse.Namespace) -> int:
    from rlsubnet.patch.encode import create_patch
    from rlsubnet.patch.info import format_info, patch_info

    if not 1 <= args.level <= 22:
        raise UsageError(f"--level must be 1-22, got {args.level}")
    base = None if args.base.lower() == "none" else args.base
    summary = create_patch(
        base,
        args.tuned,
        args.out,
        values=args.values,
        level=args.level,
        allow_mismatch=args.allow_mismatch,
        include_files=not args.no_files,
        metadata=_meta(args.meta),
        overwrite=args.overwrite,
        **loading_options(args),
        sign_key=args.sign,
    )
    info = patch_info(summary.path)
    if args.json:
        print_json(info | {"seconds": summary.seconds})
    else:
        print(format_info(info))
        print(f"\nwrote {summary.path} in {summary.seconds:.2f} s")
    return 0


def run_apply(args: argparse.Namespace) -> int:
    from rlsubnet.patch.apply import apply_patches
    from rlsubnet.patch.format import PatchFile, is_patch_file
    from rlsubnet.patch.signing import trusted_keys

    keys = trusted_keys(args.trust)  # a bad key file fails before any patch or checkpoint is read
    inputs = list(args.inputs)
    if is_patch_file(inputs[0]):
        base = None
        if PatchFile.open(inputs[0]).kind != "anchor":
            raise UsageError(f"{inputs[0]} is a delta patch: give the base checkpoint before it")
    else:
        base = inputs.pop(0)
    if not inputs:
        raise UsageError("give at least one patch after the base")
    for path in inputs:
        if not is_patch_file(path):
            raise UsageError(f"{path}: not an rlsubnet patch (only the first input may be a checkpoint)")
    summary = apply_patches(
        base,
        inputs,
        args.out,
        overwrite=args.overwrite,
        verify_base_first=args.verify_base_first,
        include_files=not args.weights_only,
        **loading_options(args),
        trusted_keys=keys,
    )
    if args.json:
        print_json(
            {
                "out": str(summary.out),
                "target_hash": summary.target_hash,
                "tensors": summary.tensors,
                "nbytes": summary.nbytes,
                "files": summary.files,
                "seconds": summary.seconds,
            }
        )
    else:
        files = f" and {len(summary.files)} other files" if summary.files else ""
        signed = f", {len(inputs)} patch signature(s) checked" if keys is not None else ""
        print(
            f"wrote {summary.out}: {summary.tensors} tensors ({summary.nbytes:,} bytes){files}, target hash "
            f"{summary.target_hash} verified{signed}, in {summary.seconds:.2f} s"
        )
    return 0


def run_info(args: argparse.Namespace) -> int:
    from rlsubnet.patch.info import format_info, patch_info

    info = patch_info(args.patch, verify=args.verify, trusted_keys=args.trust)
    if args.json:
        print_json(info)
    else:
        print(format_info(info, tensors=args.tensors, layers=args.layers))
    return 0


def run_keygen(args: argparse.Namespace) -> int:
    from rlsubnet.patch.signing import generate_key

    private, public, fp = generate_key(args.out, overwrite=args.overwrite)
    print(f"wrote {private} (private key, mode 0600: keep it secret) and {public} (public key)")
    print(f"key fingerprint {fp}")
    print(f"sign:   rlsubnet patch create BASE TUNED -o P.rlpatch --sign {private}")
    print(f"verify: rlsubnet patch apply BASE P.rlpatch -o OUT --trust {public}")
    return 0
