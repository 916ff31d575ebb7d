"""Triton kernels of fused_contrastive, installed as ``fused_contrastive.triton_kernels``.

Importing this package never requires Triton itself; each kernel module imports
it when it is loaded, so the package stays importable on machines without Triton.
"""
