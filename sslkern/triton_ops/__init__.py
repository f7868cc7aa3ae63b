"""Triton kernels, one module per op (imported on first use; needs ``triton``)."""
