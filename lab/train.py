"""Train: recipe -> dataset -> TRL SFTTrainer (LoRA via peft, or full fine-tuning).

Shape of TRL's own `sft.py`: load, build SFTTrainer, train, save. Before any model is loaded,
the data are built and checked; after tokenization, every example must still train on at
least one token. The resolved recipe is saved beside the weights, so merge and reproduce
need nothing else.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from lab.errors import LabError
from lab.hardware import DEFAULTS as HW_DEFAULTS
from lab.launch import is_main_process
from lab.recipe import EMBEDDED, Recipe
from lab.runs import write_json

# Lab defaults under the recipe's `train` keys (the recipe wins): quiet, local, resumable.
TRAIN_DEFAULTS = dict(report_to="none", logging_steps=5, save_strategy="epoch", save_total_limit=1)
PARITY_SAMPLES = 4


def resolve_model(recipe: Recipe) -> str:
    if recipe.model.path == EMBEDDED:
        from lab.fixture import ensure_fixture

        return str(ensure_fixture())
    local = Path(recipe.model.path).expanduser()
    return str(local.resolve()) if local.exists() else recipe.model.path  # else: a hub id


def peft_config(recipe: Recipe):
    if recipe.method != "lora":
        return None
    from peft import LoraConfig

    lora = recipe.lora
    return LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                      target_modules=lora.target_modules, task_type="CAUSAL_LM")


def check_trained_tokens(trainer, n_examples: int) -> int:
    """Pitfall 6: TRL drops examples whose completion was truncated away; we refuse instead."""
    ds = trainer.train_dataset
    if len(ds) != n_examples:
        raise LabError(f"{n_examples - len(ds)} of {n_examples} examples have no trained tokens after "
                       "tokenization (prompt longer than train.max_length?); raise max_length or shorten them")
    counts = [sum(label != -100 for label in labels) for labels in ds["labels"]]
    if min(counts) == 0:
        raise LabError("an example trains on 0 tokens; check the completion field of your data")
    return sum(counts)


def parity_sample(trainer, examples: list[dict]) -> list[dict]:
    """The ids training saw for a few conversations; the probe compares them with vLLM's rendering."""
    out = []
    for i in range(min(PARITY_SAMPLES, len(examples))):
        row = trainer.train_dataset[i]
        prompt_len = next(i for i, label in enumerate(row["labels"]) if label != -100)
        out.append({"prompt": examples[i]["prompt"], "completion": examples[i]["completion"],
                    "chat_template_kwargs": examples[i]["chat_template_kwargs"],
                    "prompt_ids": row["input_ids"][:prompt_len], "input_ids": row["input_ids"]})
    return out


def train(recipe: Recipe, run: Path, resume: bool = False) -> Path:
    from lab.data import build_examples, to_dataset, write_examples

    for key, value in HW_DEFAULTS[recipe.backend]["env"].items():  # before torch initialises the device
        os.environ.setdefault(key, value)

    # Under accelerate launch every process builds the same examples; rank 0 alone writes files.
    main = is_main_process()
    examples, sources = build_examples(recipe)
    if main:
        write_examples(examples, run / "data" / "train.jsonl")
        for s in sources:
            print(f"data: {s['path']}: {s['rows']} rows -> {s['examples']} examples")
        print(f"data: {len(examples)} training examples -> {run / 'data' / 'train.jsonl'}")
        (run / "recipe.yaml").write_text(recipe.to_yaml(), encoding="utf-8")

    checkpoints = run / "checkpoints"
    if resume and not any(checkpoints.glob("checkpoint-*")):
        raise LabError(f"RESUME=1 but {checkpoints} holds no checkpoint to resume from")
    base = resolve_model(recipe)

    import torch
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    try:
        tokenizer = AutoTokenizer.from_pretrained(base, revision=recipe.model.revision)
    except OSError as e:
        raise LabError(f"model {base!r}: cannot load its tokenizer ({str(e).splitlines()[0]})") from None
    if not tokenizer.chat_template:
        raise LabError(f"model {base!r} has no chat template; use an instruct/chat model")

    settings = {**TRAIN_DEFAULTS, **HW_DEFAULTS[recipe.backend]["train"], **recipe.train}
    if recipe.deterministic:  # TrainingArguments enables it (use_deterministic_algorithms, seeds, cuBLAS)
        settings.update(full_determinism=True, data_seed=recipe.seed, dataloader_num_workers=0)
    try:
        args = SFTConfig(
            output_dir=str(checkpoints), seed=recipe.seed,
            model_init_kwargs={"dtype": recipe.model.dtype, "attn_implementation": recipe.model.attn_implementation,
                               "revision": recipe.model.revision},
            **settings,
        )
    except ValueError as e:  # transformers' own validation of the settings
        raise LabError(f"train settings rejected by SFTConfig: {str(e).splitlines()[0]}") from None
    trainer = SFTTrainer(model=base, args=args, train_dataset=to_dataset(examples),
                         processing_class=tokenizer, peft_config=peft_config(recipe))
    trained_tokens = check_trained_tokens(trainer, len(examples))
    if main:
        write_json(run / "parity.json", parity_sample(trainer, examples))

    result = trainer.train(resume_from_checkpoint=True if resume else None)
    out = run / ("adapter" if recipe.method == "lora" else "model")
    trainer.save_model(str(out))  # collective under FSDP/ZeRO-3; rank 0 writes
    if not main:
        return out
    history = trainer.state.log_history
    with (run / "metrics.jsonl").open("w", encoding="utf-8") as f:
        for entry in history:
            f.write(json.dumps(entry) + "\n")
    losses = [e["loss"] for e in history if "loss" in e]
    write_json(run / "train.json", {
        "base_model": base, "method": recipe.method, "dtype": recipe.model.dtype, "output": out.name,
        "examples": len(examples), "trained_tokens_per_epoch": trained_tokens, "sources": sources,
        "global_steps": trainer.state.global_step, "train_runtime_s": round(result.metrics["train_runtime"], 1),
        "final_loss": losses[-1] if losses else None,
    })
    from lab import manifest

    manifest.update(
        run,
        recipe={"name": recipe.name, "sha256": recipe.sha256(), "source": manifest.relative_to_lab(recipe.source),
                "resolved": recipe.model_dump(mode="json", exclude={"source"})},
        datasets=[{**s, "file_sha256": manifest.sha256_file(Path(s["path"])) if Path(s["path"]).is_file() else None}
                  for s in sources],
        # A hub download lives in .../snapshots/<commit>/: that commit pins what "main" meant then.
        base_model={"source": recipe.model.path, "revision": recipe.model.revision, "path": base,
                    "commit": Path(base).name if Path(base).parent.name == "snapshots" else None,
                    "weights_sha256": manifest.weights_sha256(base)},
        output={"dir": out.name, "weights_sha256": manifest.weights_sha256(out)},
        seeds={"seed": recipe.seed, "data_seed": args.data_seed, "deterministic": recipe.deterministic,
               "full_determinism": args.full_determinism, "torch_threads": torch.get_num_threads()},
        # what accelerate actually ran (on CPU an FSDP or ZeRO config still runs as multi-CPU DDP)
        distributed={"processes": trainer.args.world_size, "accelerate_config": os.environ.get("LAB_DIST"),
                     "type": str(trainer.accelerator.distributed_type).split(".")[-1]},
        environment=manifest.environment(), hardware=manifest.hardware(recipe.backend),
        loss_curve=[[e["step"], e["loss"]] for e in history if "loss" in e],
    )
    print(f"train: {trainer.state.global_step} steps, final loss {losses[-1] if losses else 'n/a'} -> {out}")
    return out
