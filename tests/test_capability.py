"""Capabilities decided from the device: every shipped recipe, resolved for representative
devices from their documented capabilities, asks nothing the device cannot run; and a GPU
backend that sees no GPU says why in one line."""

import os

import pytest
from conftest import ROOT, TINY, run_lab

from lab.device import capability, hardware
from lab.device.capability import DEVICES
from lab.device.hardware import DEFAULTS
from lab.errors import LabError
from lab.recipe import load_recipe
from lab.train import TRAIN_DEFAULTS

RECIPES = sorted(p.stem for p in (ROOT / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("device", list(DEVICES))
@pytest.mark.parametrize("recipe_name", RECIPES)
def test_every_shipped_recipe_runs_on_every_representative_device(recipe_name, device):
    dev = DEVICES[device]
    recipe = load_recipe(recipe_name, hw=dev.backend)
    dtype, settings, decisions = capability.decide(recipe, dev)
    train = {**TRAIN_DEFAULTS, **DEFAULTS[dev.backend]["train"], **recipe.train, **settings}
    assert capability.unsupported(train, dtype, recipe.method, dev, recipe.model.attn_implementation) == []
    if dev.backend != "cpu":  # half precision on every GPU: the native one
        assert train["bf16"] is dev.bf16 and train["fp16"] is (not dev.bf16)
        # full fine-tuning: float32 master weights under that autocast; LoRA: a half-precision base
        assert dtype == ("float32" if recipe.method == "full" else "bfloat16" if dev.bf16 else "float16")
        assert {d["setting"] for d in decisions} >= {"model.dtype", "train.bf16" if dev.bf16 else "train.fp16"}
        assert all(d["why"] for d in decisions)


def test_a_setting_the_device_cannot_run_is_refused_in_one_line():
    t4, h100 = DEVICES["T4"], DEVICES["H100"]
    bf16 = load_recipe("identity-lora", ["train.bf16=true", "model.dtype=bfloat16"], hw="cuda")
    with pytest.raises(LabError, match=r"bfloat16 is not supported on this device .*sm_80"):
        capability.decide(bf16, t4)
    assert capability.decide(bf16, h100)[0] == "bfloat16"
    fa2 = load_recipe("identity-lora", ["model.attn_implementation=flash_attention_2"], hw="cuda")
    with pytest.raises(LabError, match="flash_attention_2 needs an NVIDIA GPU of sm_80"):
        capability.decide(fa2, t4)
    with pytest.raises(LabError, match="flash_attention_2"):
        capability.decide(load_recipe("identity-lora", ["model.attn_implementation=flash_attention_2"], hw="rocm"),
                          DEVICES["MI300X"])
    full = load_recipe("identity-full", ["model.dtype=float16", "train.fp16=true"], hw="cuda")
    with pytest.raises(LabError, match="cannot unscale"):
        capability.decide(full, t4)
    assert capability.unsupported({"optim": "adamw_torch_fused"}, "float32", "lora", DEVICES["cpu"])


@pytest.mark.parametrize("device", ["H100", "A100", "MI300X", "gfx1151", "T4", "V100"])
def test_full_fine_tuning_keeps_float32_master_weights_under_half_precision_autocast(device):
    dev = DEVICES[device]
    dtype, settings, decisions = capability.decide(load_recipe("identity-full", hw=dev.backend), dev)
    assert dtype == "float32" and settings == {"bf16": dev.bf16, "fp16": not dev.bf16}
    why = {d["setting"]: d["why"] for d in decisions}
    assert "float32 master weights" in why["model.dtype"] and "round away" in why["model.dtype"]
    assert "autocast over the float32 weights" in why["train.bf16" if dev.bf16 else "train.fp16"]
    # LoRA trains float32 adapters over a frozen base: that base stays in half precision
    lora, _, _ = capability.decide(load_recipe("identity-lora", hw=dev.backend), dev)
    assert lora == ("bfloat16" if dev.bf16 else "float16")


def test_full_fine_tuning_of_bfloat16_weights_stays_possible_with_a_warning():
    for hw, dev in (("cuda", DEVICES["H100"]), ("rocm", DEVICES["gfx1151"]), ("cpu", DEVICES["cpu"])):
        recipe = load_recipe("identity-full", ["model.dtype=bfloat16"], hw=hw)
        dtype, _, decisions = capability.decide(recipe, dev)
        (warning,) = [d for d in decisions if d["why"].startswith("warning:")]  # train.py prints every decision
        assert dtype == "bfloat16" and warning["setting"] == "model.dtype" and "round away" in warning["why"]
    assert not [d for d in capability.decide(load_recipe("identity-full", hw="cuda"), DEVICES["H100"])[2]
                if d["why"].startswith("warning:")]


def test_half_precision_weights_lose_the_updates_float32_masters_keep():
    """Why: AdamW's step is about the learning rate (1e-5 in the GPU full recipe), and a bfloat16
    weight of N(0, 0.02) keeps 8 significant bits, so most such steps round back to the weight."""
    import torch

    torch.manual_seed(0)
    weights = torch.randn(1024, 1024) * 0.02
    unchanged = {dtype: ((w + 1e-5) == w).double().mean().item()
                 for dtype, w in ((torch.bfloat16, weights.bfloat16()), (torch.float32, weights))}
    assert 0.83 < unchanged[torch.bfloat16] < 0.86 and unchanged[torch.float32] == 0.0
    assert f"{int(unchanged[torch.bfloat16] * 100)} %" in capability.ROUNDED_AWAY  # the figure the decision gives
    # and they never add up: after 100 such steps float32 masters moved every weight, bfloat16 ones 16 %
    master, half = weights.clone(), weights.bfloat16()
    for _ in range(100):
        master += 1e-5
        half += 1e-5
    moved = [(w.bfloat16() != weights.bfloat16()).double().mean().item() for w in (master, half)]
    assert moved[0] == 1.0 and moved[1] < 0.2


def test_the_cpu_default_is_unchanged():
    recipe = load_recipe("identity-lora", hw="cpu")
    assert capability.decide(recipe, DEVICES["cpu"]) == ("float32", {}, [])


def test_the_amd_architecture_is_read_from_the_driver_topology(tmp_path, monkeypatch):
    def node(i, version):
        d = tmp_path / f"sys/class/kfd/kfd/topology/nodes/{i}"
        d.mkdir(parents=True)
        (d / "properties").write_text(f"cpu_cores_count 16\nsimd_count 80\ngfx_target_version {version}\n")

    assert hardware.amd_arch(str(tmp_path)) is None
    node(0, 0)  # the CPU node
    node(1, 110501)
    assert hardware.amd_arch(str(tmp_path)) == "gfx1151"
    for version, arch in ((90402, "gfx942"), (90010, "gfx90a"), (110000, "gfx1100"), (120001, "gfx1201")):
        (tmp_path / "sys/class/kfd/kfd/topology/nodes/1/properties").write_text(f"gfx_target_version {version}\n")
        assert hardware.amd_arch(str(tmp_path)) == arch
    monkeypatch.setenv("GPU_ARCH", "gfx950")
    assert hardware.gpu_arch() == ("gfx950", "set by GPU_ARCH")
    monkeypatch.delenv("GPU_ARCH")
    monkeypatch.setattr(hardware, "amd_arch", lambda root="/": "gfx942")
    assert hardware.gpu_arch()[0] == "gfx942"


def test_a_gpu_backend_without_a_gpu_names_the_cause(tmp_path, monkeypatch):
    (tmp_path / "dev").mkdir()
    assert "NVIDIA Container Toolkit" in capability.gpu_missing("cuda", str(tmp_path))
    assert "no /dev/kfd" in capability.gpu_missing("rocm", str(tmp_path))
    (tmp_path / "dev" / "kfd").write_text("")
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # as a user outside the render group
    gid = (tmp_path / "dev" / "kfd").stat().st_gid
    assert f"LAB_RENDER_GID={gid}" in capability.gpu_missing("rocm", str(tmp_path))


@pytest.mark.parametrize("hw, says", [("cuda", "no NVIDIA device is visible"), ("rocm", "no /dev/kfd")])
def test_training_on_a_gpu_backend_without_a_gpu_is_one_line(hw, says, runs_dir):
    r = run_lab("train", "--hw", hw, "--runtime", "local", "--set", TINY, env={"LAB_RUNS": str(runs_dir)}, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    (line,) = r.stderr.strip().splitlines()
    assert line.startswith(f"lab train: error: HW={hw}: ") and says in line
    assert not list(runs_dir.glob("*/adapter"))


def test_doctor_prints_each_decision_with_its_reason():
    r = run_lab("doctor", "--hw", "cpu", timeout=120)
    assert r.returncode == 0, r.stderr
    assert "decisions:" in r.stdout and "model.dtype" not in r.stdout  # CPU: the recipe's float32 stands
    r = run_lab("doctor", "--hw", "cuda", timeout=120)
    assert r.returncode == 0, r.stderr
    assert "no GPU:" in r.stdout and "NVIDIA" in r.stdout


# torch.cuda.get_arch_list() shapes: a CUDA 13 build (no Volta, PTX of the newest) and a CUDA 12 build with Volta
CUDA13 = ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120", "compute_120"]
CUDA12 = ["sm_50", "sm_60", "sm_70", "sm_75", "sm_80", "sm_86", "sm_90"]


def test_a_gpu_the_installed_pytorch_was_not_built_for_is_refused_in_one_line():
    from lab.device.capability import built_for, check_built_for

    assert not built_for("sm_70", CUDA13) and built_for("sm_70", CUDA12)
    assert built_for("sm_90", CUDA13) and built_for("sm_89", CUDA13 + ["compute_80"])  # PTX compiles forward
    assert built_for("gfx1151", ["gfx1100", "gfx1151"]) and not built_for("gfx1151", ["gfx942"])
    with pytest.raises(LabError, match=r"^this PyTorch \(built with 13.0\) has no kernels for Tesla V100-SXM2-32GB "
                                       r"\(sm_70\); it covers sm_75, .*for a V100, the CUDA 12 one: make setup CUDA"):
        check_built_for("Tesla V100-SXM2-32GB", "sm_70", CUDA13, "13.0")
