"""Bench: three arms of TRL SFTTrainer in one process, on the same model shape and the same data,
for LoRA and full fine-tuning: TRL's own defaults; the best hand-tuned TRL configuration (packing,
no checkpointing, Liger and flex_attention where usable, 16 x 2048: docs/platform.md);
and the lab's speed plan (lab/device/speed.py, what `lab train` applies), for the same effective batch.

The model is config-only (random weights of a named shape: a GPU host may have no weights
yet); the data are synthetic token ids with the prompt masked, samples of 40-600 tokens as in
make bench (docs/platform.md). Figures per arm: steady real (non-padding) tokens/s (after the
first logging interval), MFU against the device's measured matmul peak, peak memory, final
loss. Written to runs/bench-<time>.json. Speed is measured here, never asserted in tests.
"""

from __future__ import annotations

import random
import time
from datetime import datetime
from pathlib import Path

from lab.device.hardware import DEFAULTS, attention_usable, kernel_usable, resolve_backend
from lab.device.speed import peak_memory_gib
from lab.errors import LabError

# Named shapes. "embedded" is the lab's own tiny model; the Qwen3-0.6B shape is the baseline's.
SHAPES = {
    "embedded": None,  # read from the embedded model's config.json
    "qwen3-0.6b": dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                       rope_theta=1e6, tie_word_embeddings=True),
}


def model_config(shape: str, tokenizer):
    from transformers import AutoConfig, Qwen3Config

    if shape not in SHAPES:
        raise LabError(f"SHAPE={shape!r}: one of {', '.join(SHAPES)}")
    if SHAPES[shape] is None:
        from lab.fixture import ensure_fixture

        return AutoConfig.from_pretrained(ensure_fixture())
    return Qwen3Config(**SHAPES[shape], pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)


def synthetic_rows(n: int, vocab: int, scale: float, seed: int = 0) -> list[dict]:
    """Token ids with a masked prompt: prompts of 20-200 and completions of 20-400 tokens (scaled)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        p, c = int(rng.randint(20, 200) * scale), int(rng.randint(20, 400) * scale)
        rows.append({"input_ids": [rng.randrange(10, vocab) for _ in range(p + c)],
                     "completion_mask": [0] * p + [1] * c})
    return rows


def matmul_peak(device: str, dtype) -> float:
    """Measured dense matmul FLOP/s on this device and dtype: the MFU denominator."""
    import torch

    n = 4096 if device != "cpu" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync = torch.cuda.synchronize if device != "cpu" else (lambda: None)
    sync()
    reps, start = 10, time.perf_counter()
    for _ in range(reps):
        a @ b
    sync()
    return 2 * n**3 * reps / (time.perf_counter() - start)


def arms(backend: str, method: str, cfg, lengths: list[int], base: dict) -> dict[str, tuple[dict, str, dict | None]]:
    """name -> (SFTConfig settings, attn_implementation, the lab's plan record or None)."""
    from lab.device import speed

    # Every arm sees the same effective batch of 16 rows of up to 2048 tokens: same data, same
    # batches where they pack alike, so their loss curves can be compared step by step.
    common = {**base, "per_device_train_batch_size": 16, "max_length": min(2048, cfg.max_position_embeddings)}
    tuned = {**common, "packing": True, "packing_strategy": "bfd", "gradient_checkpointing": False,
             **({"use_liger_kernel": True} if kernel_usable("liger_kernel", backend) else {})}
    shape = speed.model_shape(cfg, 16 if method == "lora" else 0)
    # run_arm loads bf16 weights under bf16 (no float32 masters, unlike `lab train`), else float32
    plan = speed.plan(backend, shape, method, common, lengths, len(lengths), masters=not common.get("bf16"))
    return {"trl_defaults": (common, "sdpa", None),
            "trl_tuned": (tuned, "flex_attention" if attention_usable("flex_attention", backend) else "sdpa", None),
            "lab": ({**common, **plan.settings}, plan.attn_implementation, plan.record())}


def loss_gap(a: dict, b: dict) -> float | None:
    """Largest relative loss difference at shared steps, for arms that saw the same batches."""
    if a["settings"].get("packing", False) != b["settings"].get("packing", False):
        return None
    theirs = dict(map(tuple, b["loss_curve"]))
    gaps = [abs(loss - theirs[step]) / abs(theirs[step]) for step, loss in a["loss_curve"] if step in theirs]
    return round(max(gaps), 5) if gaps else None


PROFILED_STEPS = 3


def profiler_callback(first_step: int, gpu: bool, out: dict):
    """torch.profiler over a few steady-state steps: where the time of a step goes, by operator."""
    import torch
    from transformers import TrainerCallback

    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if gpu else [])

    class Profile(TrainerCallback):
        prof = None

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == first_step:
                self.prof = torch.profiler.profile(activities=activities)
                self.prof.__enter__()

        def on_step_end(self, args, state, control, **kwargs):
            if self.prof is not None and state.global_step == first_step + PROFILED_STEPS:
                if gpu:
                    torch.cuda.synchronize()
                self.prof.__exit__(None, None, None)
                key = "self_device_time_total" if gpu else "self_cpu_time_total"
                events = [e for e in self.prof.key_averages() if getattr(e, key) > 0]
                total = sum(getattr(e, key) for e in events) or 1
                out["profile"] = {
                    "steps": [first_step + 1, first_step + PROFILED_STEPS], "by": key,
                    "ms_per_step": round(total / 1000 / PROFILED_STEPS, 2),
                    "top": [{"op": e.key, "ms_per_step": round(getattr(e, key) / 1000 / PROFILED_STEPS, 2),
                             "share": round(getattr(e, key) / total, 3)}
                            for e in sorted(events, key=lambda e: -getattr(e, key))[:15]]}
                self.prof = None

    return Profile()


