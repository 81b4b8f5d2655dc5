"""Test setup shared by every test file: one test command for every machine.

Without a CUDA GPU, Triton runs its kernels in interpreter mode, which must be chosen before Triton is
imported (kernels.py reads TRITON_INTERPRET at import). pytest imports this file before any test file.
"""
import os
import shutil

if "TRITON_INTERPRET" not in os.environ:
    # torch.cuda.is_available() would import torch first; nvidia-smi is the cheap, import-free check
    has_gpu = shutil.which("nvidia-smi") is not None and os.path.exists("/dev/nvidiactl")
    if not has_gpu:
        os.environ["TRITON_INTERPRET"] = "1"
