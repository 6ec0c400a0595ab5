"""Kernel tests: on a CPU-only machine the Triton kernels run on CPU tensors under
TRITON_INTERPRET=1 (set here, before triton.jit decorates anything); on a GPU machine the same
tests run the compiled kernels on CUDA tensors and sweep every shape."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
