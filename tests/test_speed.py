"""The speed plan: its memory model against what autograd really keeps, and its decisions."""

import math

import pytest

from lab.device import speed
from lab.errors import LabError

GiB = 2**30


def saved_bytes(config, method: str, half: bool, masters: bool = False, seq: int = 128,
                batch: int = 2) -> tuple[float, int]:
    """(Bytes autograd saves for backward per token, weights excluded; bytes of autocast's weight
    copies), from saved-tensor hooks. half: bf16 autocast, as the Trainer runs it with bf16=True,
    over a bf16 model, or over a float32 one (masters)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    dtype = torch.bfloat16 if half and not masters else torch.float32
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=dtype)
    if method == "lora":
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear",
                                                 task_type="CAUSAL_LM"))
    weights = {p.data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}
    copies: dict[int, int] = {}

    def cast_weight(t) -> bool:
        """Autocast's bf16 cast of a float32 weight (linears save it transposed): equal to one."""
        if not masters or t.dtype != torch.bfloat16 or t.dim() != 2:
            return False
        with torch.no_grad():
            return any(torch.equal(view, p.to(torch.bfloat16)) for view in (t, t.t())
                       for p in model.parameters() if p.shape == view.shape)

    def keep(t):
        if t.data_ptr() not in weights:
            (copies if cast_weight(t) else storages)[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    ids = torch.randint(10, config.vocab_size, (batch, seq))
    with (torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t),
          torch.autocast("cpu", dtype=torch.bfloat16, enabled=half)):
        model(input_ids=ids, labels=ids)
    return sum(storages.values()) / (batch * seq), sum(copies.values())


def with_layers(config, n: int):
    d = {**config.to_dict(), "num_hidden_layers": n}
    if d.get("layer_types"):
        d["layer_types"] = d["layer_types"][:1] * n
    return config.__class__.from_dict(d)


@pytest.fixture(scope="module")
def shapes(embedded_model):
    from transformers import AutoConfig, Qwen3Config

    # The embedded model and one Qwen3-0.6B layer (small vocabulary: only the layers are compared).
    qwen = Qwen3Config(vocab_size=1024, hidden_size=1024, intermediate_size=3072, num_hidden_layers=2,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=128)
    return {"embedded": AutoConfig.from_pretrained(embedded_model), "qwen3-0.6b-layer": qwen}


@pytest.mark.parametrize("name", ["embedded", "qwen3-0.6b-layer"])
@pytest.mark.parametrize("method,half,masters", [("lora", False, False), ("lora", True, False), ("full", False, False),
                                                 ("full", True, False), ("full", True, True)],
                         ids=["lora-float32", "lora-bf16", "full-float32", "full-bf16-weights", "full-fp32-masters"])
def test_activation_model_matches_what_autograd_saves(shapes, name, method, half, masters):
    config = shapes[name]
    (four, _), (two, copies) = (saved_bytes(with_layers(config, n), method, half, masters) for n in (4, 2))
    shape = speed.model_shape(config, 16 if method == "lora" else 0)
    predicted = speed.activation_bytes_per_token(shape, method, half, masters)
    assert predicted == pytest.approx((four - two) / 2, rel=0.05), (predicted, (four - two) / 2)
    if masters:  # a half copy of each weight a linear multiplies with (the embedding's lookup is not cast)
        import torch
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(with_layers(config, 2))
        linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
        assert copies == 2 * linear
        assert copies <= speed.memory_estimate(speed.model_shape(with_layers(config, 2)), "full", 1, False, True,
                                               False)["autocast_weights"]


def test_model_shape_counts_lora_parameters_exactly(shapes):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    config = shapes["embedded"]
    shape = speed.model_shape(config, 16)
    model = get_peft_model(AutoModelForCausalLM.from_config(config),
                           LoraConfig(r=16, target_modules="all-linear", task_type="CAUSAL_LM"))
    trainable, total = model.get_nb_trainable_parameters()
    assert shape.lora_params == trainable and shape.params == total - trainable
    assert shape.lora_linears_per_layer == 7  # q k v o gate up down


QWEN_06B = speed.Shape(params=596_049_920, layers=28, hidden=1024, intermediate=3072, heads=16, q_dim=2048,
                       kv_dim=1024, vocab=151_936, lora_r=16, lora_params=10_092_544, lora_linears_per_layer=7)

