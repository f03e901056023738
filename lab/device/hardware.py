"""Hardware as data: what each backend needs, in one table instead of branches.

Each row is merged under the recipe (the recipe's own keys and `hw.<backend>` overlay win).
"""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

BACKENDS = ("cpu", "cuda", "rocm")

DEFAULTS: dict[str, dict] = {
    # transformers refuses bf16 autocast on a CPU-only run unless told it is one.
    "cpu": {"train": {"use_cpu": True, "bf16": False}, "env": {}},
    # GPUs: bf16 or fp16 mixed precision is decided from the device (lab/device/capability.py).
    "cuda": {"train": {}, "env": {}},
    # SDPA on gfx1151 needs AOTriton's experimental kernels (docs/platform.md: AMD gfx1151).
    "rocm": {"train": {}, "env": {"TORCH_ROCM_AOTRITON_ENABLE_EXPERIMENTAL": "1"}},
}


# What the lab's speed plan (lab/device/speed.py) may choose per backend, over DEFAULTS; a recipe's own
# `train:` keys always win. `attention`: preference order, the first usable one is taken.
# `packing`: TRL's best-fit decreasing when the data allow it. `liger`: Liger's fused kernels where
# installed. `dense_mask_attention`: implementations that, given packed rows, keep every head's
# scores (measured for SDPA on an H100; not on CPU, whose SDPA kernel takes the mask as it is).
# `train`: SFTConfig keys as (value, why). Checkpointing and the micro-batch come from a memory
# estimate, not from this table. The GPU rows follow the best hand-tuned TRL configuration measured
# on an H100 (docs/platform.md): unverified by the lab on a GPU.
GPU_TRAIN = {
    "optim": ("adamw_torch_fused", "fused AdamW: the same update in one kernel (+2 to +13% on an H100)"),
    # H100, LoRA: +17% steady tokens/s, but compiling took ~2 minutes (it pays after ~1,500 steps of
    # 16 x 2048) and Liger's kernels logged compile errors under it; full fine-tuning was 4% slower.
    "torch_compile": (False, "pays only on long LoRA runs, and clashed with Liger's kernels on an H100; "
                             "set train.torch_compile: true to try"),
}
SPEED: dict[str, dict] = {
    # Packing measured 0.3-0.4x on CPU: attention over full packed rows with an explicit mask
    # takes 81 % of a step (docs/benchmarks.md).
    "cpu": {"attention": ["sdpa"], "packing": False, "liger": False, "train": {}},
    # flex_attention and FlashAttention's varlen kernels take packed rows without a dense mask.
    "cuda": {"attention": ["flash_attention_2", "flex_attention", "sdpa"], "packing": True, "liger": True,
             "dense_mask_attention": ["sdpa", "eager"], "train": {**GPU_TRAIN}},
    # gfx1151: SDPA through AOTriton is what is known to work; FlashAttention is inference-only there.
    "rocm": {"attention": ["sdpa"], "packing": True, "liger": True, "dense_mask_attention": ["sdpa", "eager"],
             "train": {**GPU_TRAIN}},
}


# Serving one model over several machines (vLLM on a Ray cluster): why a backend cannot; absent: it can.
NO_RAY_SERVING: dict[str, str] = {
    "cpu": "vLLM's CPU backend does not run on Ray (vLLM 0.32 refuses: 'current platform cpu does not support ray')",
}


def detect_backend() -> str:
    """HW=auto: what torch can see (ROCm builds report through torch.cuda too); without torch
    (a host that trains in containers), what the host's drivers expose."""
    try:
        import torch
    except ImportError:
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

    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a dotted name whose parent is missing
        return False


def gpu_usable(backend: str) -> bool:
    """A GPU backend whose torch sees a device."""
    if backend == "cpu":
        return False
    import torch

    return torch.cuda.is_available()


def attention_usable(name: str, backend: str) -> bool:
    """Can a model load with attn_implementation=name here (package present, device able)?"""
    if name in ("eager", "sdpa"):
        return True
    if name == "flex_attention":  # compiled Triton kernels: a GPU and a C compiler
        return kernel_usable("torch.nn.attention.flex_attention", backend)
    if name == "flash_attention_2":
        try:
            from transformers.utils import is_flash_attn_2_available
        except ImportError:
            return False
        if not (gpu_usable(backend) and is_flash_attn_2_available()):
            return False
        import torch

        from lab.device.capability import FLASH_ATTENTION_MIN_SM

        major, minor = torch.cuda.get_device_capability()
        return backend == "cuda" and major * 10 + minor >= FLASH_ATTENTION_MIN_SM
    return False


