"""Two-process DDP (gloo, CPU) SimCSE equals one process on the same global batch.

Cross-rank negatives (all-gather with gradients) make the two ranks' losses the global
batch's loss; DDP averages the gradients; the data arrangement hands each rank its half of
the same global batch. Dropout is off so both runs are deterministic functions of the data,
and the optimizer is SGD (Adam's update ``g / sqrt(v)`` turns rounding noise in tiny
gradients into full-size steps, which would hide a real difference among false ones).
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os

import pytest
import torch

STEPS, GLOBAL_BATCH = 3, 8


def _torchrun_env(rank, world, port):
    """The environment torchrun gives a rank (CPU only); the rendezvous store is the agent's
    (``_launch`` hosts it), every rank a client of it."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world), CUDA_VISIBLE_DEVICES="",
                      TORCHELASTIC_USE_AGENT_STORE="True")


def _launch(target, world, *args):
    """Run ``target(rank, world, port, *args)`` in ``world`` spawned processes, as torchrun
    does: the rendezvous store is hosted here, on a port the OS gives it when it binds (a port
    picked free, closed and bound later by rank 0, after its imports, could be taken in
    between by another test's socket), and each rank connects to it."""
    import torch.distributed as dist

    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=target, args=(r, world, store.port, *args)) for r in range(world)]
    for q in procs:
        q.start()
    _join(procs)
    del store


def _join(procs, timeout=300):
    """Wait for the ranks; kill any still running after ``timeout`` s (a hung rank must fail
    the test, not hold the worker) and report each one's exit code (None: it hung)."""
    import time

    end = time.monotonic() + timeout
    for q in procs:
        q.join(max(0.0, end - time.monotonic()))
    codes = [q.exitcode for q in procs]
    for q in procs:
        if q.exitcode is None:
            q.kill()
            q.join(10)
    assert all(c == 0 for c in codes), f"rank exit codes {codes} (None: still running after {timeout} s)"


def _train(out_dir, per_device, mini_batch_size, result_file):
    torch.set_num_threads(1)
    from llm2vec_fast.training.config import SimCSEConfig, make_config
    from llm2vec_fast.training.pipeline import train_contrastive
    from llm2vec_fast.training.toy import toy_model, toy_texts, toy_tokenizer

    cfg = make_config(SimCSEConfig, dict(
        output_dir=out_dir, max_steps=STEPS, per_device_batch_size=per_device, learning_rate=0.5, optim="sgd", use_lora=False,
        attention_dropout=0.0, temperature=0.2, logging_steps=1, progress=False, max_seq_length=16, seed=7,
        cross_rank=True, mini_batch_size=mini_batch_size, backend="torch", bf16=False,
        max_grad_norm=0.0))  # no clipping: it would hide a constant scale of the gradients
    model, trainer = train_contrastive(toy_model(False, seed=4, initializer_range=0.3), toy_tokenizer(),
                                       toy_texts(64, seed=3), cfg, mode="simcse", save_checkpoints=False)
    losses = {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}
    if trainer.is_world_process_zero():
        torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, result_file + ".pt")
        with open(result_file, "w") as f:
            json.dump({"losses": losses, "rows": trainer._samples}, f)


