"""Atomic file writes, used by every stage: a reader, or a run killed mid-write, sees the old file or the new one,
never half of one. (Whole directories -- checkpoints, dataset dirs, HF folders -- are built in a temp dir and
renamed by their owners; this is the single-file case.)"""
from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temp path beside `path`; on success fsync it and rename it over `path`, on error remove it.

        with atomic_path(out / "model.safetensors") as tmp:
            save_file(state, tmp)
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    os.chmod(tmp, 0o644)  # mkstemp makes 0600 files; outputs should be readable like any written file
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_atomic(path: str | os.PathLike, data: str | bytes) -> None:
    """Write text (utf-8) or bytes to `path` atomically."""
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(data.encode("utf-8") if isinstance(data, str) else data)


def write_json_atomic(path: str | os.PathLike, obj, indent: int = 2) -> None:
    write_atomic(path, json.dumps(obj, indent=indent) + "\n")
