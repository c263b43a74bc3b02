"""Ed25519 signatures: keygen, signing on create, checking on apply / info / in-place apply / live sync.

When trusted keys are given, only a patch signed by one of them, intact since, is applied; everything else
(unsigned, another key, a changed byte anywhere) is refused in one line before anything is written.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path

import pytest
import torch
import zstandard
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from patch.patch_helpers import assert_nothing_left, assert_same_checkpoint, with_manifest_area
from rlsubnet.cli.main import main
from rlsubnet.errors import UsageError
from rlsubnet.patch import PatchError, apply_patch_, apply_patches, create_patch, generate_key
from rlsubnet.patch.format import HEAD, SIG_FRAME, TRAILER, PatchFile
from rlsubnet.patch.signing import KeyFileError, fingerprint, load_private_key, load_public_key, trusted_keys


@pytest.fixture
def keys(tmp_path):
    """Two key pairs made by keygen: (private path, public path) each."""
    out = []
    for name in ("trainer", "stranger"):
        private, public, _ = generate_key(tmp_path / "keys" / name)
        out.append((private, public))
    return out


@pytest.fixture
def signed(bf16_pair, keys, tmp_path):
    b, t = bf16_pair
    (b / "config.json").write_text('{"v": 1}')
    (t / "config.json").write_text('{"v": 2}')
    return b, t, create_patch(b, t, tmp_path / "p.rlpatch", sign_key=keys[0][0]).path


def _raw_public(public_path: Path) -> bytes:
    return load_public_key(public_path).public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


# ------------------------------------------------------------------------------------------------------ keys
def test_keygen_writes_a_private_key_only_its_owner_reads(tmp_path, capsys):
    key = tmp_path / "k" / "trainer.key"
    assert main(["patch", "keygen", "-o", str(key)]) == 0
    out = capsys.readouterr().out
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    pub = Path(str(key) + ".pub")
    assert pub.read_text().startswith("-----BEGIN PUBLIC KEY-----")
    private = load_private_key(key)
    public = load_public_key(pub)
    message = b"rlsubnet"
    public.verify(private.sign(message), message)  # the two files are one pair
    assert f"key fingerprint {fingerprint(public)}" in out
    assert fingerprint(public) == hashlib.sha256(_raw_public(pub)).hexdigest()[:32]
    before = key.read_bytes()
    assert main(["patch", "keygen", "-o", str(key)]) == 2  # never replaces a key silently
    assert "exists" in capsys.readouterr().err and key.read_bytes() == before
    assert main(["patch", "keygen", "-o", str(key), "--overwrite"]) == 0
    assert key.read_bytes() != before and stat.S_IMODE(key.stat().st_mode) == 0o600
    assert not [p.name for p in key.parent.iterdir() if p.name.endswith(".tmp")]


def test_keygen_permissions_do_not_follow_the_umask(tmp_path):
    old = os.umask(0)
    try:
        private, public, _ = generate_key(tmp_path / "k")
    finally:
        os.umask(old)
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert stat.S_IMODE(public.stat().st_mode) == 0o666  # what a plain open() gives under umask 0


def test_key_forms_accepted_and_refused(keys, tmp_path):
    (private, public), (other, _) = keys
    raw = _raw_public(public)
    ssh = tmp_path / "id.pub"
    ssh.write_bytes(load_public_key(public).public_bytes(serialization.Encoding.OpenSSH,
                                                         serialization.PublicFormat.OpenSSH))
    rawfile = tmp_path / "raw.pub"
    rawfile.write_bytes(raw)
    for form in (public, str(public), raw, load_public_key(public), ssh, rawfile, [public, other.with_suffix(".pub")]):
        assert raw in trusted_keys(form).keys, form
    assert trusted_keys(None) is None
    with pytest.raises(UsageError, match="empty"):
        trusted_keys([])
    with pytest.raises(KeyFileError, match="is a private key; trust its public key"):
        trusted_keys(private)
    with pytest.raises(KeyFileError, match="is a public key; signing needs the private key"):
        load_private_key(public)
    with pytest.raises(KeyFileError, match="cannot read the key"):
        trusted_keys(tmp_path / "missing.pub")
    junk = tmp_path / "junk.pub"
    junk.write_text("hello")
    with pytest.raises(KeyFileError, match="not a PEM, OpenSSH or raw 32-byte public key"):
        trusted_keys(junk)
    enc = tmp_path / "enc.key"
    enc.write_bytes(Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.BestAvailableEncryption(b"pw")))
    with pytest.raises(KeyFileError, match="encrypted"):
        load_private_key(enc)
    seed = Ed25519PrivateKey.generate()
    as_bytes = seed.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                  serialization.NoEncryption())
    assert fingerprint(load_private_key(as_bytes).public_key()) == fingerprint(seed.public_key())


# --------------------------------------------------------------------------------------------- sign/verify
def test_signed_patch_round_trip(signed, keys, tmp_path):
    b, t, p = signed
    (private, public), _ = keys
    pf = PatchFile.open(p)
    assert pf.signature is not None and pf.signature.public_key == _raw_public(public)
    assert pf.signature.offset == pf.nbytes - TRAILER.size - SIG_FRAME.size
    pf.check_signature([public])
    s = apply_patches(b, [p], tmp_path / "out", trusted_keys=[public])
    assert_same_checkpoint(t, tmp_path / "out")
    assert s.files == ["config.json"] and (tmp_path / "out" / "config.json").read_text() == '{"v": 2}'
    # The signed bytes and the unsigned patch's bytes are the same but for the signature frame.
    unsigned = create_patch(b, t, tmp_path / "u.rlpatch").path.read_bytes()
    data = p.read_bytes()
    assert data[: pf.signature.offset] == unsigned[: -TRAILER.size]
    assert PatchFile.open(tmp_path / "u.rlpatch").signature is None


def test_signed_patch_applies_without_trusted_keys(signed, tmp_path):
    b, t, p = signed
    apply_patches(b, [p], tmp_path / "out")  # hash checks only, as for any patch
    assert_same_checkpoint(t, tmp_path / "out")


def test_readers_that_predate_signatures_still_read_signed_patches(signed):
    """What format-2 readers did before signatures existed: trailer, then the manifest area's hash, then
    decompress it (zstd stops after the manifest's frame: the signature is a skippable frame after it)."""
    _, _, p = signed
    data = p.read_bytes()
    m_off, m_len, m_hash, end = TRAILER.unpack(data[-TRAILER.size:])
    assert end == b"RLSPEND\0" and m_off + m_len == len(data) - TRAILER.size
    assert hashlib.sha256(data[m_off : m_off + m_len]).digest() == m_hash
    manifest = json.loads(zstandard.ZstdDecompressor().decompress(data[m_off : m_off + m_len], max_output_size=1 << 31))
    assert manifest == PatchFile.open(p).manifest
    assert HEAD.unpack(data[: HEAD.size])[2] == 0  # no header flag: old readers refuse unknown flags


def _flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1 :]


