"""Backends: code generators and runtimes for a lowered spec (torch reference, Triton kernels)."""
