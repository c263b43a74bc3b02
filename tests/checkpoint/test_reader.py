import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import load_dir
from rlsubnet.checkpoint import SafetensorsWriter, open_checkpoint, read_safetensors_header, save_state_dict
from rlsubnet.errors import CheckpointError


def test_sharded_folder_reads_every_tensor_bit_exact(sharded_pair):
    base, _, _, specs = sharded_pair
    shards = [f for f in os.listdir(base) if f.endswith(".safetensors")]
    assert len(shards) >= 3, "the fixture must really be sharded"
    ref = load_dir(base)
    with open_checkpoint(base) as ck:
        assert ck.format == "safetensors"
        assert set(ck.names()) == set(ref) == {n for n, _, _ in specs}
        for name in ck.names():
            t = ck.read(name)
            assert t.dtype == ref[name].dtype and t.shape == ref[name].shape
            assert torch.equal(t.view(torch.int16), ref[name].view(torch.int16))
            # flat blocks tile the tensor exactly
            blocks = [b for _, b in ck.iter_blocks(name, 7)]
            assert torch.equal(torch.cat(blocks).view(torch.int16), ref[name].reshape(-1).view(torch.int16))


def test_single_file_and_index_json_path(tmp_path, sharded_pair):
    base = sharded_pair[0]
    with open_checkpoint(base / "model.safetensors.index.json") as ck:
        assert len(ck.names()) == len(load_dir(base))
    save_file({"a": torch.arange(6, dtype=torch.float32).reshape(2, 3)}, tmp_path / "one.safetensors")
    with open_checkpoint(tmp_path / "one.safetensors") as ck:
        assert torch.equal(ck.read("a"), torch.arange(6, dtype=torch.float32).reshape(2, 3))


def test_at_most_one_shard_open_per_checkpoint(monkeypatch, sharded_pair):
    base = sharded_pair[0]
    open_fds: set[int] = set()
    peak = [0]
    real_open, real_close = os.open, os.close

    def tracking_open(path, *a, **k):
        fd = real_open(path, *a, **k)
        if str(path).endswith(".safetensors"):
            open_fds.add(fd)
            peak[0] = max(peak[0], len(open_fds))
        return fd

    def tracking_close(fd):
        open_fds.discard(fd)
        return real_close(fd)

    monkeypatch.setattr(os, "open", tracking_open)
    monkeypatch.setattr(os, "close", tracking_close)
    with open_checkpoint(base) as ck:
        for name in ck.names():
            ck.read(name)
    assert peak[0] == 1
    assert not open_fds


