"""Kernels: the pure-PyTorch references, the Triton kernels and the CUDA C++ loader."""
