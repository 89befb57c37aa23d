"""Cross-rank negatives on a two-process gloo group (CPU) equal one process on the whole batch.

Each rank holds half of the queries, positives and hard negatives; with ``cross_rank=True``
it scores its queries against the documents and negatives of *every* rank
(``all_gather_with_grad``) with labels offset by ``rank * B_local``. Then:

- loss: rank r's loss is the mean over its own rows, so the mean of the rank losses is the
  mean over all rows, i.e. the single-process loss on the concatenated batch (both for the
  one-directional and the symmetric loss, whose document->query term gathers the queries).
- gradients: ``all_gather_with_grad``'s backward all-reduces (sums) the gradient of the
  gathered tensor, so rank r's hidden states receive ``sum_k dL_k / dh_r``, i.e. the
  gradient of ``sum_k L_k = world x mean_k L_k = world x L_single``. Each rank's gradient is
  therefore exactly ``world_size x`` the single-process gradient of its shard; DDP then
  averages gradients over ranks (divides by ``world_size``), which restores the
  single-process gradient. The test asserts the ``world_size x`` factor precisely.

Both the reference path (``backend="torch"``) and the fast pooling path (``backend="triton"``,
interpreted on the CPU when ``TRITON_INTERPRET=1``; its loss is the reference's, which owns the
gather) are checked. The workers are this file run as a script (two subprocesses), so
nothing depends on pickling test functions.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

WORLD = 2
B_LOCAL, M_LOCAL, T, C = 3, 2, 11, 24
CASES = [dict(symmetric=False, neg=False, pooling="mean"), dict(symmetric=True, neg=True, pooling="weighted_mean")]


def _backends():
    return ["torch", "triton"] if os.environ.get("TRITON_INTERPRET") == "1" else ["torch"]


def full_batch():
    """The whole (both ranks') batch, identical in every process (fixed seed)."""
    g = torch.Generator().manual_seed(1234)

    def part(n):
        h = torch.randn(n, T, C, generator=g)
        m = torch.rand(n, T, generator=g) > 0.3
        m[:, 0] = True
        e = torch.rand(n, T, generator=g) > 0.2
        return h, m, e

    return part(WORLD * B_LOCAL), part(WORLD * B_LOCAL), part(WORLD * M_LOCAL)


def run_case(parts, case, backend, rows=None):
    """Loss and d hidden for the rows ``rows`` (a (q/d slice, neg slice) pair) or the whole batch."""
    import llm2vec_fast as L

    sl = rows or (slice(None), slice(None))
    (hq, mq, eq), (hd, md, ed), (hn, mn, en) = parts
    hq, hd, hn = (hq[sl[0]].clone().requires_grad_(), hd[sl[0]].clone().requires_grad_(),
                  hn[sl[1]].clone().requires_grad_())
    neg = case["neg"]
    loss = L.pooled_info_nce(
        hq, mq[sl[0]], hd, md[sl[0]], embed_mask_q=eq[sl[0]], embed_mask_d=ed[sl[0]],
        hidden_neg=hn if neg else None, mask_neg=mn[sl[1]] if neg else None,
        embed_mask_neg=en[sl[1]] if neg else None, temperature=0.05, pooling=case["pooling"],
        symmetric=case["symmetric"], cross_rank=rows is not None, backend=backend,
    )
    loss.backward()
    grads = [hq.grad, hd.grad] + ([hn.grad] if neg else [])
    return float(loss.detach()), [g.tolist() for g in grads]


def _worker(rank: int, init_file: str, out_file: str):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    parts = full_batch()
    rows = (slice(rank * B_LOCAL, (rank + 1) * B_LOCAL), slice(rank * M_LOCAL, (rank + 1) * M_LOCAL))
    res = {}
    for backend in _backends():
        for i, case in enumerate(CASES):
            res[f"{backend}-{i}"] = run_case(parts, case, backend, rows)
    # ranks with different counts of hard negatives (rank 1 drops one): a ValueError on every
    # rank, before any gather (gloo aborted one process; NCCL may hang or mix rows)
    uneven = (rows[0], slice(rows[1].start, rows[1].stop - rank))
    try:
        run_case(parts, CASES[1], "torch", uneven)
        res["uneven"] = "no error"
    except ValueError as e:
        res["uneven"] = str(e)
    dist.destroy_process_group()
    with open(out_file, "w") as f:
        json.dump(res, f)


def test_cross_rank_equals_single_process(tmp_path):
    pytest.importorskip("torch.distributed")
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed unavailable")
    init = tmp_path / "init"
    here = os.path.abspath(__file__)
    procs = [
        subprocess.Popen([sys.executable, here, str(r), str(init), str(tmp_path / f"rank{r}.json")],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         cwd=os.path.dirname(here))
        for r in range(WORLD)
    ]
    for r, p in enumerate(procs):
        try:
            out, _ = p.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            for q in procs:  # a hung rank fails the test; it must not outlive it
                q.kill()
                q.communicate()
            pytest.fail(f"rank {r} still running after 300 s")
        assert p.returncode == 0, f"rank {r} failed:\n{out[-4000:]}"
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    for rk in ranks:
        assert rk["uneven"].startswith("cross_rank: every rank must pass the same number") and \
            "rank 1: 3 queries, 1 negatives" in rk["uneven"], rk["uneven"]
    parts = full_batch()
    for backend in _backends():
        for i, case in enumerate(CASES):
            key = f"{backend}-{i}"
            loss1, grads1 = run_case(parts, case, backend)
            losses = [rk[key][0] for rk in ranks]
            assert abs(sum(losses) / WORLD - loss1) <= 1e-5 * max(1.0, abs(loss1)), (key, losses, loss1)
            for which, g1 in enumerate(grads1):
                g1 = torch.tensor(g1)
                n_local = M_LOCAL if which == 2 else B_LOCAL
                scale = float(g1.abs().max())
                for r in range(WORLD):
                    got = torch.tensor(ranks[r][key][1][which])
                    want = WORLD * g1[r * n_local : (r + 1) * n_local]  # all-reduce sum => world x
                    err = float((got - want).abs().max())
                    assert err <= 1e-5 * scale + 1e-7, f"{key} grad {which} rank {r}: {err:.3e} (scale {scale:.3e})"
                    # ...and not the unscaled gradient: the factor is real, not a tolerance artefact.
                    assert float((got - want / WORLD).abs().max()) > 0.1 * scale


def test_cross_rank_without_a_group_is_local_and_warns_when_world_size_says_otherwise(monkeypatch):
    """No initialised group: the local loss (documented). With WORLD_SIZE > 1 in the
    environment that silently dropped every other rank's negatives; now a one-time warning."""
    import warnings

    import llm2vec_fast as L
    from llm2vec_fast.kernels import reference as ref

    q, d = torch.randn(4, 8), torch.randn(4, 8)
    local = L.info_nce(q, d, backend="torch")
    monkeypatch.setattr(ref, "_WARNED_NO_GROUP", [])
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(L.info_nce(q, d, backend="torch", cross_rank=True), local)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.warns(RuntimeWarning, match="no initialised torch.distributed group"):
        assert torch.equal(L.info_nce(q, d, backend="torch", cross_rank=True), local)


if __name__ == "__main__":  # worker: python tests/test_info_nce_distributed.py RANK INIT_FILE OUT_FILE
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    _worker(int(sys.argv[1]), sys.argv[2], sys.argv[3])
