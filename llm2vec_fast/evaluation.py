"""STS-Benchmark evaluation: Spearman correlation (x100) of cosine similarities with gold scores.

Offline: the data come from :func:`llm2vec_fast.data.load_sts_benchmark`.
"""
from __future__ import annotations

import numpy as np
import torch

from .data import SPLITS, load_sts_benchmark


def sts_pairs(split: str = "test", max_pairs: int | None = None) -> list[tuple[str, str, float]]:
    """Rows ``(sentence1, sentence2, score)``; ``max_pairs`` keeps the first N rows of the
    file (a fixed subset, the same on every call, so scores are comparable across runs)."""
    if split not in SPLITS:
        raise ValueError(f"split: expected one of {list(SPLITS)}, got {split!r}")
    if max_pairs is not None and not (isinstance(max_pairs, int) and max_pairs >= 2):
        raise ValueError(f"max_pairs: expected None or an int >= 2 (Spearman needs two pairs), got {max_pairs!r}")
    rows = load_sts_benchmark(split)
    return rows[:max_pairs] if max_pairs is not None else rows


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of a 1-D array; tied values get the mean of their ranks (as
    ``scipy.stats.rankdata(x, method="average")``)."""
    order = np.argsort(x, kind="mergesort")
    inv = np.empty(x.size, dtype=np.intp)
    inv[order] = np.arange(x.size, dtype=np.intp)
    xs = x[order]
    new_value = np.r_[True, xs[1:] != xs[:-1]]
    dense = new_value.cumsum()[inv]  # 1-based index of each value's tie group
    starts = np.r_[np.nonzero(new_value)[0], x.size]  # where each group starts (0-based), then the end
    return 0.5 * (starts[dense] + starts[dense - 1] + 1)


def spearman(x, y) -> float:
    """Spearman rank correlation of two equally long 1-D sequences, in numpy (no scipy):
    the Pearson correlation of their average ranks (ties get the mean of their ranks).

    Like ``scipy.stats.spearmanr(x, y).statistic`` (the same value, to the last bit): NaN
    when either input holds a NaN, is constant, or has fewer than two values.
    """
    a = np.asarray(x, dtype=np.float64)
    b = np.asarray(y, dtype=np.float64)
    if a.ndim != 1 or b.ndim != 1 or a.shape != b.shape:
        raise ValueError(f"spearman: expected two 1-D sequences of the same length, got shapes "
                         f"{a.shape} and {b.shape}")
    if a.size < 2 or (a[0] == a).all() or (b[0] == b).all() or np.isnan(a).any() or np.isnan(b).any():
        return float("nan")
    r = np.corrcoef(np.stack([_average_ranks(a), _average_ranks(b)]))[1, 0]
    return float(r)


def spearman_x100(sims, gold) -> float:
    """Spearman rank correlation x100 (:func:`spearman`; equals ``scipy.stats.spearmanr``)."""
    return spearman(sims, gold) * 100.0


def evaluate_sts(
    encoder,
    split: str = "test",
    max_pairs: int | None = None,
    batch_size: int = 32,
    *,
    instruction: str = "",
    show_progress_bar: bool = False,
    return_details: bool = False,
):
    """STS-B Spearman x100 of ``encoder``'s cosine similarities.

    Args:
        encoder: anything with ``encode(sentences, batch_size=..., show_progress_bar=...,
            convert_to_tensor=True)`` returning ``(N, C)`` (an :class:`llm2vec_fast.LLM2Vec`).
        split: ``"train"``, ``"dev"`` or ``"test"`` (1379 pairs, 2758 sentences).
        max_pairs: evaluate the first N pairs only (a fixed, documented subset).
        batch_size: texts per forward pass.
        instruction: optional instruction paired with every sentence (excluded from pooling).
        return_details: return ``dict(spearman=..., n_pairs=..., n_sentences=..., sims=list)``
            instead (``n_sentences``: the unique sentences embedded).

    Returns the score as a float (e.g. 37.15). Each unique sentence is embedded once.
    """
    rows = sts_pairs(split, max_pairs)
    uniq: dict[str, int] = {}
    for a, b, _ in rows:
        uniq.setdefault(a, len(uniq))
        uniq.setdefault(b, len(uniq))
    texts = list(uniq)
    inputs = [[instruction, t] for t in texts] if instruction else texts
    emb = encoder.encode(inputs, batch_size=batch_size, show_progress_bar=show_progress_bar, convert_to_tensor=True)
    emb = torch.as_tensor(emb).double()  # fp64 cosines: near-ties rank the same on every machine
    emb = torch.nn.functional.normalize(emb, dim=-1)
    ia = torch.tensor([uniq[a] for a, _, _ in rows])
    ib = torch.tensor([uniq[b] for _, b, _ in rows])
    sims = (emb[ia] * emb[ib]).sum(-1).tolist()
    score = spearman_x100(sims, [s for _, _, s in rows])
    if return_details:
        return dict(spearman=score, n_pairs=len(rows), n_sentences=len(texts), sims=sims)
    return score
