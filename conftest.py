"""Test setup shared by every test file: one test command for every machine.

Without a CUDA GPU, Triton runs its kernels in interpreter mode, which must be chosen before Triton
is imported (nanoelastic_kernels.py reads TRITON_INTERPRET at import). pytest imports this file
before any test file.
"""
import os
import shutil

import pytest


def has_nvidia_gpu() -> bool:
    """An import-free check (torch.cuda.is_available() would set CUDA up in pytest's process before
    any test asks for it): nvidia-smi, and the driver's device (/dev/dxg: under WSL2)."""
    return shutil.which("nvidia-smi") is not None and any(
        os.path.exists(device) for device in ("/dev/nvidiactl", "/dev/dxg"))


if "TRITON_INTERPRET" not in os.environ and not has_nvidia_gpu():
    os.environ["TRITON_INTERPRET"] = "1"


def pytest_configure(config):
    """Triton 3.6's interpreter turns 1-element arrays into loop bounds with int(), which numpy 2.4
    and later refuse: every kernel test would fail with a TypeError. Say so once instead."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    try:
        import triton
    except ImportError:
        return
    import numpy
    version = lambda v: tuple(int(p) for p in v.split(".")[:2])
    if version(triton.__version__) <= (3, 6) and version(numpy.__version__) >= (2, 4):
        raise pytest.UsageError(f"Triton {triton.__version__}'s interpreter (no GPU here) fails "
                                f"with numpy {numpy.__version__}: pip install 'numpy<2.4', "
                                "or a newer Triton")
