"""Atomic file writes, used by every stage: a reader, or a run killed mid-write, sees the old file or the new one,
never half of one. (Whole directories -- checkpoints, dataset dirs, HF folders -- are built in a temp dir and
renamed by their owners; this is the single-file case.)

Permissions: outputs get what a plain open()/mkdir() would give under the user's umask (0644 / 0755 with the usual
022). mkstemp, mkdtemp and safetensors' save_file create 0600 / 0700 instead, so whatever they made is chmod'ed
(`chmod_like_umask`) before it is renamed into place."""
from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path


def umask() -> int:
    mask = os.umask(0)  # the only way to read it; restored at once
    os.umask(mask)
    return mask


def chmod_like_umask(path: str | os.PathLike) -> None:
    """Give `path` (a file, or a folder and everything in it) the mode a plain open()/mkdir() would: 0666 / 0777
    minus the umask."""
    path, mask = Path(path), umask()
    if path.is_dir():
        for p in path.rglob("*"):
            os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)
        os.chmod(path, 0o777 & ~mask)
    else:
        os.chmod(path, 0o666 & ~mask)


@contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temp path beside `path`; on success fsync it and rename it over `path`, on error remove it.

        with atomic_path(out / "model.safetensors") as tmp:
            save_file(state, tmp)
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        chmod_like_umask(tmp)  # mkstemp (and safetensors, if it rewrote the file) made it 0600
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
