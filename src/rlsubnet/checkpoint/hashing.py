"""Content hashes of tensors and checkpoints that do not depend on sharding, file layout or storage order.

A tensor's hash covers its name, dtype, shape and raw little-endian bytes; a checkpoint's hash combines its
tensor hashes in name order. Two checkpoints that hold the same tensors bit for bit therefore hash the same
whether they are one file or forty shards, safetensors or an in-memory state dict, and any flipped bit,
renamed, reshaped or re-typed tensor changes it.

Scheme ``xxh3-128-tensors-v1`` (recorded as :data:`HASH_SCHEME` wherever a hash is stored):

    tensor     = xxh3_128("rlsubnet-tensor-v1" | str(name) | str(ST dtype) | u64 ndim | u64 dims... | bytes)
    checkpoint = xxh3_128("rlsubnet-checkpoint-v1" | u64 count | for each name in sorted order: str(name) | digest)

where ``str(x)`` is a u32 byte length followed by the UTF-8 bytes, every integer is little-endian, so no two
different inputs share a byte stream, and ``digest`` is the tensor hash's 16 bytes. xxh3_128 is XXH3's 128-bit
variant (seed 0; https://github.com/Cyan4973/xxHash, the ``xxhash`` package), its 16 bytes written big-endian
as 32 lower-case hex characters, as ``xxhash.xxh3_128().hexdigest()`` does.

What the hash is for: recognising the right base (a patch applied to other weights, a mask measured on another
model) and checking a rebuild bit for bit. At 128 bits, two different checkpoints colliding by chance is out
of the question. It is **not** a security boundary: XXH3 is not cryptographic, so someone who wants to can make
two tensors with the same hash, and anyone able to alter a patch or a mask file can rewrite the hashes stored
in it anyway; authenticity would need a signature over the file. It runs at memory speed (~30 GB/s per core
here, against ~2 GB/s for SHA-256), which matters because every byte of both checkpoints is hashed. The
integrity of patch files themselves (records, manifest) is SHA-256: those are small.

The previous scheme, ``sha256-tensors-v1`` (the same byte streams under SHA-256, 64 hex characters), is no
longer produced. Its hashes are not comparable with these: code that compares a recorded hash checks the
recorded scheme first.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
import xxhash

from rlsubnet.checkpoint.index import TORCH_TO_ST
from rlsubnet.checkpoint.reader import Checkpoint
from rlsubnet.checkpoint.writer import tensor_bytes
from rlsubnet.errors import CheckpointError

HASH_SCHEME = "xxh3-128-tensors-v1"
DIGEST_HEX_CHARS = 32
DEFAULT_HASH_BLOCK_BYTES = 32 << 20
_HEX = frozenset("0123456789abcdef")


def _str(s: str) -> bytes:
    raw = s.encode("utf-8")
    return struct.pack("<I", len(raw)) + raw


def short(digest: str | None) -> str:
    """The first 12 hex digits, for messages and tables."""
    return "none" if digest is None else digest[:12]


def is_digest(digest: object) -> bool:
    """True for a digest of this scheme: 32 lower-case hex characters."""
    return isinstance(digest, str) and len(digest) == DIGEST_HEX_CHARS and set(digest) <= _HEX


class TensorHasher:
    """Hash one tensor from consecutive flat blocks of its raw bytes.

    >>> h = TensorHasher("w", torch.bfloat16, (4, 4))
    >>> for block in blocks: h.update(block)
    >>> h.hexdigest()

    Blocks may be tensors (any device; moved to the CPU), numpy arrays or bytes-like objects. Hashing
    releases the GIL, so several threads can hash at once.
    """

    def __init__(self, name: str, dtype: torch.dtype, shape: Iterable[int]):
        if dtype not in TORCH_TO_ST:
            raise CheckpointError(f"tensor {name!r}: dtype {dtype} has no safetensors code, cannot hash it")
        shape = tuple(int(s) for s in shape)
        self._h = xxhash.xxh3_128()
        self._h.update(_str("rlsubnet-tensor-v1") + _str(name) + _str(TORCH_TO_ST[dtype]))
        self._h.update(struct.pack(f"<Q{len(shape)}Q", len(shape), *shape))

    def update(self, block: torch.Tensor | np.ndarray | bytes | bytearray | memoryview) -> None:
        if isinstance(block, torch.Tensor):
            block = tensor_bytes(block)
        elif isinstance(block, np.ndarray):
            block = np.ascontiguousarray(block).data
        self._h.update(block)

    def hexdigest(self) -> str:
        return self._h.hexdigest()


def hash_tensor(name: str, tensor: torch.Tensor) -> str:
    h = TensorHasher(name, tensor.dtype, tensor.shape)
    h.update(tensor)
    return h.hexdigest()


def combine_hashes(tensor_hashes: Mapping[str, str]) -> str:
    """The checkpoint hash of a set of tensors given their tensor hashes (any order in, name order used)."""
    h = xxhash.xxh3_128()
    h.update(_str("rlsubnet-checkpoint-v1") + struct.pack("<Q", len(tensor_hashes)))
    for name in sorted(tensor_hashes):
        digest = tensor_hashes[name]
        if not is_digest(digest):
            raise ValueError(
                f"tensor {name!r}: {digest!r} is not a {HASH_SCHEME} digest ({DIGEST_HEX_CHARS} hex characters)"
            )
        h.update(_str(name) + bytes.fromhex(digest))
    return h.hexdigest()


@dataclass(frozen=True)
class CheckpointHash:
    """A checkpoint's hash and the hash of each of its tensors."""

    digest: str
    tensors: dict[str, str] = field(default_factory=dict)


