"""`lab doctor`: what the lab sees on this host and what HW= would pick, with every decision the
device makes for the default recipe (precision, weight dtype, AMD architecture) and why. It reads
the device tables (lab/device/) and the recipe; nothing below it imports it."""

from __future__ import annotations

import json

from lab.device import capability, hardware, speed
from lab.errors import LabError
from lab.recipe import load_recipe


def doctor(hw: str = "auto") -> dict:
    """What the lab sees here and what HW=auto (or `hw`) would pick: `lab doctor` prints it, with
    every decision taken from the device (precision, weight dtype, AMD architecture) and why."""
    backend = hardware.resolve_backend(hw)
    seen = hardware.host(backend)
    attention: dict = {}
    kernels: dict = {}
    decisions: list[dict] = []
    problem = None
    try:
        import torch
    except ImportError:  # a host that only drives containers
        torch = None
    if torch is not None:
        seen["torch"] = torch.__version__
        gpu = backend != "cpu" and hardware.gpu_usable(backend)
        seen["bf16"] = bool(gpu and torch.cuda.is_bf16_supported()) if backend != "cpu" else None
        attention = {a: hardware.attention_usable(a, backend)
                     for a in ("eager", "sdpa", "flex_attention", "flash_attention_2")}
        kernels = {k: hardware.kernel_usable(k, backend) for k in ("liger_kernel", "triton")}
        decisions, problem = _decisions(backend)
    if backend == "rocm" or hardware.amd_arch():
        arch, why = hardware.gpu_arch()
        decisions.append({"setting": "GPU_ARCH", "value": arch, "why": f"{why}; torch's device-{arch} wheels "
                          f"(make setup) and lab-train:rocm-{arch} (make images)"})
    free = None
    if torch is not None and (backend == "cpu" or hardware.gpu_usable(backend)):
        free = round(speed.free_memory(backend) / 2**30, 1)
    return {**seen, "attention": attention, "kernels": kernels, "free_memory_gib": free, "gpu_problem": problem,
            "decisions": decisions, "defaults": hardware.DEFAULTS[backend], "speed": hardware.SPEED[backend],
            "amd_host": hardware.amd_host()}


def _decisions(backend: str, recipe_name: str = "identity-lora") -> tuple[list[dict], str | None]:
    """The device's decisions for the default recipe, or why there is no device."""
    try:
        device = capability.detect(backend)
        recipe = load_recipe(recipe_name, hw=backend, check_train=False)
        _, _, decisions = capability.decide(recipe, device)
    except LabError as e:
        return [], str(e)
    return [{"setting": "device", "value": device.name, "why": f"{device.arch or backend}, bf16 "
             f"{'native' if device.bf16 else 'no'}"}, *decisions], None


def show(seen: dict) -> str:
    """`lab doctor`'s page: one line per fact, the decisions with their reasons."""
    lines: list[str] = []
    say = lines.append
    devices = "; ".join(f"{d['name']} ({d['arch']}, {d['memory_gib']} GiB)" for d in seen["devices"]) or "none"
    say(f"backend:   {seen['backend']} (torch {seen.get('torch', 'not installed')}, "
        f"CUDA {seen.get('torch_cuda') or '-'}, HIP {seen.get('torch_hip') or '-'}, "
        f"driver {seen.get('driver') or '-'})")
    say(f"devices:   {len(seen['devices'])}: {devices}")
    say(f"cpu:       {seen['cpu']}, {seen['cpu_count']} cores, {seen['memory_gib']} GiB")
    say("attention: " + ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in seen["attention"].items()))
    say("kernels:   " + (", ".join(f"{k} {'yes' if v else 'no'}" for k, v in seen["kernels"].items()) or "-"))
    say(f"free:      {seen['free_memory_gib'] if seen['free_memory_gib'] is not None else '-'} GiB "
        "(what the speed plan sizes micro-batches and checkpointing against)")
    if seen["gpu_problem"]:
        say(f"no GPU:    {seen['gpu_problem']}")
    say("decisions: " + ("; ".join(f"{d['setting']}={d['value']} ({d['why']})" for d in seen["decisions"])
                         or ("none: no device" if seen["gpu_problem"] else "none")))
    say(f"defaults:  {json.dumps(seen['defaults'])}")
    say(f"speed:     {json.dumps(seen['speed'])}")
    if seen["amd_host"]:
        amd = seen["amd_host"]
        say(f"amd host:  kernel {amd['kernel']}, GTT {amd['gtt_gib'] or '-'} GiB")
        for note in amd["notes"]:
            say(f"           {note}")
    return "\n".join(lines)
