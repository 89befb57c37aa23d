"""Training data: text files, supervised JSONL datasets, and batch arrangement.

Everything here is checked before training starts: an empty or unreadable file, a JSONL
row that is not an object or lacks a field raises ``ValueError`` naming the file (and
line), so no run begins (and nothing is written) on bad data.
"""
from __future__ import annotations

import json
import os
import random

import torch

SUPERVISED_FIELDS = ("query", "positive", "negative")


class ListDataset(torch.utils.data.Dataset):
    """A list of examples as a map-style dataset (what the Trainer's dataloader reads)."""

    def __init__(self, items: list):
        self.items = list(items)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def _open_lines(path: str, what: str) -> list[str]:
    if not isinstance(path, str) or not path:
        raise ValueError(f"{what}: expected a file path, got {path!r}")
    if not os.path.isfile(path):
        raise ValueError(f"{what}: file {path!r} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            # newlines only (open() already folded \r\n and \r): str.splitlines would also
            # split a text at a form feed, U+2028 or U+0085 inside it
            lines = f.read().split("\n")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{what}: cannot read {path!r}: {e}") from e
    return lines


def read_texts(path: str, what: str = "train_file") -> list[str]:
    """Texts of a ``.txt`` file (one per non-blank line) or a ``.jsonl`` file (``{"text": ...}``)."""
    lines = _open_lines(path, what)
    texts: list[str] = []
    if path.endswith((".jsonl", ".json")):
        for n, line, row in _json_lines(lines, path, what):
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise ValueError(f"{what}: {path}:{n} expected an object with a string field 'text', got {line[:80]!r}")
            if row["text"].strip():
                texts.append(row["text"])
    else:
        texts = [ln for ln in lines if ln.strip()]
    if not texts:
        raise ValueError(f"{what}: {path!r} holds no text (empty file)")
    return texts


def _json_lines(lines, path: str, what: str):
    """``(line number, line, parsed row)`` of each non-blank JSONL line; a line that is not
    JSON raises a ValueError naming ``what``, the file and the line."""
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            yield n, line, json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{what}: {path}:{n} is not valid JSON ({e})") from e


def read_supervised_file(path: str, *, require_negative: bool = True) -> list[dict]:
    """Rows ``{query, positive, negative}`` (strings) of one JSONL file."""
    lines = _open_lines(path, "train_files")
    need = SUPERVISED_FIELDS if require_negative else SUPERVISED_FIELDS[:2]
    rows = []
    for n, line, row in _json_lines(lines, path, "train_files"):
        if not isinstance(row, dict):
            raise ValueError(f"train_files: {path}:{n} expected a JSON object, got {type(row).__name__}")
        for k in need:
            if not isinstance(row.get(k), str) or not row[k].strip():
                raise ValueError(f"train_files: {path}:{n} is missing field {k!r} (expected a non-empty string; "
                                 f"each row needs {list(need)})")
        rows.append({k: row[k] for k in need})
    if not rows:
        raise ValueError(f"train_files: {path!r} holds no rows (empty file)")
    return rows


def expand_jsonl_paths(paths: list[str]) -> list[str]:
    """Files as given; folders replaced by their ``*.jsonl`` files (sorted)."""
    out = []
    for p in paths:
        if os.path.isdir(p):
            found = sorted(os.path.join(p, f) for f in os.listdir(p) if f.endswith(".jsonl"))
            if not found:
                raise ValueError(f"train_files: folder {p!r} holds no .jsonl file")
            out.extend(found)
        else:
            out.append(p)
    if not out:
        raise ValueError("train_files: expected at least one JSONL file")
    return out


def dataset_name(path: str) -> str:
    return os.path.splitext(os.path.basename(path))[0]


def load_supervised(paths: list[str], instructions: dict[str, str] | None = None, *, require_negative=True):
    """``{dataset name: [row, ...]}``, each row with its dataset's ``instruction`` ("" if none).

    The dataset name is the file stem; ``instructions`` maps names to the instruction
    prepended to queries (attended to, excluded from pooling).
    """
    instructions = instructions or {}
    data: dict[str, list[dict]] = {}
    for p in expand_jsonl_paths(paths):
        name = dataset_name(p)
        if name in data:
            raise ValueError(f"train_files: two files share the dataset name {name!r} ({p})")
        rows = read_supervised_file(p, require_negative=require_negative)
        instr = instructions.get(name, "")
        if not isinstance(instr, str):
            raise ValueError(f"instructions: expected a string for dataset {name!r}, got {type(instr).__name__}")
        for r in rows:
            r["instruction"] = instr
        data[name] = rows
    unknown = sorted(set(instructions) - set(data))
    if unknown:
        raise ValueError(f"instructions: no training file for dataset(s) {unknown}; datasets: {sorted(data)}")
    return data


def read_instructions(path: str | None) -> dict[str, str]:
    if path is None:
        return {}
    from .config import read_config_file

    try:
        return read_config_file(path, field_names=False)  # dataset names as written ("my-data")
    except ValueError as e:
        raise ValueError(str(e).replace("config:", "instructions:", 1)) from e


def arrange_batches(datasets: dict[str, list], block: int, steps: int, seed: int, length=None) -> list:
    """Examples ordered so that each consecutive ``block`` comes from one dataset.

    Each pass shuffles every dataset, cuts it into whole blocks (the remainder is dropped,
    so no batch mixes datasets or runs short) and shuffles the blocks; passes repeat with
    new seeds until ``steps`` blocks exist. Read sequentially (the Trainer's sampler is
    sequential for these datasets), block ``k`` is optimizer step ``k``'s global batch,
    whatever the number of ranks: each rank takes its consecutive share of the block.

    ``length`` (a function of an example) groups examples of similar length into the same
    block (after the shuffle, a stable sort by length), so padded batches waste little:
    on short, varied texts such as STS-B sentences this cuts the tokens per step about 3x.
    """
    sizes = {k: len(v) for k, v in datasets.items()}
    if all(n < block for n in sizes.values()):
        raise ValueError(
            f"per_device_batch_size: a global batch of {block} texts is larger than every dataset {sizes}; "
            "lower the batch size or add data"
        )
    out: list = []
    rng = random.Random(seed)
    while len(out) < steps * block:
        blocks = []
        for name in sorted(datasets):
            rows = list(datasets[name])
            rng.shuffle(rows)
            if length is not None:
                rows.sort(key=length)
            for i in range(0, len(rows) - block + 1, block):
                blocks.append(rows[i : i + block])
        rng.shuffle(blocks)
        for b in blocks:
            out.extend(b)
    return out[: steps * block]


def sts_train_sentences(max_sentences: int | None = None) -> list[str]:
    """Unique sentences of STS-B train (scores unused), in file order."""
    from ..data import load_sts_benchmark

    seen: dict[str, None] = {}
    for a, b, _ in load_sts_benchmark("train"):
        seen.setdefault(a.strip(), None)
        seen.setdefault(b.strip(), None)
    out = [s for s in seen if s]
    return out[:max_sentences] if max_sentences else out
