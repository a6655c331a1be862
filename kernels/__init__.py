"""Triton kernels, each beside its launcher and a plain PyTorch reference.

Never imports the engine. On CUDA tensors the launchers run compiled kernels; the CPU tests run
the same kernels through Triton's interpreter (``TRITON_INTERPRET=1``, see tests/kernels).
"""
