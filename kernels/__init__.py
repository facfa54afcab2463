"""Triton kernels of lora_fast (installed as ``lora_fast.kernels``).

Only ``@triton.jit`` code and its autotune configs live here; launchers, argument checks and
autograd live in the ``lora_fast`` package next to the pure-PyTorch reference.
"""
