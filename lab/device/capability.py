"""Capabilities: what the device in hand can run, decided from the device, never assumed.

One GPU overlay serves an H100 and a T4, an MI300X and a Strix Halo APU; what differs between
them is data: `DEVICES` holds representative devices with their documented capabilities, and
`detect` reads the same facts from the device torch sees. `decide` turns a recipe into the
settings that device runs (precision and weight dtype; `model.dtype: auto` means "the device's
best": its native half precision, over float32 master weights for full fine-tuning), each with
its reason; `unsupported` names any setting a device cannot run, and a test
holds every shipped recipe to it for every device in the table. `gpu_missing` says, in one
line, why a GPU backend sees no GPU (driver, container toolkit, /dev/kfd group).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

from lab.errors import LabError


@dataclass(frozen=True)
class Device:
    name: str
    backend: str              # cpu | cuda | rocm
    arch: str | None          # sm_XY (NVIDIA compute capability) or gfxNNNN (AMD ISA)
    bf16: bool                # native bfloat16 arithmetic (not emulated)
    memory_gib: float | None = None

    def record(self) -> dict:
        return asdict(self)


# Documented capabilities: NVIDIA's compute-capability table (bf16 from sm_80, Ampere), AMD's
# ISA list (CDNA2/3 and RDNA3/3.5 compute in bf16). Memory is the usual part's.
DEVICES: dict[str, Device] = {
    "H100": Device("NVIDIA H100 80GB HBM3", "cuda", "sm_90", True, 80.0),
    "A100": Device("NVIDIA A100-SXM4-80GB", "cuda", "sm_80", True, 80.0),
    "L4": Device("NVIDIA L4", "cuda", "sm_89", True, 24.0),
    "T4": Device("Tesla T4", "cuda", "sm_75", False, 16.0),
    # Volta: PyTorch's CUDA 13 builds (the lab's CUDA image) carry no sm_70 kernels; `detect` refuses
    # it there in one line; the cuda12 lock's build (PyTorch 2.9, CUDA 12.8) carries them
    "V100": Device("Tesla V100-SXM2-32GB", "cuda", "sm_70", False, 32.0),
    "MI300X": Device("AMD Instinct MI300X", "rocm", "gfx942", True, 192.0),
    "MI250X": Device("AMD Instinct MI250X", "rocm", "gfx90a", True, 64.0),
    "gfx1151": Device("AMD Radeon 8060S (Strix Halo, gfx1151)", "rocm", "gfx1151", True, 96.0),
    "cpu": Device("CPU", "cpu", None, False, None),
}

HALF = ("bfloat16", "float16")
# Why full fine-tuning needs float32 weights: AdamW's step is about the learning rate, and a
# bfloat16 weight keeps 8 significant bits (tests/test_capability.py measures it).
ROUNDED_AWAY = ("AdamW updates near the learning rate round away in half-precision weights (at 1e-5, 84 % "
                "of N(0, 0.02) bfloat16 weights stay unchanged)")

# flash-attn 2 runs on Ampere and newer (its README: sm_80+); the lab offers it on CUDA only.
FLASH_ATTENTION_MIN_SM = 80


def sm(device: Device) -> int | None:
    return int(device.arch[3:]) if device.arch and device.arch.startswith("sm_") else None


def gpu_missing(backend: str, root: str = "/") -> str:
    """Why torch sees no GPU on a cuda/rocm backend, naming the fix (driver, toolkit, group)."""
    dev = Path(root) / "dev"
    if backend == "cuda":
        if not (dev / "nvidiactl").exists() and not list(dev.glob("nvidia[0-9]*")):
            return ("no NVIDIA device is visible (/dev/nvidia* missing): on the host, install the NVIDIA driver "
                    "(>= 580 for CUDA 13); in a container, the NVIDIA Container Toolkit "
                    "(`nvidia-ctk runtime configure --runtime=docker`, then restart Docker) and a GPU request "
                    "(compose's deploy.resources, `docker run --gpus all`)")
        return (f"NVIDIA devices are present but CUDA does not start ({_cuda_error()}): the driver may be older "
                "than this CUDA 13 build needs (>= 580; `nvidia-smi` shows it), or a GPU is in use by MIG/another mode")
    if backend == "rocm":
        kfd = dev / "kfd"
        if not kfd.exists():
            return ("no /dev/kfd: the amdgpu kernel driver is not loaded on the host, or the container was started "
                    "without --device /dev/kfd --device /dev/dri")
        if not os.access(kfd, os.R_OK | os.W_OK):
            gid = kfd.stat().st_gid
            return (f"no read/write access to /dev/kfd (group {gid}): add that group to this user "
                    f"(`usermod -aG render,video $USER`), or to the container (LAB_RENDER_GID={gid}; "
                    "`make ... RUNTIME=docker` sets it)")
        return ("/dev/kfd is accessible but HIP finds no GPU: this torch build may lack kernels for the GPU "
                "(GPU_ARCH, `lab doctor`), or the kernel is too old for it (gfx1151: Linux >= 6.18.4)")
    return ""


def _cuda_error() -> str:
    try:
        import torch

        torch.cuda.init()
    except Exception as e:  # noqa: BLE001 - the driver's own words are the useful part
        return str(e).strip().splitlines()[0][:200]
    return "torch.cuda.is_available() is False"


def detect(backend: str) -> Device:
    """The device this process trains on (the first GPU; all of one node are alike in practice)."""
    if backend == "cpu":
        import platform

        return Device(platform.processor() or platform.machine() or "CPU", "cpu", None, False, None)
    import torch

    if not torch.cuda.is_available():
        raise LabError(f"HW={backend}: {gpu_missing(backend)}")
    p = torch.cuda.get_device_properties(0)
    arch = p.gcnArchName.split(":")[0] if backend == "rocm" else f"sm_{p.major}{p.minor}"
    check_built_for(p.name, arch, torch.cuda.get_arch_list(), torch.version.cuda or torch.version.hip)
    return Device(p.name, backend, arch, bool(torch.cuda.is_bf16_supported(including_emulation=False)),
                  round(p.total_memory / 2**30, 1))


def built_for(arch: str, arch_list: list[str]) -> bool:
    """Whether a torch build with `arch_list` (torch.cuda.get_arch_list()) runs on `arch`: built
    for it, or (NVIDIA) carrying PTX of an older compute capability the driver compiles forward."""
    if not arch_list or arch in arch_list:
        return True
    if not arch.startswith("sm_"):
        return False
    mine = int(arch[3:])
    return any(a.startswith("compute_") and int(a[8:]) <= mine for a in arch_list if a[8:].isdigit())


def check_built_for(name: str, arch: str, arch_list: list[str], version: str | None) -> None:
    """One line, before anything loads, when the installed PyTorch has no kernels for this GPU
    (CUDA 13 builds dropped Volta: a V100 cannot run them)."""
    if not built_for(arch, arch_list):
        raise LabError(f"this PyTorch (built with {version}) has no kernels for {name} ({arch}); it covers "
                       f"{', '.join(arch_list)}: use an image/lock with a PyTorch build for {arch} (for a V100, "
                       "the CUDA 12 one: make setup CUDA=12, or make images HW=cuda CUDA=12)")


def decide(recipe, device: Device) -> tuple[str, dict, list[dict]]:
    """(weight dtype, train settings, decisions) for this recipe on this device. A setting the
    recipe gives explicitly is kept, or refused in one line if the device cannot run it."""
    decisions: list[dict] = []
    what = f"{device.name} ({device.arch})" if device.arch else device.name

    def decided(setting: str, value, why: str) -> None:
        decisions.append({"setting": setting, "value": value, "why": why})

    train = recipe.train
    dtype = recipe.model.dtype
    if device.backend == "cpu":
        if dtype == "auto":
            dtype = "float32"
            decided("model.dtype", dtype, "CPU: train and merge in float32 (no mixed precision)")
        settings: dict = {}
    else:
        half = "bfloat16" if device.bf16 else "float16"
        if dtype == "auto" and recipe.method == "lora":
            dtype = half  # the base is frozen; peft keeps the adapters in float32
            decided("model.dtype", dtype, f"{what} computes natively in {half}; LoRA freezes the base, "
                    "its float32 adapters take the updates")
        elif dtype == "auto":
            dtype = "float32"
            decided("model.dtype", dtype, f"full fine-tuning keeps float32 master weights and computes in {half} "
                    f"autocast on {what}: {ROUNDED_AWAY}")
        settings = {}
        if "bf16" not in train and "fp16" not in train:
            settings = mixed_precision(device)
            decided("train.bf16" if device.bf16 else "train.fp16", True,
                    (f"{what} has native bfloat16" if device.bf16 else
                     f"{what} has no bfloat16: float16 mixed precision with loss scaling")
                    + (" (autocast over the float32 weights)" if dtype == "float32" else ""))
    if recipe.method == "full" and recipe.model.dtype in HALF:
        decided("model.dtype", dtype, f"warning: full fine-tuning of {dtype} weights without float32 masters: "
                f"{ROUNDED_AWAY}; model.dtype=auto keeps float32 weights")
    problems = unsupported({**train, **settings}, dtype, recipe.method, device,
                           recipe.model.attn_implementation)
    if problems:
        raise LabError(f"recipe {recipe.name} on {what}: " + "; ".join(problems))
    return dtype, settings, decisions


def mixed_precision(device: Device) -> dict:
    """A GPU's training precision: bf16 autocast where it is native, else fp16 with loss scaling."""
    return {"bf16": device.bf16, "fp16": not device.bf16}


