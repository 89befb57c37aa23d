"""Triton kernels and their host launchers. Importing this package imports triton."""
