"""Speed: what a run sets to go fast, decided before the model loads, and why.

One plan for `lab train` and `make bench`'s lab arm. From the backend's row in
hardware.SPEED, the model's shape, the data's token lengths and the device's free memory it
picks: the attention implementation, fused kernels (Liger) where installed, the optimizer,
packing (TRL's best-fit decreasing, prompt still masked) when the data allow it, and the
micro-batch and gradient checkpointing from a memory estimate. The effective batch (micro-batch
x accumulation) never changes, so the maths stay those of the recipe; a key the recipe sets in
`train:` is never overridden. Every choice is recorded with its reason.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from lab.device.hardware import SPEED, attention_usable, kernel_usable

GiB = 2**30
MIN_PACKED_STEPS = 50  # fewer optimizer updates than this and packing changes what is learned
MEMORY_HEADROOM = 0.85  # of free memory: allocator fragmentation and kernel workspaces
FIXED_OVERHEAD = 1 * GiB  # CUDA/ROCm context, cuBLAS workspaces, Python objects


@dataclass
class Shape:
    """What the memory estimate needs from a decoder-only model (transformers config names)."""

    params: int
    layers: int
    hidden: int
    intermediate: int
    heads: int
    q_dim: int  # heads x head_dim
    kv_dim: int  # key/value heads x head_dim
    vocab: int
    lora_r: int = 0
    lora_params: int = 0
    lora_linears_per_layer: int = 0


def model_shape(config, lora_r: int = 0, lora_targets: str | list[str] = "all-linear") -> Shape:
    """Exact parameter counts from an empty (meta-device) model of this config, no weights read."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    head = model.get_output_embeddings()
    lora, adapted = 0, 0
    if lora_r:
        for name, module in model.named_modules():
            if not isinstance(module, torch.nn.Linear) or module is head:
                continue
            if lora_targets == "all-linear" or name.split(".")[-1] in lora_targets:
                lora += lora_r * (module.in_features + module.out_features)
                adapted += 1
    text = config.get_text_config()
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    layers = text.num_hidden_layers
    return Shape(params=sum(p.numel() for p in model.parameters()), layers=layers, hidden=text.hidden_size,
                 intermediate=text.intermediate_size, heads=text.num_attention_heads,
                 q_dim=text.num_attention_heads * head_dim,
                 kv_dim=getattr(text, "num_key_value_heads", text.num_attention_heads) * head_dim,
                 vocab=text.vocab_size, lora_r=lora_r, lora_params=lora,
                 lora_linears_per_layer=adapted // max(layers, 1))


def activation_bytes_per_token(shape: Shape, method: str, half: bool, masters: bool = False) -> int:
    """Bytes one decoder layer saves for backward, per token, with a fused (flash-style) attention.

    Counted from what autograd keeps in a Qwen3/Llama layer (norm inputs and outputs, q/k/v after
    their norms, the attention output, the MLP's gate/up/activation/product) and checked against
    PyTorch's saved-tensor hooks in tests/test_speed.py, in float32 and in bf16 autocast (as the
    Trainer runs with bf16=True) over bf16 or float32 weights. LoRA freezes the norms' weights, so
    their outputs are not kept; in half precision the RMSNorms keep float32 inputs, and peft's
    float32 adapters make each adapted linear (all-linear: q k v o gate up down) keep its own
    half-precision copy of its input. masters: full fine-tuning of float32 weights under autocast,
    where the residual stream stays float32: the two hidden-size RMSNorms keep float32 outputs, and
    autocast casts their output once per linear it feeds (q, k, v; gate, up), each copy kept.
    """
    h, q, kv, i = shape.hidden, shape.q_dim, shape.kv_dim, shape.intermediate
    lora_mid = shape.lora_linears_per_layer * shape.lora_r  # each adapter's rank-r intermediate
    if not half:
        elements = (2 * h + 5 * q + kv + 4 * i + lora_mid) if method == "lora" else (4 * h + 6 * q + 2 * kv + 4 * i)
        return 4 * elements
    if method == "lora":
        return 18 * h + 14 * q + 4 * kv + 8 * i + 2 * lora_mid
    bf16_weights = 2 * (4 * h + 6 * q + 2 * kv + 4 * i) + 2 * (2 * h + q + kv)
    # float32 norm outputs (+2 B x 2 norms), and 2 more half copies of the attention input, 1 of the MLP's
    return bf16_weights + (2 * 2 * h + 3 * 2 * h if masters else 0)


def memory_estimate(shape: Shape, method: str, tokens: int, checkpointing: bool, bf16: bool, liger: bool,
                    scores_len: int = 0, masters: bool = True) -> dict:
    """Peak training memory in bytes for `tokens` tokens per micro-batch: a breakdown.

    bf16: half-precision compute (bf16 or fp16 autocast). masters: full fine-tuning keeps float32
    weights under that autocast (lab/device/capability.py; False: half-precision weights, model.dtype set
    so): 4 B weights + 4 B gradients + 8 B AdamW state per parameter, plus autocast's half copy of
    each weight, kept from forward to backward. liger: Liger's kernels keep no logits (fused linear
    cross-entropy), keep RMSNorm inputs in the model's dtype and recompute SwiGLU's activation.
    scores_len: an attention path that materialises each head's scores over rows of that length
    (SDPA given a packed-sequence mask on CUDA). Both from the H100 measurements in
    docs/platform.md; see docs/benchmarks.md.
    """
    width = 2 if bf16 else 4  # activations: the compute dtype
    masters = masters and bf16 and method == "full"
    weight_width = 4 if masters or not bf16 else 2  # a LoRA base in half precision on GPUs
    trainable = shape.lora_params if method == "lora" else shape.params
    state_width = 4 if method == "lora" else weight_width  # peft keeps adapters in float32
    per_layer = activation_bytes_per_token(shape, method, bf16, masters) + shape.heads * scores_len * width
    if liger and bf16:  # measured over bf16 weights; over float32 masters taken as the same saving
        per_layer -= 2 * (2 * shape.hidden + shape.q_dim + shape.kv_dim) + 2 * shape.intermediate
    # Checkpointing keeps each layer's input (float32 over float32 weights) and recomputes one layer
    # at a time in backward.
    residual = 4 if masters else width
    activations = tokens * (shape.layers * shape.hidden * residual + per_layer if checkpointing
                            else shape.layers * per_layer)
    # Unfused: the logits, their float32 copy and log-softmax (and the gradients of the same size).
    logits = 0 if liger else tokens * shape.vocab * (width + 8)
    parts = {"weights": shape.params * weight_width + (shape.lora_params * 4 if method == "lora" else 0),
             "autocast_weights": shape.params * 2 if masters else 0,
             "gradients": trainable * state_width, "optimizer": 2 * trainable * state_width,
             "activations": activations, "logits": logits, "overhead": FIXED_OVERHEAD}
    return {**parts, "total": sum(parts.values())}


def free_memory(backend: str) -> int:
    """Bytes free on one device now (host memory on CPU)."""
    if backend != "cpu":
        import os

        import torch

        return torch.cuda.mem_get_info(int(os.environ.get("LOCAL_RANK", "0")))[0]  # this process's device
    with open("/proc/meminfo", encoding="utf-8") as f:
        info = dict(line.split(":", 1) for line in f)
    return int(info["MemAvailable"].split()[0]) * 1024


def peak_memory_gib(backend: str) -> float:
    """What training really used so far: device allocations, or the process's resident set on CPU."""
    import resource

    import torch

    peak = (torch.cuda.max_memory_allocated() if backend != "cpu" and torch.cuda.is_available()
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return round(peak / GiB, 2)


def token_lengths(tokenizer, examples: list[dict], sample: int = 512) -> list[int]:
    """Tokens per example as training renders them (chat template, prompt + completion), from an
    evenly spaced sample: enough for a packing and memory decision, cheap on large data."""
    step = max(1, len(examples) // sample)
    out = []
    for ex in examples[::step]:
        ids = tokenizer.apply_chat_template(ex["prompt"] + ex["completion"], tools=ex.get("tools"), tokenize=True,
                                            **(ex.get("chat_template_kwargs") or {}))
        out.append(len(ids["input_ids"] if hasattr(ids, "keys") else ids))
    return out


@dataclass
class Plan:
    settings: dict  # SFTConfig keys to set (on top of the recipe's)
    attn_implementation: str
    decisions: list[dict]  # [{"setting", "value", "why"}]
    memory: dict

    def record(self) -> dict:
        return {"enabled": True, **asdict(self)}


def plan(backend: str, shape: Shape, method: str, train: dict, lengths: list[int], n_examples: int,
         attn_implementation: str = "auto", world_size: int = 1, free: int | None = None,
         half: bool | None = None, masters: bool = True) -> Plan:
    """Decide the speed settings. `train` is the run's SFTConfig keys as resolved so far (lab,
    hardware and recipe defaults); keys present there come from the user and are kept. masters:
    full fine-tuning keeps float32 weights (the lab's default; a run of half-precision weights
    uses less than that estimate)."""
    row = SPEED[backend]
    chosen: dict = {}
    decisions: list[dict] = []

    def decide(key, value, why):
        chosen[key] = value
        decisions.append({"setting": key, "value": value, "why": why})

    if attn_implementation == "auto":
        attn = next((a for a in row["attention"] if attention_usable(a, backend)), "sdpa")
        decisions.append({"setting": "attn_implementation", "value": attn,
                          "why": f"first usable of {', '.join(row['attention'])} on {backend}"})
    else:
        attn = attn_implementation
    for key, (value, why) in row["train"].items():
        if key not in train:
            decide(key, value, why)
    liger = bool(train.get("use_liger_kernel"))
    if row.get("liger") and "use_liger_kernel" not in train:
        liger = kernel_usable("liger_kernel", backend)
        decide("use_liger_kernel", liger, "Liger's fused linear cross-entropy: no logits tensor" if liger
               else "liger-kernel not installed or no GPU")

    max_length = train.get("max_length", 1024) or max(lengths, default=1)
    micro0 = int(train.get("per_device_train_batch_size", 8))
    accumulation0 = int(train.get("gradient_accumulation_steps", 1))
    effective = micro0 * accumulation0
    epochs = float(train.get("num_train_epochs", 3))
    total_tokens = sum(min(n, max_length) for n in lengths) * n_examples / max(len(lengths), 1)

    packing = bool(train.get("packing", False))
    if "packing" not in train:
        rows = math.ceil(total_tokens / max_length)
        steps = math.ceil(rows / (effective * world_size)) * epochs
        if not row["packing"]:
            decide("packing", False, f"measured slower than padding on {backend} (docs/benchmarks.md)")
        elif steps < MIN_PACKED_STEPS:
            decide("packing", False, f"packed into ~{rows} rows of {max_length} the run would take ~{steps:.0f} "
                   f"optimizer steps (< {MIN_PACKED_STEPS}): too few updates")
        else:
            packing = True
            decide("packing", True, f"~{total_tokens:,.0f} tokens into ~{rows} rows of {max_length} "
                   f"(best-fit decreasing, prompt masked): ~{steps:.0f} optimizer steps")
            if "packing_strategy" not in train:
                decide("packing_strategy", "bfd", "best-fit decreasing: whole samples, no cross-attention")
    # Tokens per micro-batch: packed rows are full; padded batches run to their longest sample.
    row_tokens = max_length if packing else min(max_length, max(lengths, default=max_length))
    scores_len = row_tokens if packing and attn in row.get("dense_mask_attention", ()) else 0

    bf16 = bool(train.get("bf16") or train.get("fp16")) if half is None else half
    budget = (free if free is not None else free_memory(backend)) * MEMORY_HEADROOM
    fits = lambda m, ckpt: memory_estimate(shape, method, m * row_tokens, ckpt, bf16, liger, scores_len,  # noqa: E731
                                           masters)
    divisors = [d for d in range(effective, 0, -1) if effective % d == 0]
    user_ckpt = train.get("gradient_checkpointing")
    options = [user_ckpt] if user_ckpt is not None else [False, True]
    pick = next(((m, c) for c in options for m in divisors if fits(m, c)["total"] <= budget), None)
    if pick is None:
        pick = (1, True if user_ckpt is None else user_ckpt)
        why = "even 1 row with checkpointing exceeds the estimate's budget: may run out of memory"
    else:
        why = f"estimated peak {fits(*pick)['total'] / GiB:.1f} GiB of {budget / GiB:.1f} GiB usable"
    micro, ckpt = pick
    if user_ckpt is None:
        decide("gradient_checkpointing", ckpt, ("memory requires it: " if ckpt else "memory allows it off: ") + why)
    if micro != micro0:
        decide("per_device_train_batch_size", micro, f"{why}; effective batch {effective} kept")
        decide("gradient_accumulation_steps", effective // micro,
               f"micro-batch {micro} x {effective // micro} = {effective}")
    estimate = fits(micro, ckpt)
    memory = {"estimate_gib": {k: round(v / GiB, 2) for k, v in estimate.items()},
              "budget_gib": round(budget / GiB, 1), "tokens_per_micro_batch": micro * row_tokens}
    return Plan(chosen, attn, decisions, memory)