# Peak GiB measured on one H100 with plain TRL (docs/platform.md), Qwen3-0.6B shape, bf16
# weights (full fine-tuning too: no float32 masters):
# (method, tokens per micro-batch, checkpointing, Liger, packed rows through SDPA's mask, measured).
H100_PEAKS = [("lora", 8 * 600, True, False, 0, 2.0), ("lora", 8 * 1024, False, False, 1024, 21.4),
              ("lora", 16 * 1024, False, True, 1024, 41.5), ("lora", 16 * 2048, False, True, 0, 49.7),
              ("full", 8 * 1024, False, False, 1024, 18.6), ("full", 16 * 2048, False, True, 0, 43.5)]


@pytest.mark.parametrize("method,tokens,ckpt,liger,scores_len,measured", H100_PEAKS)
def test_memory_estimate_never_under_the_h100_measurements_and_close_with_liger(method, tokens, ckpt, liger,
                                                                                scores_len, measured):
    estimate = speed.memory_estimate(QWEN_06B, method, tokens, ckpt, True, liger, scores_len,
                                     masters=False)["total"] / GiB
    assert estimate >= measured  # an under-estimate runs out of memory; an over-estimate only runs slower
    if liger:  # what the plan uses on GPUs (liger-kernel is in the CUDA and ROCm locks)
        assert estimate <= 1.25 * measured
def test_full_fine_tuning_with_float32_masters_costs_16_bytes_per_parameter_plus_autocast_copies():
    masters = speed.memory_estimate(QWEN_06B, "full", 16 * 2048, False, True, liger=True)
    half = speed.memory_estimate(QWEN_06B, "full", 16 * 2048, False, True, liger=True, masters=False)
    n = QWEN_06B.params
    assert (masters["weights"], masters["gradients"], masters["optimizer"]) == (4 * n, 4 * n, 8 * n)
    assert masters["autocast_weights"] == 2 * n  # the half copy autocast makes of each weight
    assert (half["weights"], half["gradients"], half["optimizer"], half["autocast_weights"]) == (2 * n, 2 * n, 4 * n, 0)
    # activations in the autocast dtype, and the float32 residual stream's extra 10 B per hidden unit
    extra = 16 * 2048 * QWEN_06B.layers * 10 * QWEN_06B.hidden
    assert masters["activations"] - half["activations"] == extra and masters["logits"] == half["logits"] == 0
    # with checkpointing, the kept layer inputs are float32 too
    ckpt = [speed.memory_estimate(QWEN_06B, "full", 2048, True, True, True, masters=m)["activations"] for m in (1, 0)]
    assert ckpt[0] - ckpt[1] == 2048 * (QWEN_06B.layers * QWEN_06B.hidden * 2 + 10 * QWEN_06B.hidden)
    # LoRA, and float32 training without autocast, are what they were
    for args in (("lora", 4096, False, True, True), ("full", 4096, False, False, False)):
        assert speed.memory_estimate(QWEN_06B, *args) == speed.memory_estimate(QWEN_06B, *args, masters=False)
    # a full fine-tuning plan counts them unless told the weights are half precision
    plans = [speed.plan("cuda", QWEN_06B, "full", {**GPU_TRAIN, "use_liger_kernel": True}, [2048] * 10, 50_000,
                        attn_implementation="flex_attention", free=80 * GiB, masters=m) for m in (True, False)]
    assert plans[0].memory["estimate_gib"]["total"] > plans[1].memory["estimate_gib"]["total"] + 10


GPU_TRAIN = {"bf16": True, "per_device_train_batch_size": 16, "max_length": 2048, "num_train_epochs": 1}


def test_gpu_plan_packs_large_data_and_keeps_checkpointing_off_when_memory_allows():
    lengths = list(range(40, 600, 7))
    gpu = {**GPU_TRAIN, "use_liger_kernel": True}  # an H100 with liger-kernel, as in the CUDA lock
    plan = speed.plan("cuda", QWEN_06B, "lora", gpu, lengths, n_examples=50_000, attn_implementation="flex_attention",
                      free=80 * GiB)
    assert plan.settings["packing"] is True and plan.settings["packing_strategy"] == "bfd"
    assert plan.settings["gradient_checkpointing"] is False
    assert "per_device_train_batch_size" not in plan.settings  # 16 x 2048 fits: nothing re-split
    assert plan.settings["optim"] == "adamw_torch_fused" and plan.attn_implementation == "flex_attention"
    assert plan.memory["tokens_per_micro_batch"] == 16 * 2048
    assert all(d["why"] for d in plan.decisions)
    # No GPU here, so auto falls back to SDPA, which keeps every head's scores of packed rows:
    # the same memory then holds half the rows per micro-batch, the effective batch unchanged.
    auto = speed.plan("cuda", QWEN_06B, "lora", gpu, lengths, n_examples=50_000, free=80 * GiB)
    assert auto.attn_implementation == "sdpa"
    assert auto.settings["per_device_train_batch_size"] * auto.settings["gradient_accumulation_steps"] == 16
    assert auto.settings["per_device_train_batch_size"] < 16