def _rank_main(rank, world, port, out_dir, mini_batch_size, result_file):
    _torchrun_env(rank, world, port)
    _train(out_dir, GLOBAL_BATCH // world, mini_batch_size, result_file)
    # Tear the gloo group down before the interpreter exits (left to process exit, its threads
    # can be destroyed while still joinable: SIGABRT), after the trainer is freed (see
    # end_distributed: destroyed first, a hang at exit 2 two-rank runs in 21 here).
    from llm2vec_fast.training.pipeline import end_distributed

    end_distributed()


@pytest.mark.parametrize("mini_batch_size", [None, pytest.param(3, marks=pytest.mark.slow)])
def test_two_process_ddp_matches_single_process(tmp_path, mini_batch_size):
    single, ddp = str(tmp_path / "single.json"), str(tmp_path / "ddp.json")
    _launch(_rank_main, 1, str(tmp_path / "s"), mini_batch_size, single)
    _launch(_rank_main, 2, str(tmp_path / "d"), mini_batch_size, ddp)

    a, b = json.load(open(single)), json.load(open(ddp))
    assert a["rows"] == 2 * b["rows"] == STEPS * GLOBAL_BATCH * 2  # two views per sentence
    for s in map(str, range(1, STEPS + 1)):
        assert b["losses"][s] == pytest.approx(a["losses"][s], rel=1e-4, abs=1e-5), (a["losses"], b["losses"])
    pa, pb = torch.load(single + ".pt"), torch.load(ddp + ".pt")
    start = __import__("llm2vec_fast.training.toy", fromlist=["toy_model"]).toy_model(
        False, seed=4, initializer_range=0.3).state_dict()
    moved = 0.0
    for k in pa:
        assert torch.allclose(pa[k], pb[k], rtol=1e-4, atol=1e-5), k
        moved = max(moved, float((pa[k] - start[k]).abs().max()))
    assert moved > 1e-3, "training did not change the weights; the comparison would be vacuous"


def _mntp_eval_rank(rank, world, port, out_dir, result_file):
    """3 MNTP steps (SGD), then evaluate: each rank evaluates its share of the rows."""
    _torchrun_env(rank, world, port)
    torch.set_num_threads(1)
    from llm2vec_fast.training.config import MNTPConfig, make_config
    from llm2vec_fast.training.pipeline import train_mntp
    from llm2vec_fast.training.toy import toy_model, toy_texts, toy_tokenizer

    cfg = make_config(MNTPConfig, dict(
        output_dir=out_dir, max_steps=3, per_device_batch_size=GLOBAL_BATCH // world, learning_rate=0.5, optim="sgd",
        use_lora=False, logging_steps=1, progress=False, max_seq_length=16, seed=3, backend="torch", bf16=False,
        max_grad_norm=0.0))  # no clipping: it would hide a constant scale of the gradients
    texts = toy_texts(80, seed=5)
    _, trainer = train_mntp(toy_model(True, seed=2), toy_tokenizer(), texts[:64], cfg, eval_texts=texts[64:],
                            save_checkpoints=False)
    metrics = [h for h in trainer.state.log_history if "eval_loss" in h][-1]
    metrics["losses"] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    if trainer.is_world_process_zero():
        with open(result_file, "w") as f:
            json.dump(metrics, f)
    del _, trainer
    from llm2vec_fast.training.pipeline import end_distributed

    end_distributed()


def test_two_process_mntp_matches_single_process(tmp_path):
    """MNTP training: the loss is the global batch's labelled-token mean (the ranks' token
    counts differ, so averaging per-rank means did not equal it); evaluation: the set is split
    over the ranks, not run whole on each (the labelled-token count came out times the world
    size), and its masks do not depend on the split."""
    results = {}
    for world in (1, 2):
        res = str(tmp_path / f"eval{world}.json")
        _launch(_mntp_eval_rank, world, str(tmp_path / f"o{world}"), res)
        results[world] = json.load(open(res))
    a, b = results[1], results[2]
    assert len(a["losses"]) == 3 and b["losses"] == pytest.approx(a["losses"], rel=1e-4)
    assert a["eval_labelled_tokens"] == b["eval_labelled_tokens"] > 20
    assert b["eval_loss"] == pytest.approx(a["eval_loss"], rel=1e-4)
    assert b["eval_accuracy"] == pytest.approx(a["eval_accuracy"], abs=1e-6)


def test_end_distributed_frees_ddp_before_destroying_the_group(monkeypatch):
    """The gloo group must not outlive its last Python handle inside a DDP reducer: freed from
    there it is destroyed under the GIL while a worker thread may need the GIL (a hang at exit:
    2 two-rank runs in 21 here, and one CI run). A DDP model left in a reference cycle (as a
    Trainer leaves it) must be gone by the time the group is destroyed."""
    import gc
    import weakref

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from llm2vec_fast.training.pipeline import end_distributed

    if dist.is_initialized():
        pytest.skip("a process group is already set up in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        ddp = DistributedDataParallel(torch.nn.Linear(3, 2))
        ddp(torch.randn(4, 3)).sum().backward()
        cycle = {"ddp": ddp}
        cycle["self"] = cycle
        alive = weakref.ref(ddp)
        del ddp, cycle
        gc.disable()  # only end_distributed may collect the cycle
        seen = []
        real = dist.destroy_process_group
        monkeypatch.setattr(dist, "destroy_process_group", lambda *a, **k: (seen.append(alive() is None), real(*a, **k)))
        end_distributed()
    finally:
        gc.enable()
        if dist.is_initialized():
            dist.destroy_process_group()
    assert seen == [True], "the DDP wrapper (and its reducer) outlived destroy_process_group"
    assert not dist.is_initialized()
    end_distributed()  # no group: a no-op


def test_end_distributed_warns_when_a_ddp_model_is_still_held(monkeypatch):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from llm2vec_fast.training.pipeline import end_distributed

    if dist.is_initialized():
        pytest.skip("a process group is already set up in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    real = dist.destroy_process_group
    try:
        ddp = DistributedDataParallel(torch.nn.Linear(3, 2))
        monkeypatch.setattr(dist, "destroy_process_group", lambda *a, **k: None)  # freed first below
        with pytest.warns(RuntimeWarning, match=r"end_distributed: 1 DistributedDataParallel model\(s\) still"):
            end_distributed()
        del ddp
    finally:
        real()


def _cli_rank(rank, world, port, argv, result_file):
    import warnings

    _torchrun_env(rank, world, port)
    torch.set_num_threads(1)
    import gc

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from llm2vec_fast.cli import main

    real, held = dist.destroy_process_group, []

    def spy(*a, **k):  # DDP models alive when the group goes: their reducers free it later
        held.append(sum(issubclass(type(o), DistributedDataParallel) for o in gc.get_objects()))
        return real(*a, **k)

    dist.destroy_process_group = spy
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        rc = main(argv)
    with open(f"{result_file}.{rank}", "w") as f:
        json.dump({"rc": rc, "group_left": dist.is_initialized(), "ddp_alive_at_destroy": held,
                   "warnings": [str(w.message) for w in seen if "end_distributed" in str(w.message)]}, f)


def test_two_process_train_command_ends_cleanly(tmp_path):
    """``llm2vec-fast mntp`` as torchrun runs it (two ranks): each rank returns 0 with the process
    group destroyed and nothing of the run (a DDP model) left alive to free after it."""
    from llm2vec_fast.training.toy import toy_model, toy_texts, toy_tokenizer

    model_dir = str(tmp_path / "toy")
    toy_model(True, seed=2).save_pretrained(model_dir)
    toy_tokenizer().save_pretrained(model_dir)
    (tmp_path / "t.txt").write_text("\n".join(toy_texts(48, seed=5)) + "\n")
    out = tmp_path / "out"
    argv = ["mntp", "--model-name-or-path", model_dir, "--train-file", str(tmp_path / "t.txt"), "--output-dir",
            str(out), "--max-steps", "2", "--per-device-batch-size", "4", "--max-seq-length", "16", "--no-use-lora",
            "--backend", "torch", "--no-bf16", "--no-progress", "--dtype", "float32"]
    res = str(tmp_path / "res")
    _launch(_cli_rank, 2, argv, res)
    for r in range(2):
        got = json.load(open(f"{res}.{r}"))
        assert got == {"rc": 0, "group_left": False, "ddp_alive_at_destroy": [0], "warnings": []}, (r, got)
    assert (out / "config.json").exists()
