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


# The lab's speed settings per backend, over DEFAULTS: what `make bench` sets against TRL's own
# defaults (and what a recipe can take into its `train:`). Packing (best-fit decreasing) keeps
# the prompt masked and each sample's attention to itself (position ids); no gradient
# checkpointing while memory allows (no memory model yet). The GPU rows are the best hand-tuned
# TRL configuration measured on an H100 (../shared/notes/platform.md), unverified by the lab.
SPEED: dict[str, dict] = {
    # Packing measured slower on CPU (the block-diagonal SDPA mask of long packed rows costs more
    # than the padding it saves on a small model): only checkpointing goes.
    "cpu": {"train": {"gradient_checkpointing": False}, "attn_implementation": "sdpa"},
    "cuda": {"train": {"packing": True, "packing_strategy": "bfd", "gradient_checkpointing": False,
                       "per_device_train_batch_size": 16, "max_length": 2048},
             "attn_implementation": "flex_attention"},
    "rocm": {"train": {"packing": True, "packing_strategy": "bfd", "gradient_checkpointing": False,
                       "per_device_train_batch_size": 16, "max_length": 2048},
             "attn_implementation": "sdpa"},
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


def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def doctor(hw: str = "auto") -> dict:
    """What the lab sees here and what HW=auto (or `hw`) would pick: `lab doctor` prints it."""
    from lab.manifest import hardware

    backend = resolve_backend(hw)
    seen = hardware(backend)
    attention, kernels = {"eager": True}, {}
    try:
        import torch
    except ImportError:  # a host that only drives containers
        torch = None
    if torch is not None:
        gpu = torch.cuda.is_available()
        seen["torch"] = torch.__version__
        seen["bf16"] = bool(gpu and torch.cuda.is_bf16_supported()) if backend != "cpu" else None
        attention["sdpa"] = hasattr(torch.nn.functional, "scaled_dot_product_attention")
        attention["flex_attention"] = _installed("torch.nn.attention.flex_attention")
        try:
            from transformers.utils import is_flash_attn_2_available

            attention["flash_attention_2"] = bool(gpu and is_flash_attn_2_available())
        except ImportError:
            attention["flash_attention_2"] = False
        # Liger's kernels are Triton programs: a GPU (CUDA or ROCm) and the package.
        kernels["liger_kernel"] = bool(gpu and _installed("liger_kernel"))
        kernels["triton"] = bool(gpu and _installed("triton"))
    return {**seen, "attention": attention, "kernels": kernels, "defaults": DEFAULTS[backend]}