def unsupported(train: dict, dtype: str, method: str, device: Device, attn: str = "auto") -> list[str]:
    """Settings this device cannot run, each with the fix (the documented capabilities, as rules)."""
    problems = []
    gpu = device.backend != "cpu"
    if (dtype == "bfloat16" or train.get("bf16")) and gpu and not device.bf16:
        problems.append("bfloat16 is not supported on this device (NVIDIA: from sm_80, Ampere); "
                        "use model.dtype=auto and leave train.bf16 unset (float16 mixed precision)")
    if train.get("bf16") and train.get("fp16"):
        problems.append("train.bf16 and train.fp16 are both set; pick one")
    if train.get("fp16") and method == "full" and dtype == "float16":
        problems.append("full fine-tuning with float16 weights under fp16 mixed precision cannot unscale its "
                        "gradients; use model.dtype=float32 (or auto)")
    if train.get("fp16") and not gpu:
        problems.append("train.fp16 needs a GPU")
    if train.get("use_cpu") and gpu:
        problems.append("train.use_cpu on a GPU backend")
    if str(train.get("optim", "")).endswith("_fused") and not gpu:
        problems.append(f"optim {train['optim']} needs a GPU")
    if attn == "flash_attention_2" and (device.backend != "cuda" or (sm(device) or 0) < FLASH_ATTENTION_MIN_SM):
        problems.append("flash_attention_2 needs an NVIDIA GPU of sm_80 or newer; use attn_implementation=auto")
    return problems