def hash_checkpoint_tensor(ck: Checkpoint, name: str, block_bytes: int = DEFAULT_HASH_BLOCK_BYTES) -> str:
    info = ck.info(name)
    h = TensorHasher(name, info.dtype, info.shape)
    block = max(1, block_bytes // max(1, info.nbytes // max(1, info.numel)))
    for _, b in ck.iter_blocks(name, block):
        h.update(b)
    return h.hexdigest()


def hash_checkpoint(
    ck: Checkpoint, names: Iterable[str] | None = None, *, block_bytes: int = DEFAULT_HASH_BLOCK_BYTES, threads: int = 2
) -> CheckpointHash:
    """Hash every tensor of ``ck`` (or only ``names``), reading one block at a time.

    With ``threads`` > 1 and a checkpoint that can :meth:`~rlsubnet.checkpoint.reader.Checkpoint.clone`
    itself, several tensors are hashed at once (reads and hashing release the GIL); each thread reads
    through its own clone and holds one block, so memory stays at ``threads * block_bytes``.
    """
    from rlsubnet import limits

    block_bytes = limits.block_bytes(block_bytes)
    threads = limits.integer(threads, "threads", 1, limits.MAX_THREADS)
    names = list(ck.names() if names is None else names)
    if threads <= 1 or len(names) <= 1 or not ck.can_clone:
        hashes = {n: hash_checkpoint_tensor(ck, n, block_bytes) for n in names}
        return CheckpointHash(combine_hashes(hashes), hashes)

    import threading
    from concurrent.futures import ThreadPoolExecutor

    local = threading.local()
    readers: list[Checkpoint] = []
    lock = threading.Lock()

    def work(name: str) -> str:
        reader = getattr(local, "reader", None)
        if reader is None:
            reader = local.reader = ck.clone()
            with lock:
                readers.append(reader)
        return hash_checkpoint_tensor(reader, name, block_bytes)

    try:
        with ThreadPoolExecutor(max_workers=threads) as pool:
            hashes = dict(zip(names, pool.map(work, names)))
    finally:
        for r in readers:
            if r is not ck:
                r.close()
    return CheckpointHash(combine_hashes(hashes), hashes)


def hash_state_dict(tensors: Mapping[str, torch.Tensor]) -> CheckpointHash:
    """Hash in-memory tensors (moved to the CPU one at a time when they live on an accelerator)."""
    hashes = {name: hash_tensor(name, t.detach()) for name, t in tensors.items()}
    return CheckpointHash(combine_hashes(hashes), hashes)
