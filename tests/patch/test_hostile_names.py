"""Names read from a patch (its embedded files) or a sync index become paths: only plain file names pass.

A hostile manifest is made the way a writer who controls the file would: edit the manifest, recompute the
trailer's hash. Each must be refused in one line naming the patch and the entry, by `patch info` and `patch
apply` alike, with nothing written anywhere: not at the output, not where the name points, not over the base.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from patch.patch_helpers import assert_nothing_left, assert_same_checkpoint, edge_pair, rewrite_manifest, write_pair
from rlsubnet.cli.main import main
from rlsubnet.errors import RlsubnetError, UsageError
from rlsubnet.patch import PatchError, apply_patches, create_patch
from rlsubnet.patch.format import PatchFile


@pytest.fixture(autouse=True)
def pipeline():
    """Once, not once per pipeline mode (conftest): every refusal here comes before any tensor is streamed."""
    return "default"


def _tree(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` with its bytes (to show that nothing was written or replaced)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def with_files(tmp_path):
    """A base and a tuned folder whose config differs (so the patch embeds it) and a tokenizer file they share
    (so the patch lists it as "from the base"), and the patch between them."""
    base, tuned = edge_pair(torch.bfloat16)
    b, t = write_pair(tmp_path / "ck", base, tuned)
    (b / "config.json").write_text('{"step": 0}')
    (t / "config.json").write_text('{"step": 10}')
    for folder in (b, t):
        (folder / "tokenizer.json").write_text('{"vocab": 3}')
    p = create_patch(b, t, tmp_path / "work" / "p.rlpatch").path
    sources = {f["name"]: f["source"] for f in PatchFile.open(p).manifest["files"]}
    assert sources == {"config.json": "patch", "tokenizer.json": "base"}
    return b, t, p


def _renamed(old: str, new: str):
    def mutate(m):
        (entry,) = [f for f in m["files"] if f["name"] == old]
        entry["name"] = new

    return mutate


HOSTILE = [
    ("../x.json", "path separator"),
    ("../../escaped.json", "path separator"),
    ("sub/dir.json", "path separator"),
    ("sub\\dir.json", "path separator"),
    ("..", "reference to a folder"),
    (".", "reference to a folder"),
    ("", "empty"),
    ("x\x00.json", "control character"),
    ("line\nbreak.json", "control character"),
    ("C:evil.json", "drive letter"),
    ("n" * 256, "longer than 255 bytes"),
    ("model.safetensors", "weight or index file"),
    ("MODEL.SafeTensors", "weight or index file"),
    ("model-00001-of-00002.safetensors", "weight or index file"),
    ("model.safetensors.index.json", "weight or index file"),
    ("pytorch_model.bin", "weight or index file"),
    ("optimizer.pt", "weight or index file"),
]


@pytest.mark.parametrize("source", ["patch", "base"])
@pytest.mark.parametrize("name,reason", HOSTILE, ids=[repr(n)[:24] for n, _ in HOSTILE])
def test_hostile_file_name_is_refused_and_nothing_is_written(with_files, tmp_path, capsys, name, reason, source):
    b, t, p = with_files
    old = "config.json" if source == "patch" else "tokenizer.json"
    bad = rewrite_manifest(p, tmp_path / "work" / "bad.rlpatch", _renamed(old, name))
    before = _tree(tmp_path)
    out = tmp_path / "work" / "out"

    with pytest.raises(PatchError, match="file entry .* refused: .*" + reason) as exc:
        PatchFile.open(bad)
    assert str(bad) in str(exc.value) and "\n" not in str(exc.value)
    with pytest.raises(PatchError, match=reason):
        apply_patches(b, [bad], out)
    for argv in (["patch", "info", str(bad)], ["patch", "apply", str(b), str(bad), "-o", str(out), "-q"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"rlsubnet: error: {bad}: file entry ") and reason in err
        assert err.count("\n") == 1 and err.endswith("\n")  # one line, whatever the name holds
    assert_nothing_left(out.parent, "out")
    assert _tree(tmp_path) == before  # base, tuned, patches: nothing added, nothing replaced
    assert not (tmp_path / "work" / "x.json").exists() and not (tmp_path / "escaped.json").exists()


def test_absolute_file_name_is_refused(with_files, tmp_path, capsys):
    b, t, p = with_files
    target = tmp_path / "elsewhere" / "owned.json"
    target.parent.mkdir()
    bad = rewrite_manifest(p, tmp_path / "work" / "abs.rlpatch", _renamed("config.json", str(target)))
    before = _tree(tmp_path)
    assert main(["patch", "apply", str(b), str(bad), "-o", str(tmp_path / "work" / "out"), "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(bad) in err[0] and repr(str(target)) in err[0] and "path separator" in err[0]
    assert not target.exists() and _tree(tmp_path) == before
    assert_nothing_left(tmp_path / "work", "out")


def test_the_weights_cannot_be_replaced_by_an_embedded_file(with_files, tmp_path):
    """The reported hole: a file entry named like the output's weights, applied into a single-file output
    folder, replaced the verified weights after their hash check. Now refused before any output exists."""
    b, t, p = with_files
    bad = rewrite_manifest(p, tmp_path / "work" / "w.rlpatch", _renamed("config.json", "model-00002-of-00002.safetensors"))
    with pytest.raises(PatchError, match="weight or index file"):
        apply_patches(b, [bad], tmp_path / "work" / "out", verify_base_first=True)
    assert_nothing_left(tmp_path / "work", "out")


def test_duplicate_file_entries_are_refused(with_files, tmp_path):
    b, t, p = with_files

    def twice(m):
        m["files"].append(dict(m["files"][0]))

    def case_twice(m):
        extra = dict(m["files"][0])
        extra["name"] = m["files"][0]["name"].upper()
        m["files"].append(extra)

    for mutate in (twice, case_twice):
        bad = rewrite_manifest(p, tmp_path / "work" / "dup.rlpatch", mutate)
        with pytest.raises(PatchError, match="listed twice"):
            apply_patches(b, [bad], tmp_path / "work" / "out")
        assert_nothing_left(tmp_path / "work", "out")


@pytest.mark.parametrize("mutate,needle", [
    (lambda m: m.__setitem__("files", {"config.json": 1}), "files is not a list"),
    (lambda m: m["files"][0].__setitem__("name", 7), "not a string"),
    (lambda m: m["files"][0].__setitem__("source", "../base"), "unknown source"),
    (lambda m: m["files"][0].pop("record"), "embedded but has no record"),
])
def test_malformed_file_entries_are_refused(with_files, tmp_path, mutate, needle):
    b, t, p = with_files
    m = PatchFile.open(p).manifest
    assert m["files"][0]["source"] == "patch"
    bad = rewrite_manifest(p, tmp_path / "work" / "m.rlpatch", mutate)
    with pytest.raises(PatchError, match=needle):
        PatchFile.open(bad)


def test_create_leaves_out_names_its_readers_would_refuse(tmp_path):
    """Odd but legal POSIX names in the tuned folder are listed as skipped, not embedded: the patch applies."""
    base, tuned = edge_pair(torch.bfloat16)
    b, t = write_pair(tmp_path, base, tuned)
    (t / "config.json").write_text("{}")
    (t / "Config.json").write_text('{"other": 1}')
    (t / "back\\slash.json").write_text("{}")
    (t / "tab\there.txt").write_text("x")
    s = create_patch(b, t, tmp_path / "p.rlpatch")
    names = [f["name"] for f in s.manifest["files"]]
    skipped = {e["name"]: e["reason"] for e in s.manifest["skipped_files"]}
    assert len(names) == 1 and names[0].lower() == "config.json"
    assert "but for case" in skipped[({"config.json", "Config.json"} - set(names)).pop()]
    assert "path separator" in skipped["back\\slash.json"] and "control character" in skipped["tab\there.txt"]
    out = apply_patches(b, [s.path], tmp_path / "out")
    assert_same_checkpoint(t, tmp_path / "out")
    assert out.files == names


# ------------------------------------------------------------------------------------------------ sync index
def _sync_dir(tmp_path: Path, file_name) -> Path:
    d = tmp_path / "sync"
    d.mkdir()
    entry = {"step": 0, "file": file_name, "kind": "anchor", "base": None, "target": "0" * 32, "changed": 0,
             "nbytes": 1}
    (d / "sync.json").write_text(json.dumps({"format": "rlsubnet-sync", "format_version": 1, "dtype": "bfloat16",
                                             "entries": [entry]}))
    return d


@pytest.mark.parametrize("name", ["../elsewhere.rlpatch", "/tmp/x.rlpatch", "a/b.rlpatch", "..", "", 3])
def test_sync_index_naming_a_file_outside_its_folder_is_refused(tmp_path, name):
    from rlsubnet.patch.sync import read_sync_index, sync_receive

    d = _sync_dir(tmp_path, name)
    with pytest.raises(UsageError, match=r"sync\.json: entry 0 \(step 0\): .* is not a plain file name"):
        read_sync_index(d)
    model = {"w": torch.zeros(3, dtype=torch.bfloat16)}
    with pytest.raises(RlsubnetError, match="not a plain file name"):
        sync_receive(model, d)
    assert torch.equal(model["w"], torch.zeros(3, dtype=torch.bfloat16))


@pytest.mark.parametrize("index", [[], {"format": "rlsubnet-sync", "format_version": 1, "entries": [{"file": "a"}]},
                                   {"format": "rlsubnet-sync", "format_version": "1", "entries": []}])
def test_malformed_sync_index_is_one_line(tmp_path, index):
    from rlsubnet.patch.sync import read_sync_index

    d = tmp_path / "s"
    d.mkdir()
    (d / "sync.json").write_text(json.dumps(index))
    with pytest.raises(UsageError, match="sync.json: "):
        read_sync_index(d)


def test_member_name_rules():
    from rlsubnet.fileio import member_name_problem

    for ok in ("config.json", "tokenizer_config.json", "a b.txt", "ünïcode.json", ".hidden", "x..y", "C_:x"):
        assert member_name_problem(ok) is None, ok
    for bad in ("", ".", "..", "a/b", "a\\b", "/abs", "\\\\server\\share", "D:x", "a\x7fb", "\x1b[31m", "n" * 256,
                "\udcff.json", None, b"bytes"):
        assert member_name_problem(bad) is not None, bad