def kernel_usable(name: str, backend: str) -> bool:
    """Liger's kernels (and Triton itself) are Triton programs: a GPU, CUDA or ROCm, the package, and
    a C compiler (Triton builds its launcher with one at the first kernel; slim images have none)."""
    import shutil

    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    return bool(compiler) and gpu_usable(backend) and _installed(name)


def amd_host(root: str = "/") -> dict | None:
    """What an AMD GPU host needs beyond drivers (docs/platform.md: AMD gfx1151): the kernel, how much
    memory the GPU may map (GTT; by default about half of RAM on an APU), and the device groups."""
    import platform
    from pathlib import Path

    base = Path(root)
    if not (base / "dev/kfd").exists():
        return None
    gtt = {p.parent.parent.name: round(int(p.read_text().strip()) / 2**30, 1)
           for p in sorted(base.glob("sys/class/drm/card*/device/mem_info_gtt_total"))}
    mine = {_group_name(g) for g in os.getgroups()}
    missing = [] if os.getuid() == 0 else [g for g in ("video", "render") if g not in mine]
    notes = [f"add this user to the {' and '.join(missing)} group(s)"] if missing else []
    notes.append("gfx1151 wants Linux >= 6.18.4 (Ubuntu: HWE >= 6.17.0-19 or OEM >= 6.14.0-1018); "
                 "raise GTT with `amd-ttm --set <GB>` if the model needs more than shown")
    return {"kernel": platform.release(), "gtt_gib": gtt, "groups_missing": missing, "notes": notes}


def amd_arch(root: str = "/") -> str | None:
    """The AMD GPU architecture (gfx1151, gfx942, gfx90a, ...) from the kernel driver's topology,
    which needs no ROCm userspace: `make setup` and `make images` pick torch's device wheels by it.
    gfx_target_version is major*10000 + minor*100 + stepping (90010 -> gfx90a, 110501 -> gfx1151)."""
    from pathlib import Path

    found = []
    for props in sorted(Path(root).glob("sys/class/kfd/kfd/topology/nodes/*/properties")):
        for line in props.read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "gfx_target_version" and value.strip().isdigit() and int(value) > 0:  # 0: a CPU node
                v = int(value)
                found.append(f"gfx{v // 10000}{v // 100 % 100:x}{v % 100:x}")
    return found[0] if found else None


def gpu_arch() -> tuple[str, str]:
    """(AMD architecture, why): GPU_ARCH if set, else this host's GPU, else gfx1151 (Strix Halo).
    The one name for it: make setup, make images, compose (lab-train:rocm-<arch>) and doctor."""
    if os.environ.get("GPU_ARCH"):
        return os.environ["GPU_ARCH"], "set by GPU_ARCH"
    if arch := amd_arch():
        return arch, "read from the amdgpu driver's topology (/sys/class/kfd)"
    return "gfx1151", "no AMD GPU seen here: the default, Strix Halo"


def _group_name(gid: int) -> str | None:
    import grp

    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gib() -> float | None:
    try:
        kib = int(Path("/proc/meminfo").read_text().split("MemTotal:")[1].split()[0])
        return round(kib / 2**20, 1)
    except (OSError, IndexError, ValueError):
        return None


def host(backend: str) -> dict:
    """What a run ran on: CPU, memory, torch's CUDA/HIP, the GPUs and the driver (in every manifest)."""
    info = {"backend": backend, "cpu": _cpu_model(), "cpu_count": os.cpu_count(), "memory_gib": _memory_gib(),
            "devices": []}
    try:
        import torch
    except ImportError:
        return info
    info.update(torch_cuda=torch.version.cuda, torch_hip=getattr(torch.version, "hip", None))
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            arch = getattr(p, "gcnArchName", None) or f"sm_{p.major}{p.minor}"
            info["devices"].append({"name": p.name, "memory_gib": round(p.total_memory / 2**30, 1), "arch": arch})
        try:  # NVIDIA's driver version; ROCm reports its own through torch.version.hip
            out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20)
            info["driver"] = out.stdout.split()[0] if out.returncode == 0 and out.stdout.strip() else None
        except (OSError, subprocess.TimeoutExpired):
            pass
    return info
