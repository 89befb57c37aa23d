"""Names of the tiles a kernel launched with, for benchmark rows (``"128x64 w8 s3"``)."""
from __future__ import annotations

import triton


def tile_name(c: triton.Config) -> str:
    """``BLOCK_M x BLOCK_N [x BLOCK_K] w<warps> s<stages>`` of a launch configuration."""
    k = c.kwargs
    name = "x".join(str(k[b]) for b in ("BLOCK_M", "BLOCK_N", "BLOCK_K") if b in k) + f" w{c.num_warps} s{c.num_stages}"
    return name + " split" if k.get("SPLIT_M") else name


def record_tile(table: dict, kind: str, tuner) -> None:
    """Store the autotuner's last pick (``tuner.best_config``) under ``kind`` in ``table``."""
    c = getattr(tuner, "best_config", None)
    if c is not None:
        table[kind] = tile_name(c)