def test_small_memory_splits_the_micro_batch_before_checkpointing_and_keeps_the_effective_batch():
    lengths, train = [2048] * 10, {**GPU_TRAIN, "use_liger_kernel": True}
    roomy, tight, tiny = (speed.plan("cuda", QWEN_06B, "full", train, lengths, 50_000,
                                     attn_implementation="flex_attention", free=int(gib * GiB)) for gib in (80, 24, 16))
    micro = tight.settings["per_device_train_batch_size"]
    assert micro < 16 and micro * tight.settings["gradient_accumulation_steps"] == 16
    assert tight.settings["gradient_checkpointing"] is False
    assert tiny.settings["gradient_checkpointing"] is True
    assert roomy.memory["estimate_gib"]["total"] > tight.memory["estimate_gib"]["total"]


def test_packing_stays_off_when_it_would_leave_too_few_updates_and_on_cpu():
    few = speed.plan("cuda", QWEN_06B, "lora", {**GPU_TRAIN, "num_train_epochs": 3}, [60] * 100, 200, free=80 * GiB)
    assert few.settings["packing"] is False and "optimizer steps" in next(
        d["why"] for d in few.decisions if d["setting"] == "packing")
    cpu = speed.plan("cpu", QWEN_06B, "lora", {"max_length": 256}, [60] * 100, 50_000, free=20 * GiB)
    assert cpu.settings["packing"] is False and "optim" not in cpu.settings


def test_the_recipes_own_keys_win():
    train = {**GPU_TRAIN, "packing": False, "gradient_checkpointing": True, "optim": "adamw_torch",
             "use_liger_kernel": False}
    plan = speed.plan("cuda", QWEN_06B, "lora", train, [500] * 100, 50_000, attn_implementation="eager",
                      free=80 * GiB)
    assert not {"packing", "gradient_checkpointing", "optim", "use_liger_kernel"} & set(plan.settings)
    assert plan.attn_implementation == "eager"


def test_liger_removes_the_logits_from_the_estimate():
    plain = speed.memory_estimate(QWEN_06B, "lora", 32768, False, True, liger=False)
    fused = speed.memory_estimate(QWEN_06B, "lora", 32768, False, True, liger=True)
    assert fused["logits"] == 0 and plain["logits"] == 32768 * 151_936 * 10
    assert fused["activations"] < plain["activations"]
    assert math.isclose(plain["total"] - fused["total"], plain["logits"] + plain["activations"] - fused["activations"])


def test_a_nan_loss_stops_training_in_one_line():
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from lab.train import stop_on_non_finite_loss

    callback, state = stop_on_non_finite_loss(), TrainerState()
    state.global_step = 7
    args = TrainingArguments(output_dir="/tmp/unused", use_cpu=True, report_to="none")
    callback.on_log(args, state, TrainerControl(), logs={"loss": 1.5})
    with pytest.raises(LabError, match="loss became nan at step 7"):
        callback.on_log(args, state, TrainerControl(), logs={"loss": float("nan")})


def test_packed_rows_split_back_into_examples():
    from datasets import Dataset

    from lab.train import check_trained_tokens, trained_rows

    packed = Dataset.from_dict({"input_ids": [[1, 2, 3, 4, 5], [6, 7]], "labels": [[-100, 2, -100, 4, 5], [-100, 7]],
                                "seq_lengths": [[2, 3], [2]]})
    rows = trained_rows(packed)
    assert rows == [([1, 2], [-100, 2]), ([3, 4, 5], [-100, 4, 5]), ([6, 7], [-100, 7])]
    assert check_trained_tokens(rows, 3) == 4
    with pytest.raises(LabError, match="1 of 4 examples"):
        check_trained_tokens(rows, 4)
    with pytest.raises(LabError, match="0 tokens"):
        check_trained_tokens([([1, 2], [-100, -100])], 1)