def test_writer_matches_safetensors_library(tmp_path):
    tensors = {
        "b": torch.randn(3, 5).bfloat16(),
        "a": torch.arange(7, dtype=torch.int64),
        "c": torch.tensor([True, False]),
        "empty": torch.empty(0, 4),
    }
    path = tmp_path / "w.safetensors"
    with SafetensorsWriter(path, [(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()], {"k": "v"}) as w:
        for n, t in tensors.items():
            w.write(n, t)
    loaded = load_file(path)
    for n, t in tensors.items():
        assert loaded[n].dtype == t.dtype and torch.equal(loaded[n], t)
    _, meta = read_safetensors_header(path)
    assert meta == {"k": "v"}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary files left behind"


def test_writer_failure_leaves_no_file(tmp_path):
    path = tmp_path / "x.safetensors"
    with pytest.raises(RuntimeError):
        with SafetensorsWriter(path, [("a", torch.float32, (2,))]):
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


def test_save_state_dict_shards_and_index(tmp_path):
    sd = {f"w{i}": torch.full((256,), float(i)) for i in range(5)}
    save_state_dict(sd, tmp_path / "ck", max_shard_bytes=1024)  # one 1 KiB tensor per shard
    index = json.loads((tmp_path / "ck" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 5
    with open_checkpoint(tmp_path / "ck") as ck:
        assert all(torch.equal(ck.read(n), t) for n, t in sd.items())


def test_pickle_refused_unless_allowed(tmp_path):
    sd = {"w": torch.randn(4, 4)}
    torch.save(sd, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="--allow-pickle"):
        open_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="--allow-pickle"):
        open_checkpoint(tmp_path / "pytorch_model.bin")
    with open_checkpoint(tmp_path, allow_pickle=True) as ck:
        assert ck.format == "pickle" and torch.equal(ck.read("w"), sd["w"])


def test_pickle_with_code_is_refused_by_weights_only(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("true",))

    torch.save({"w": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="evil.pt"):
        open_checkpoint(tmp_path / "evil.pt", allow_pickle=True)


def test_hub_id_resolves_from_local_cache_only(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    snap = cache / "models--acme--tiny" / "snapshots" / "0123abcd"
    snap.mkdir(parents=True)
    save_file({"w": torch.ones(3)}, snap / "model.safetensors")
    (snap / "config.json").write_text("{}")
    refs = cache / "models--acme--tiny" / "refs"
    refs.mkdir()
    (refs / "main").write_text("0123abcd")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    with open_checkpoint("acme/tiny") as ck:
        assert torch.equal(ck.read("w"), torch.ones(3))
    with pytest.raises(CheckpointError, match="acme/other.*--allow-download"):
        open_checkpoint("acme/other")
    # Ids without an organisation ("gpt2") and with a revision resolve the same way.
    legacy = cache / "models--tiny2"
    (legacy / "snapshots" / "0123abcd").mkdir(parents=True)
    save_file({"v": torch.zeros(2)}, legacy / "snapshots" / "0123abcd" / "model.safetensors")
    (legacy / "refs").mkdir()
    (legacy / "refs" / "main").write_text("0123abcd")
    for spec in ("tiny2", "tiny2@main"):
        with open_checkpoint(spec) as ck:
            assert ck.names() == ["v"]
    with pytest.raises(CheckpointError, match="nope.safetensors: no such file or folder$"):
        open_checkpoint("nope.safetensors")


def test_module_with_tied_weights_matches_its_saved_checkpoint(tmp_path):
    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(10, 4)
            self.head = torch.nn.Linear(4, 10, bias=False)
            self.head.weight = self.embed.weight

    m = Tied()
    assert set(m.state_dict()) == {"embed.weight", "head.weight"}
    with open_checkpoint(m) as ck:
        assert ck.names() == ["embed.weight"]
    save_state_dict({"embed.weight": m.embed.weight.detach()}, tmp_path / "saved")
    import rlsubnet

    assert rlsubnet.compare(m, tmp_path / "saved").changed(0.0) == 0


def test_clone_reads_alongside_the_original_from_another_thread(sharded_pair, tmp_path):
    """clone(): its own file handle, shared index; two threads read the same shards at once, bit exact."""
    from concurrent.futures import ThreadPoolExecutor

    base = sharded_pair[0]
    ref = load_dir(base)
    with open_checkpoint(base) as ck:
        assert ck.can_clone
        clone = ck.clone()
        assert clone is not ck and clone.infos is ck.infos

        def read_all(reader):
            names = reader.names()
            return {n: reader.read(n) for n in (names if reader is ck else reversed(names))}

        with ThreadPoolExecutor(2) as pool:
            for _ in range(2):  # each reader in exactly one thread at a time: a reader itself is not thread-safe
                for got in pool.map(read_all, [ck, clone]):
                    assert all(torch.equal(got[n].view(torch.int16), ref[n].view(torch.int16)) for n in ref)
        clone.close()
        assert torch.equal(ck.read(ck.names()[0]).view(torch.int16), ref[ck.names()[0]].view(torch.int16))
    sd = {"a": torch.arange(5.0)}
    mem = open_checkpoint(sd)
    assert mem.can_clone and mem.clone() is mem  # in-memory reads are thread-safe as they are
    torch.save(sd, tmp_path / "w.bin")
    pk = open_checkpoint(tmp_path / "w.bin", allow_pickle=True)
    pc = pk.clone()
    assert pc is not pk and torch.equal(pc.read("a"), sd["a"]) and torch.equal(pk.read("a"), sd["a"])


def test_read_flat_into_fills_a_reused_buffer(sharded_pair, tmp_path):
    import numpy as np

    base = sharded_pair[0]
    buf = np.full(1 << 16, 0xAB, dtype=np.uint8)
    sd = {"w": torch.randn(7, 9).to(torch.bfloat16), "b": torch.arange(10, dtype=torch.int32)}
    torch.save(sd, tmp_path / "w.bin")
    for ck in (open_checkpoint(base), open_checkpoint(sd), open_checkpoint(tmp_path / "w.bin", allow_pickle=True)):
        for name in ck.names():
            info = ck.info(name)
            for start, stop in ((0, info.numel), (1, min(info.numel, 40)), (3, 3)):
                got = ck.read_flat_into(name, start, stop, buf)
                want = ck.read_flat(name, start, stop).reshape(-1).view(torch.uint8).numpy()
                assert bytes(got) == want.tobytes() and len(got) == (stop - start) * info.dtype.itemsize
        ck.close()
    with open_checkpoint(base) as ck:
        name = ck.names()[0]
        with pytest.raises(ValueError, match="cannot hold"):
            ck.read_flat_into(name, 0, ck.info(name).numel, np.empty(2, dtype=np.uint8))


@pytest.mark.parametrize("direct", [True, False])
def test_direct_file_writes_any_sizes_exactly(tmp_path, direct):
    """DirectFile stages writes in aligned chunks (O_DIRECT where the file system allows) and writes an
    unaligned tail last; with direct=False (forced fallback) it writes through the page cache. Same bytes."""
    import numpy as np

    from rlsubnet.staged import DirectFile

    rng = np.random.default_rng(0)
    parts = [rng.integers(0, 256, n, dtype=np.uint8) for n in (13, 4096, 1, 10_000, 70_001, 0, 5)]
    path = tmp_path / "f.bin"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    f = DirectFile(fd, chunk=16_384)
    if not direct:
        f._direct = f._set_direct(False)
    for p in parts:
        assert f.write(p) == len(p)
    f.write(b"end")
    f.flush()
    os.fsync(f.fileno())
    f.close()
    assert f.closed
    assert path.read_bytes() == b"".join(p.tobytes() for p in parts) + b"end"


def test_writer_direct_matches_buffered(tmp_path):
    t = {"a": torch.randn(333, 77).to(torch.bfloat16), "b": torch.arange(5, dtype=torch.int64)}
    specs = [(n, x.dtype, tuple(x.shape)) for n, x in t.items()]
    for direct in (False, True):
        with SafetensorsWriter(tmp_path / f"{direct}.safetensors", specs, direct=direct) as w:
            for n, x in t.items():
                w.write(n, x)
    assert (tmp_path / "True.safetensors").read_bytes() == (tmp_path / "False.safetensors").read_bytes()
    got = load_file(tmp_path / "True.safetensors")
    assert all(torch.equal(got[n].view(torch.uint8), t[n].view(torch.uint8)) for n in t)
