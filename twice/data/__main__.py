"""Build a dataset dir from one source.

    python -m twice.data prepare configs/data/ml-100k.yaml [key=value ...]
    python -m twice.data prepare configs/data/amazon.yaml raw_dir=~/amazon2023 domain=All_Beauty out_dir=data/beauty
    python -m twice.data prepare configs/data/official.yaml raw_dir=../shared/data/twice_official_sample
    python -m twice.data audit data/ml-100k [--full DIR]     # are the candidate lists fair? (twice/data/audit.py)
"""
from __future__ import annotations

import sys

from twice.config import ConfigError, parse_args
from twice.data import DataConfig
from twice.data.build import DataError, build


def open_source(cfg: DataConfig):
    if cfg.max_history and cfg.max_history < cfg.min_user_len:
        raise ConfigError(f"max_history={cfg.max_history} must be 0 or >= min_user_len={cfg.min_user_len}")
    if cfg.source == "amazon2023":
        from twice.data.amazon import AmazonSource
        return AmazonSource(cfg)
    if cfg.source == "recbole":
        from twice.data.recbole import RecBoleSource
        return RecBoleSource(cfg)
    if cfg.source == "movielens-100k":
        from twice.data.movielens import MovieLensSource
        return MovieLensSource(cfg)
    raise ConfigError(f"source must be amazon2023 | recbole | movielens-100k | official, got {cfg.source!r}")


def prepare(cfg: DataConfig):
    if cfg.source == "official":
        from twice.data.official import import_official
        return import_official(cfg)
    return build(cfg, open_source(cfg))


def main(argv: list[str]) -> int:
    if argv[:1] == ["audit"] and len(argv) in (2, 4) and (len(argv) == 2 or argv[2] == "--full"):
        import json
        from twice.data import load_dataset
        from twice.data.audit import audit
        print(json.dumps(audit(load_dataset(argv[1]), load_dataset(argv[3]) if len(argv) == 4 else None), indent=2))
        return 0
    if not argv or argv[0] != "prepare":
        print(__doc__, file=sys.stderr)
        return 2
    try:
        out = prepare(parse_args(DataConfig, argv[1:]))
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
