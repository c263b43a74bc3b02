"""Ed25519 signatures of patch files: make keys, sign a patch as it is written, check a patch against trusted keys.

A signature proves that whoever holds the private key wrote the file; the content hashes in the patch only
prove that it is intact (see ``docs/security.md``). Where the signature sits in the file, and what exactly
it signs, is specified in :mod:`rlsubnet.patch.format`.

Key files:

- private: PEM (PKCS#8, unencrypted; written by :func:`generate_key` with mode 0600) or an unencrypted
  OpenSSH ``ssh-ed25519`` private key;
- public: PEM (``KEY.pub`` as written by :func:`generate_key`), an OpenSSH ``ssh-ed25519 AAAA...`` line, or
  the raw 32 bytes.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from rlsubnet.errors import RlsubnetError, UsageError
from rlsubnet.fileio import atomic_write_bytes

# Signed: this context, then the sha256 of every byte of the file before the signature. The context keeps a
# patch signature from being valid as a signature of anything else made with the same key.
SIG_CONTEXT = b"rlsubnet-patch-signature-v1\0"
RAW_KEY_BYTES = 32
READ_CHUNK = 8 << 20


class KeyFileError(RlsubnetError):
    """A key file cannot be read or is not an Ed25519 key."""


def fingerprint(public_key: Ed25519PublicKey | bytes) -> str:
    """A short, stable name of a public key: the first 128 bits of the sha256 of its raw 32 bytes, in hex."""
    raw = public_key if isinstance(public_key, bytes) else raw_public(public_key)
    return hashlib.sha256(raw).hexdigest()[:32]


def raw_public(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


# ------------------------------------------------------------------------------------------------- key files
def generate_key(path: str | Path, *, overwrite: bool = False) -> tuple[Path, Path, str]:
    """Write a new private key to ``path`` (PEM, mode 0600) and its public key to ``path.pub``.

    Returns (private path, public path, fingerprint). Existing files are refused unless ``overwrite``. The
    private key's file is private from its creation and appears under its name only when complete.
    """
    path = Path(path)
    pub_path = path.with_name(path.name + ".pub")
    for p in (path, pub_path):
        if p.is_dir():
            raise UsageError(f"{p}: is a folder; give a file name for the key")
        if p.exists() and not overwrite:
            raise UsageError(f"{p}: exists (choose another name or pass --overwrite)")
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    atomic_write_bytes(pub_path, public_pem, error=UsageError)
    atomic_write_bytes(path, private_pem, private=True, error=UsageError)
    return path, pub_path, fingerprint(key.public_key())


def load_private_key(key) -> Ed25519PrivateKey:
    """A signing key from a key file path, an ``Ed25519PrivateKey``, or the raw 32-byte private seed."""
    if isinstance(key, Ed25519PrivateKey):
        return key
    if isinstance(key, (bytes, bytearray)):
        if len(key) == RAW_KEY_BYTES:
            return Ed25519PrivateKey.from_private_bytes(bytes(key))
        return _parse_private(bytes(key), "the private key bytes")
    if isinstance(key, (str, os.PathLike)):
        path = Path(key)
        return _parse_private(_read_key_file(path), str(path))
    raise UsageError(
        f"a signing key must be a key file path, an Ed25519PrivateKey or 32 raw bytes, not {type(key).__name__}"
    )


def _parse_private(data: bytes, what: str) -> Ed25519PrivateKey:
    if b"PUBLIC KEY-----" in data or data.lstrip().startswith(b"ssh-"):
        raise KeyFileError(f"{what}: is a public key; signing needs the private key (the file without .pub)")
    key: object = None
    try:
        if data.lstrip().startswith(b"-----BEGIN OPENSSH PRIVATE KEY"):
            key = serialization.load_ssh_private_key(data, password=None)
        elif data.lstrip().startswith(b"-----BEGIN"):
            key = serialization.load_pem_private_key(data, password=None)
    except TypeError:  # cryptography: "Password was not given but private key is encrypted"
        raise KeyFileError(
            f"{what}: the private key is encrypted; rlsubnet signs with unencrypted keys (keep the file mode 0600)"
        ) from None
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise KeyFileError(f"{what}: not a readable private key ({_first_line(exc)})") from None
    if key is None:
        raise KeyFileError(f"{what}: not a PEM or OpenSSH private key")
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(
            f"{what}: is a {type(key).__name__.removesuffix('PrivateKey').removeprefix('_')} key; "
            "rlsubnet signs with Ed25519 keys (make one with `rlsubnet patch keygen`)"
        )
    return key


def load_public_key(key) -> Ed25519PublicKey:
    """A trusted key from a key file path, an ``Ed25519PublicKey``, or the raw 32 bytes (or a PEM/OpenSSH text).

    A private key is refused rather than reduced to its public half: a private key has no business on the
    machines that only check patches.
    """
    if isinstance(key, Ed25519PublicKey):
        return key
    if isinstance(key, Ed25519PrivateKey):
        return key.public_key()  # in-process objects: the caller holds both halves anyway
    if isinstance(key, (bytes, bytearray)):
        if len(key) == RAW_KEY_BYTES:
            return Ed25519PublicKey.from_public_bytes(bytes(key))
        return _parse_public(bytes(key), "the public key bytes")
    if isinstance(key, (str, os.PathLike)):
        path = Path(key)
        data = _read_key_file(path)
        if len(data) == RAW_KEY_BYTES:
            return Ed25519PublicKey.from_public_bytes(data)
        return _parse_public(data, str(path))
    raise UsageError(
        f"a trusted key must be a key file path, an Ed25519PublicKey or 32 raw bytes, not {type(key).__name__}"
    )


def _parse_public(data: bytes, what: str) -> Ed25519PublicKey:
    text = data.strip()
    if b"PRIVATE KEY" in text:
        raise KeyFileError(f"{what}: is a private key; trust its public key (the .pub file) instead")
    key = None
    try:
        if text.startswith(b"-----BEGIN"):
            key = serialization.load_pem_public_key(text)
        elif text.startswith(b"ssh-"):
            key = serialization.load_ssh_public_key(text)
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise KeyFileError(f"{what}: not a readable public key ({_first_line(exc)})") from None
    if key is None:
        raise KeyFileError(f"{what}: not a PEM, OpenSSH or raw 32-byte public key")
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFileError(f"{what}: not an Ed25519 public key (rlsubnet checks Ed25519 signatures)")
    return key


def _read_key_file(path: Path) -> bytes:
    try:
        if path.stat().st_size > 64 << 10:
            raise KeyFileError(f"{path}: too large to be a key file")
        return path.read_bytes()
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot read the key ({exc.strerror or exc})") from None


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


@dataclass(frozen=True)
class TrustedKeys:
    """The public keys whose signatures are accepted, by raw bytes."""

    keys: dict[bytes, Ed25519PublicKey]

    def fingerprints(self) -> list[str]:
        return [fingerprint(k) for k in self.keys]


def trusted_keys(keys) -> TrustedKeys | None:
    """Normalise ``trusted_keys=`` arguments: None (no signature check), one key, or an iterable of keys.

    Each key is a path, an ``Ed25519PublicKey`` or raw bytes (:func:`load_public_key`). An empty collection
    is refused: it would refuse every patch, which is never what was meant.
    """
    if keys is None or isinstance(keys, TrustedKeys):
        return keys
    if isinstance(keys, (str, os.PathLike, bytes, bytearray, Ed25519PublicKey, Ed25519PrivateKey)):
        keys = [keys]
    if not isinstance(keys, Iterable):
        raise UsageError(f"trusted_keys must be a key or a list of keys, not {type(keys).__name__}")
    loaded = [load_public_key(k) for k in keys]
    if not loaded:
        raise UsageError("trusted_keys is empty: give at least one public key (or None to skip signature checks)")
    return TrustedKeys({raw_public(k): k for k in loaded})


# ------------------------------------------------------------------------------------------------- sign/check
def signed_message(file_digest: bytes) -> bytes:
    return SIG_CONTEXT + file_digest


def sign_digest(key: Ed25519PrivateKey, file_digest: bytes) -> tuple[bytes, bytes]:
    """(raw public key, signature) over the sha256 ``file_digest`` of the bytes before the signature."""
    return raw_public(key.public_key()), key.sign(signed_message(file_digest))


def verify_digest(public_key: Ed25519PublicKey, signature: bytes, file_digest: bytes) -> bool:
    try:
        public_key.verify(signature, signed_message(file_digest))
    except InvalidSignature:
        return False
    return True
