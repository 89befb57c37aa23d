"""Compile every CUDA C++ source in csrc/ without a GPU, so a file that does not compile cannot land.

- each ``csrc/*.cu`` with ``nvcc -c`` for sm_80 and sm_90 and ``-Xptxas -v``; fails on errors and
  on any register spill ptxas reports (the kernels are bandwidth-bound loops: a spill is a bug);
- ``csrc/bindings.cpp`` with the host compiler, ``-std=c++20``, against torch's include paths
  (object code only: linking needs a CUDA torch, which only the GPU machine has).

Skips when nvcc (or a host C++ compiler) is absent. The two compilers run concurrently.
Reading: /work/shared/docs/CUDA_BUILD.md (why the kernels and the torch binding are split).
"""
from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sysconfig

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
NVCC = shutil.which("nvcc") or (os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc") if os.environ.get("CUDA_HOME") else None)
CXX = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")


def _nvcc_cmd(src, obj):
    return [NVCC, "-c", src, "-o", obj, "-std=c++17", "-O3",
            "-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90", "-Xptxas", "-v"]


def _cxx_cmd(src, obj):
    from torch.utils.cpp_extension import include_paths

    incs = [f"-I{p}" for p in include_paths()] + [f"-I{sysconfig.get_paths()['include']}"]
    # -O0: the check is that it compiles; parsing torch's headers dominates either way.
    return [CXX, "-c", src, "-o", obj, "-std=c++20", "-O0", "-fPIC", "-DTORCH_EXTENSION_NAME=_C", *incs]


def test_sources_exist():
    assert glob.glob(os.path.join(CSRC, "*.cu")), "no .cu files in csrc/"
    assert os.path.exists(os.path.join(CSRC, "bindings.cpp"))


@pytest.mark.skipif(NVCC is None, reason="nvcc not found")
@pytest.mark.skipif(CXX is None, reason="no host C++ compiler")
def test_csrc_compiles(tmp_path):
    pytest.importorskip("torch.utils.cpp_extension")
    procs = []
    for src in sorted(glob.glob(os.path.join(CSRC, "*.cu"))):
        obj = str(tmp_path / (os.path.basename(src) + ".o"))
        procs.append(("nvcc", src, subprocess.Popen(_nvcc_cmd(src, obj), stdout=subprocess.PIPE,
                                                    stderr=subprocess.STDOUT, text=True)))
    src = os.path.join(CSRC, "bindings.cpp")
    procs.append(("c++", src, subprocess.Popen(_cxx_cmd(src, str(tmp_path / "bindings.o")), stdout=subprocess.PIPE,
                                               stderr=subprocess.STDOUT, text=True)))
    failures = []
    for tool, src, p in procs:
        out, _ = p.communicate(timeout=600)
        name = os.path.basename(src)
        if p.returncode != 0:
            failures.append(f"{tool} {name} failed:\n{out[-6000:]}")
            continue
        if tool == "nvcc":
            spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", out)
            assert spills, f"ptxas printed no resource usage for {name}:\n{out[-2000:]}"
            bad = [s for s in spills if s != ("0", "0")]
            if bad:
                failures.append(f"{name}: register spills {bad}\n{out[-4000:]}")
            # Both targets were built: ptxas reports each kernel once per architecture.
            for arch in ("sm_80", "sm_90"):
                if f"for '{arch}'" not in out:
                    failures.append(f"{name}: no ptxas report for {arch}")
    assert not failures, "\n\n".join(failures)
