"""Hardware as data: what each backend needs, in one table instead of branches.

Each row is merged under the recipe (the recipe's own keys and `hw.<backend>` overlay win).
"""

from __future__ import annotations

BACKENDS = ("cpu", "cuda", "rocm")

DEFAULTS: dict[str, dict] = {
    # transformers refuses bf16 autocast on a CPU-only run unless told it is one.
    "cpu": {"train": {"use_cpu": True, "bf16": False}, "env": {}},
    "cuda": {"train": {"bf16": True}, "env": {}},
    # SDPA on gfx1151 needs AOTriton's experimental kernels (../shared notes: rocm-gfx1151).
    "rocm": {"train": {"bf16": True}, "env": {"TORCH_ROCM_AOTRITON_ENABLE_EXPERIMENTAL": "1"}},
}


def detect_backend() -> str:
    """HW=auto: what torch can see (ROCm builds report through torch.cuda too); without torch
    (a host that trains in containers), what the host's drivers expose."""
    try:
        import torch
    except ImportError:
        import os
        import shutil

        return "cuda" if shutil.which("nvidia-smi") else "rocm" if os.path.exists("/dev/kfd") else "cpu"
    if torch.cuda.is_available():
        return "rocm" if getattr(torch.version, "hip", None) else "cuda"
    return "cpu"


def resolve_backend(hw: str) -> str:
    """HW=auto|cpu|cuda|rocm -> a backend, or the one-line error."""
    from lab.errors import LabError

    backend = detect_backend() if hw == "auto" else hw
    if backend not in BACKENDS:
        raise LabError(f"HW={hw!r} is not one of auto, {', '.join(BACKENDS)}")
    return backend