def run_arm(name: str, method: str, cfg, tokenizer, dataset, settings: dict, attn: str, steps: int, peak: float,
            backend: str, profile: bool = False) -> dict:
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    points: list[tuple[float, float]] = []
    profiled: dict = {}

    class Tokens(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "num_tokens" in logs:
                points.append((time.perf_counter(), float(logs["num_tokens"])))

    gpu = backend != "cpu"
    if gpu:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    torch.manual_seed(0)
    dtype = torch.bfloat16 if settings.get("bf16") else torch.float32
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation=attn, dtype=dtype)
    n_params = sum(p.numel() for p in model.parameters())
    args = SFTConfig(output_dir=f"/tmp/lab-bench-{name}", max_steps=steps, logging_steps=max(1, steps // 4),
                     save_strategy="no", report_to="none", seed=0, learning_rate=1e-4, **settings)
    lora = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=lora if method == "lora" else None)
    trainer.add_callback(Tokens())
    if profile:  # steady state: past the first logging interval, before the last
        trainer.add_callback(profiler_callback(max(1, steps // 2 - PROFILED_STEPS), gpu, profiled))
    start = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - start
    steady = ((points[-1][1] - points[0][1]) / (points[-1][0] - points[0][0])) if len(points) > 1 else None
    curve = [[h["step"], h["loss"]] for h in trainer.state.log_history if "loss" in h]
    flops_per_token = (4 if method == "lora" else 6) * n_params  # forward 2N, backward 4N (2N: frozen LoRA base)
    result = {"arm": name, "method": method, "params": n_params, "attn_implementation": attn,
              "settings": {k: v for k, v in settings.items() if k not in DEFAULTS[backend]["train"]},
              "steps": steps, "wall_s": round(wall, 1), "real_tokens": points[-1][1] if points else None,
              "steady_tokens_per_s": round(steady) if steady else None,
              "mfu": round(steady * flops_per_token / peak, 4) if steady else None,
              "peak_memory_gib": peak_memory_gib(backend),
              "peak_memory_kind": "device allocated" if gpu else "process RSS (cumulative over arms)",
              "final_loss": curve[-1][1] if curve else None, "loss_curve": curve, **profiled}
    del trainer, model
    if gpu:
        torch.cuda.empty_cache()
    return result


def bench(shape: str = "embedded", hw: str = "auto", steps: int = 40, methods: tuple[str, ...] = ("lora", "full"),
          out_dir: Path | None = None, profile: bool = False) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer

    from lab.device.hardware import host
    from lab.fixture import ensure_fixture
    from lab.manifest import environment
    from lab.runs import RUNS_DIR, write_json

    backend = resolve_backend(hw)
    if steps < 8:
        raise LabError(f"STEPS={steps}: at least 8, so that steady state has two logging points")
    if shape not in SHAPES:  # before the embedded model is built or found: a typo costs nothing
        raise LabError(f"SHAPE={shape!r}: one of {', '.join(SHAPES)}")
    tokenizer = AutoTokenizer.from_pretrained(ensure_fixture())  # only its pad/eos ids matter
    cfg = model_config(shape, tokenizer)
    scale = min(1.0, cfg.max_position_embeddings / 1024)  # the embedded model has 512 positions
    rows = synthetic_rows(4096 if backend != "cpu" else 512, cfg.vocab_size, scale)
    dataset = Dataset.from_list(rows)
    base = dict(DEFAULTS[backend]["train"])
    if backend != "cpu":  # bf16 mixed precision where the GPU has it, else fp16 (lab/device/capability.py)
        from lab.device.capability import detect, mixed_precision

        base.update(mixed_precision(detect(backend)))
    device = "cuda" if backend != "cpu" else "cpu"
    dtype = torch.bfloat16 if base.get("bf16") else torch.float32
    peak = matmul_peak(device, dtype)
    results = []
    for method in methods:
        for name, (settings, attn, plan) in arms(backend, method, cfg, [len(r["input_ids"]) for r in rows],
                                                 base).items():
            print(f"bench: {method} {name} ({shape}, {steps} steps)", flush=True)
            result = run_arm(name, method, cfg, tokenizer, dataset, settings, attn, steps, peak, backend, profile)
            results.append({**result, **({"plan": plan} if plan else {})})
        by_arm = {r["arm"]: r for r in results if r["method"] == method}
        for r in by_arm.values():  # speed-up over TRL's defaults and over hand-tuned TRL, same maths?
            for ref in (by_arm[a] for a in ("trl_defaults", "trl_tuned") if by_arm[a] is not r):
                if r["steady_tokens_per_s"] and ref["steady_tokens_per_s"]:
                    r[f"x_{ref['arm']}"] = round(r["steady_tokens_per_s"] / ref["steady_tokens_per_s"], 2)
                r[f"loss_gap_vs_{ref['arm']}"] = loss_gap(r, ref)
    report = {"shape": shape, "backend": backend, "matmul_peak_tflops": round(peak / 1e12, 3),
              "peak_dtype": str(dtype).split(".")[-1], "results": results,
              "hardware": host(backend), "environment": environment()}
    out_dir = out_dir or RUNS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"bench-{datetime.now().strftime('%Y%m%d-%H%M%S')}-{shape}.json"
    write_json(path, report)
    report["file"] = str(path)
    return report
