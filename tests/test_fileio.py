"""twice.fileio: a write either fully replaces the file or leaves the old one, and never leaves temp files behind."""
import json

import pytest

from twice.fileio import atomic_path, write_atomic, write_json_atomic


def test_write_replaces_and_leaves_nothing_else(tmp_path):
    p = tmp_path / "out.txt"
    write_atomic(p, "old")
    write_atomic(p, b"new\xff")
    assert p.read_bytes() == b"new\xff"
    write_json_atomic(tmp_path / "r.json", {"a": 1})
    assert json.loads((tmp_path / "r.json").read_text()) == {"a": 1}
    assert sorted(x.name for x in tmp_path.iterdir()) == ["out.txt", "r.json"]
    assert p.stat().st_mode & 0o777 == 0o644


def test_failure_keeps_the_old_file(tmp_path):
    p = tmp_path / "model.bin"
    write_atomic(p, "v1")
    with pytest.raises(RuntimeError):
        with atomic_path(p) as tmp:
            open(tmp, "w").write("half of v2")
            raise RuntimeError("killed mid-write")
    assert p.read_text() == "v1"
    assert [x.name for x in tmp_path.iterdir()] == ["model.bin"]
