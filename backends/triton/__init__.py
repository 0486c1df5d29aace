"""The Triton backend: fused kernels generated from templates."""