def _tampered(p: Path, where: str) -> bytes:
    """The signed patch with one change a writer without the key could make, hashes recomputed to match."""
    pf = PatchFile.open(p)
    data = p.read_bytes()
    area = data[pf.manifest_offset : len(data) - TRAILER.size]
    frame, sig = area[: -SIG_FRAME.size], area[-SIG_FRAME.size :]
    if where == "record":  # a value in a record; the manifest's record hash no longer matches either
        rec = next(t["record"] for t in pf.tensors if t.get("record"))
        return _flip(data, rec["offset"] + sum(rec["nbytes"]) - 1)
    if where == "manifest":  # an edited manifest, the trailer's hash recomputed: only the signature can tell
        m = json.loads(zstandard.ZstdDecompressor().decompress(frame))
        m["metadata"] = {"note": "edited"}
        return with_manifest_area(data, zstandard.ZstdCompressor().compress(json.dumps(m).encode()) + sig)
    if where == "signature":
        return with_manifest_area(data, frame + _flip(sig, SIG_FRAME.size - 1))
    if where == "signer":  # the signer's public key in the signature frame
        return with_manifest_area(data, frame + _flip(sig, SIG_FRAME.size - 64 - 1))
    raise AssertionError(where)


@pytest.mark.parametrize("where,needle", [
    ("record", "bad signature .* modified after it was signed"),
    ("manifest", "bad signature .* modified after it was signed"),
    ("signature", "bad signature .* modified after it was signed"),
    ("signer", "signed by key .*, which is not trusted"),
])
def test_a_changed_byte_after_signing_is_refused(signed, keys, tmp_path, capsys, where, needle):
    b, _, p = signed
    (_, public), _ = keys
    bad = tmp_path / "bad.rlpatch"
    bad.write_bytes(_tampered(p, where))
    with pytest.raises(PatchError, match=needle):
        apply_patches(b, [bad], tmp_path / "out", trusted_keys=public)
    assert_nothing_left(tmp_path, "out")
    assert main(["patch", "apply", str(b), str(bad), "-o", str(tmp_path / "out"), "-q", "--trust", str(public)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"rlsubnet: error: {bad}: "), err
    assert_nothing_left(tmp_path, "out")
    if where != "signer":  # info --verify checks the signature against the key in the file
        assert main(["patch", "info", str(bad), "--verify"]) == 2
        assert "bad signature" in capsys.readouterr().err


def test_wrong_key_and_unsigned_are_refused(signed, keys, tmp_path, capsys):
    b, t, p = signed
    (_, public), (_, stranger) = keys
    out = tmp_path / "out"
    with pytest.raises(PatchError, match=f"signed by key {fingerprint(load_public_key(public))}, which is not trusted"):
        apply_patches(b, [p], out, trusted_keys=[stranger])
    assert_nothing_left(tmp_path, "out")
    unsigned = create_patch(b, t, tmp_path / "u.rlpatch").path
    assert main(["patch", "apply", str(b), str(unsigned), "-o", str(out), "-q", "--trust", str(public)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{unsigned}: not signed" in err[0], err
    assert_nothing_left(tmp_path, "out")
    # several keys: any one of them will do
    assert main(["patch", "apply", str(b), str(p), "-o", str(out), "-q", "--trust", str(stranger), str(public)]) == 0
    assert "1 patch signature(s) checked" in capsys.readouterr().out
    assert_same_checkpoint(t, out)


def test_cli_create_sign_and_info(bf16_pair, keys, tmp_path, capsys):
    b, t = bf16_pair
    (private, public), (_, stranger) = keys
    p = tmp_path / "c.rlpatch"
    assert main(["patch", "create", str(b), str(t), "-o", str(p), "-q", "--sign", str(private)]) == 0
    fp = fingerprint(load_public_key(public))
    assert f"signed   by Ed25519 key {fp}: signature not checked" in capsys.readouterr().out
    assert main(["patch", "info", str(p), "--verify"]) == 0
    assert f"signed   by Ed25519 key {fp}: signature valid (no trusted keys given)" in capsys.readouterr().out
    assert main(["patch", "info", str(p), "--trust", str(public), "--json"]) == 0
    sig = json.loads(capsys.readouterr().out)["signature"]
    assert sig == {"fingerprint": fp, "public_key": _raw_public(public).hex(), "valid": True, "trusted": True}
    assert main(["patch", "info", str(p), "--trust", str(stranger)]) == 2
    assert "which is not trusted" in capsys.readouterr().err
    assert main(["patch", "create", str(b), str(t), "-o", str(tmp_path / "d.rlpatch"), "-q", "--sign", str(public)]) == 2
    assert "is a public key; signing needs the private key" in capsys.readouterr().err
    assert not (tmp_path / "d.rlpatch").exists()
    assert main(["patch", "create", str(b), str(t), "-o", str(tmp_path / "e.rlpatch"), "-q"]) == 0
    assert "signed   no" in capsys.readouterr().out


def test_every_patch_of_a_chain_must_verify(tmp_path, keys):
    (private, public), (other, _) = keys
    states = [{"w": torch.arange(64, dtype=torch.float32).bfloat16() * (i + 1)} for i in range(3)]
    from rlsubnet.checkpoint import save_state_dict

    for i, sd in enumerate(states):
        save_state_dict(sd, tmp_path / f"s{i}")
    p1 = create_patch(tmp_path / "s0", tmp_path / "s1", tmp_path / "p1.rlpatch", sign_key=private).path
    p2 = create_patch(tmp_path / "s1", tmp_path / "s2", tmp_path / "p2.rlpatch", sign_key=other).path
    with pytest.raises(PatchError, match="p2.rlpatch: signed by key .* not trusted"):
        apply_patches(tmp_path / "s0", [p1, p2], tmp_path / "out", trusted_keys=public)
    assert_nothing_left(tmp_path, "out")
    apply_patches(tmp_path / "s0", [p1, p2], tmp_path / "out", trusted_keys=[public, Path(str(other) + ".pub")])
    assert_same_checkpoint(tmp_path / "s2", tmp_path / "out")


def test_in_place_apply_checks_the_signature_before_changing_anything(keys, tmp_path):
    (private, public), (_, stranger) = keys
    base = {"w": torch.linspace(-1, 1, 50).bfloat16()}
    tuned = {"w": base["w"] * 3}
    p = create_patch(base, tuned, tmp_path / "m.rlpatch", sign_key=private).path
    model = {"w": base["w"].clone()}
    with pytest.raises(PatchError, match="not trusted"):
        apply_patch_(model, p, trusted_keys=stranger)
    assert torch.equal(model["w"].view(torch.int16), base["w"].view(torch.int16))
    apply_patch_(model, p, trusted_keys=_raw_public(public))
    assert torch.equal(model["w"].view(torch.int16), tuned["w"].view(torch.int16))


def test_a_file_replaced_after_its_signature_was_checked_is_caught(signed, keys, tmp_path):
    """The signature is checked on the bytes of the file; the manifest in memory must be the one it covered."""
    b, t, p = signed
    (_, public), _ = keys
    pf = PatchFile.open(p)
    other = create_patch(t, b, tmp_path / "other.rlpatch", sign_key=keys[0][0]).path
    p.write_bytes(other.read_bytes())  # swapped after open, before the check
    with pytest.raises(PatchError, match="changed while it was being read"):
        pf.check_signature(public)


# ------------------------------------------------------------------------------------------------ live sync
def test_sync_receive_with_trusted_keys(tmp_path, keys):
    from rlsubnet.patch.sync import SyncWriter, sync_receive

    (private, public), (_, stranger) = keys
    torch.manual_seed(0)
    trainer = torch.nn.Linear(8, 4)
    receiver = {n: t.detach().to(torch.bfloat16).clone() for n, t in trainer.state_dict().items()}
    fresh = {n: t.clone() for n, t in receiver.items()}

    w = SyncWriter(tmp_path / "sync", anchor_every=0, sign_key=private)
    w.start(trainer, 0, anchor=True)
    for step in (1, 2):
        with torch.no_grad():
            trainer.weight.mul_(1.5)
        w.sync(trainer, step)
    expected = {n: t.detach().to(torch.bfloat16) for n, t in trainer.state_dict().items()}

    with pytest.raises(PatchError, match="not trusted"):
        sync_receive(receiver, tmp_path / "sync", trusted_keys=[stranger])
    assert all(torch.equal(receiver[n].view(torch.int16), fresh[n].view(torch.int16)) for n in receiver)
    state = sync_receive(receiver, tmp_path / "sync", trusted_keys=[public])
    assert state.step == 2
    assert all(torch.equal(receiver[n].view(torch.int16), expected[n].view(torch.int16)) for n in receiver)

    unsigned = SyncWriter(tmp_path / "plain", anchor_every=0)
    unsigned.start(trainer, 0, anchor=True)
    with pytest.raises(PatchError, match="not signed"):
        sync_receive({n: t.clone() for n, t in fresh.items()}, tmp_path / "plain", trusted_keys=public)
