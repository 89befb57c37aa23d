"""Build hook for the optional CUDA C++ extension in csrc/.

Nothing is compiled unless LLM2VEC_FAST_BUILD_CUDA=1 is set: a plain
``pip install -e .`` on a machine without CUDA needs no compiler. Without the
extension, a CUDA machine JIT-builds the same sources on first use
(llm2vec_fast/kernels/cuda.py).
"""
import os

from setuptools import setup

ext_modules = []
cmdclass = {}
if os.environ.get("LLM2VEC_FAST_BUILD_CUDA", "0") == "1":
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    ext_modules.append(
        CUDAExtension(
            name="llm2vec_fast._C",
            sources=["csrc/bindings.cpp", "csrc/pool.cu"],
            extra_compile_args={
                "cxx": ["-O3", "-std=c++20"],
                "nvcc": [
                    "-O3",
                    "-std=c++17",
                    "-gencode=arch=compute_80,code=sm_80",
                    "-gencode=arch=compute_90,code=sm_90",
                ],
            },
        )
    )
    cmdclass["build_ext"] = BuildExtension

setup(ext_modules=ext_modules, cmdclass=cmdclass)
