"""Train: recipe -> dataset -> TRL SFTTrainer (LoRA via peft, or full fine-tuning).

Shape of TRL's own `sft.py`: load, build SFTTrainer, train, save. Before any model is loaded,
the data are built and checked; after tokenization, every example must still train on at
least one token. The resolved recipe is saved beside the weights, so merge and reproduce
need nothing else.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from lab.device import capability, speed
from lab.device.hardware import DEFAULTS as HW_DEFAULTS
from lab.device.hardware import host
from lab.device.launch import is_main_process
from lab.errors import LabError
from lab.models import quantization_config, resolve_model, snapshot_commit, source_record
from lab.recipe import Recipe
from lab.runs import write_json, write_text_atomic

# Lab defaults under the recipe's `train` keys (the recipe wins): quiet, local, resumable. A
# checkpoint every tenth of the run (train.save_steps: a step count, or a fraction of the run), so a
# killed run loses at most that much; the last one is kept, and the one before until it is complete.
TRAIN_DEFAULTS = dict(report_to="none", logging_steps=5, save_strategy="steps", save_steps=0.1, save_total_limit=1)
# What transformers writes last into a checkpoint: a directory without it was cut off mid-save.
CHECKPOINT_DONE = "trainer_state.json"


def last_complete_checkpoint(checkpoints: Path, remove_partial: bool = True) -> Path | None:
    """The newest checkpoint that was written to the end; half-written ones (a kill during a save)
    are removed, so neither transformers nor the rotation of old checkpoints ever picks one."""
    import shutil

    found = sorted((d for d in checkpoints.glob("checkpoint-*") if d.name.split("-")[-1].isdigit()),
                   key=lambda d: int(d.name.split("-")[-1]))
    # (the weights' own layout varies: safetensors, FSDP shards, DeepSpeed folders; the state file is last)
    complete = [d for d in found if (d / CHECKPOINT_DONE).is_file()]
    for d in found:
        if remove_partial and d not in complete:
            print(f"train: removing {d.name}: written only in part (interrupted while saving)")
            shutil.rmtree(d, ignore_errors=True)
    return complete[-1] if complete else None


def check_same_data(sources: list[dict], run: Path) -> None:
    """RESUME=1 continues on the data the run started with, or not at all."""
    path = run / "data" / "sources.json"
    if not path.is_file():
        return
    from lab.runs import read_json_file

    started = read_json_file(path, "remove it to skip this check")
    # in order, by the rows' hash: a container sees the same files under other paths
    changed = [now["path"] for then, now in zip(started, sources, strict=False)
               if then["rows_sha256"] != now["rows_sha256"]]
    if len(started) != len(sources) or changed:
        raise LabError(f"RESUME=1: dataset {(changed or [sources[-1]['path']])[0]} changed since {run.name} started; "
                       "the checkpoint was trained on the old rows: restore them, or start a new run")


PARITY_SAMPLES = 4
PARITY_SCAN = 16  # examples looked at to find PARITY_SAMPLES untruncated ones


def peft_config(recipe: Recipe):
    if recipe.method != "lora":
        return None
    from peft import LoraConfig

    lora = recipe.lora
    return LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                      target_modules=lora.target_modules, task_type="CAUSAL_LM")


def trained_rows(dataset) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) of each example as training sees them; packed rows split back by seq_lengths."""
    if "seq_lengths" not in dataset.column_names:
        return list(zip(dataset["input_ids"], dataset["labels"], strict=False))
    rows = []
    for ids, labels, lengths in zip(dataset["input_ids"], dataset["labels"], dataset["seq_lengths"], strict=False):
        start = 0
        for n in lengths:
            rows.append((ids[start:start + n], labels[start:start + n]))
            start += n
    return rows


def check_trained_tokens(rows: list[tuple[list[int], list[int]]], n_examples: int) -> int:
    """docs/pitfalls.md: loss on nothing. TRL drops examples whose completion was truncated away; we refuse instead."""
    if len(rows) != n_examples:
        raise LabError(f"{n_examples - len(rows)} of {n_examples} examples have no trained tokens after "
                       "tokenization (prompt longer than train.max_length?); raise max_length or shorten them")
    counts = [sum(label != -100 for label in labels) for _, labels in rows]
    if min(counts) == 0:
        raise LabError("an example trains on 0 tokens (prompt longer than train.max_length, or an empty "
                       "completion); raise max_length or check the completion field of your data")
    return sum(counts)


def parity_sample(rows: list[tuple[list[int], list[int]]], examples: list[dict], tokenizer,
                  packed: bool = False, max_length: int | None = None) -> list[dict]:
    """The ids training saw for a few conversations; the probe compares them with vLLM's rendering.
    Packing reorders examples, so there each is found again by its last question and its answer.
    A row that reached max_length was cut there, while the server renders the whole conversation:
    comparing it would report template drift that is not there, so it is skipped and the next
    example tried (up to PARITY_SCAN of them)."""
    def text(ids, labels, trained):
        return tokenizer.decode([t for t, label in zip(ids, labels, strict=False) if (label != -100) == trained])

    def find(ex):
        question, answer = ex["prompt"][-1]["content"], ex["completion"][-1]["content"]
        return next(((i, lab) for i, lab in rows if answer in text(i, lab, True)
                     and question in text(i, lab, False)), (None, None))

    def prompt_length(ex, labels):
        if "trained_turns" not in ex:  # the prompt is all that is not trained
            return next(i for i, label in enumerate(labels) if label != -100)
        # a whole conversation trains earlier replies too: its prompt is the one before the last reply
        from lab.data import render_chat

        return len(tokenizer(render_chat(tokenizer, ex["prompt"], ex, True), add_special_tokens=False)["input_ids"])

    # The first examples, and the first ones with replies in their history: rendering past turns
    # (reasoning stripped, separators) is where a template can differ from the server's.
    with_history = [n for n, ex in enumerate(examples) if any(m["role"] == "assistant" for m in ex["prompt"])]
    order = list(dict.fromkeys(with_history[:PARITY_SAMPLES // 2] + list(range(len(examples)))))
    out = []
    for n in order[:PARITY_SCAN]:
        ex = examples[n]
        if len(out) == PARITY_SAMPLES:
            break
        ids, labels = find(ex) if packed else rows[n]
        if ids is None or (max_length is not None and len(ids) >= max_length):
            continue  # not found whole, or truncated: nothing the server's rendering can match
        prompt_len = prompt_length(ex, labels)
        out.append({"prompt": ex["prompt"], "completion": ex["completion"],
                    "chat_template_kwargs": ex["chat_template_kwargs"],
                    **({"tools": ex["tools"]} if "tools" in ex else {}),
                    "prompt_ids": ids[:prompt_len], "input_ids": ids})
    return out


class TrainingFailed(LabError):
    """The loss went non-finite or diverged. The run's checkpoints hold those weights, and RESUME=1
    keeps the recipe that made them, so they are removed with it (train())."""


def stop_on_non_finite_loss():
    """A callback: a NaN or infinite loss ends the run with one line, before anything is saved as a
    result (known bf16 NaN bugs in some ROCm attention/BLAS builds: docs/platform.md).
    Built here because transformers is imported only once training starts."""
    from transformers import TrainerCallback

    class StopOnNonFiniteLoss(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            loss = (logs or {}).get("loss")
            if loss is not None and not math.isfinite(loss):
                raise TrainingFailed(f"training loss became {loss} at step {state.global_step}; no model was saved; "
                                     "start a new run with model.attn_implementation=eager, a lower "
                                     "train.learning_rate, or float32")

    return StopOnNonFiniteLoss()


# A diverged run (a learning rate far too high, data on another scale) is judged on its logged
# loss curve once training ends, by two rules, each with a margin above the batch-to-batch noise of
# a healthy run:
#   1. it ended above where it began: final > first + max(ENDED_ABOVE_REL * first, ENDED_ABOVE_ABS);
#   2. it rose and stayed up: each of the last RISE_POINTS logged losses is above the lowest loss
#      logged before them by more than max(RISE_REL * lowest, RISE_ABS).
# A spike the run recovered from is not divergence; fewer than 2 logged losses are no curve. On the
# shipped recipes' real curves on the embedded model (tests/test_divergence.py, logged every 5 steps
# and every step), stopped at any point, the closest a healthy run comes is 0.80 of rule 1's bar and
# 0.68 of rule 2's; train.learning_rate=1e12 ends at 2.1 times its first loss (3.6 -> 7.6).
ENDED_ABOVE_REL, ENDED_ABOVE_ABS = 0.25, 0.1
RISE_POINTS, RISE_REL, RISE_ABS = 3, 0.5, 0.1


def divergence(curve: list[tuple[int, float]]) -> dict | None:
    """(step, loss) pairs as logged -> {rule, step, loss, ref_step, ref_loss} of the divergence, or
    None. Non-finite losses never get here (stop_on_non_finite_loss ends the run first)."""
    if len(curve) < 2:
        return None
    (step0, first), (step, last) = curve[0], curve[-1]
    if last > first + max(ENDED_ABOVE_REL * abs(first), ENDED_ABOVE_ABS):
        return {"rule": "ended above its first", "step": step, "loss": last, "ref_step": step0, "ref_loss": first}
    if len(curve) > RISE_POINTS:
        ref_step, low = min(curve[:-RISE_POINTS], key=lambda p: p[1])
        if all(loss > low + max(RISE_REL * abs(low), RISE_ABS) for _, loss in curve[-RISE_POINTS:]):
            return {"rule": "rose and stayed up", "step": step, "loss": last, "ref_step": ref_step, "ref_loss": low}
    return None


def _short(x: float) -> str:
    """1e12, 0.001, 2e-05: a number as a user types it."""
    return f"{x:.4g}".replace("e+", "e")


def divergence_message(d: dict, learning_rate: float) -> str:
    if d["rule"] == "ended above its first":
        what = (f"loss {_short(d['loss'])} at step {d['step']}, above its first logged {_short(d['ref_loss'])} "
                f"(step {d['ref_step']})")
    else:
        what = (f"loss rose from its lowest {_short(d['ref_loss'])} (step {d['ref_step']}) and stayed up, to "
                f"{_short(d['loss'])} at step {d['step']}")
    return f"training diverged: {what}; lower train.learning_rate (now {_short(learning_rate)}) and start a new run"


def write_metrics(run: Path, history: list[dict]) -> None:
    write_text_atomic(run / "metrics.jsonl", "".join(json.dumps(entry) + "\n" for entry in history))


def speed_plan(recipe: Recipe, base: str, tokenizer, examples: list[dict], settings: dict, dtype: str):
    """lab/device/speed.py's choices for this run (None when the recipe sets speed: false)."""
    if not recipe.speed:
        return None
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(base, revision=recipe.model.revision)
    shape = speed.model_shape(config, recipe.lora.r if recipe.method == "lora" else 0, recipe.lora.target_modules)
    return speed.plan(recipe.backend, shape, recipe.method, settings, speed.token_lengths(tokenizer, examples),
                      len(examples), recipe.model.attn_implementation, int(os.environ.get("WORLD_SIZE", "1")),
                      half=dtype != "float32" or bool(settings.get("bf16") or settings.get("fp16")),
                      masters=dtype == "float32")  # float32 weights under autocast (full fine-tuning)


def train(recipe: Recipe, run: Path, resume: bool = False) -> Path:
    from lab.data import (
        build_examples,
        sft_and_preferences,
        to_dataset,
        tokenize_in_lab,
        tokenized_in_lab,
        write_examples,
    )

    for key, value in HW_DEFAULTS[recipe.backend]["env"].items():  # before torch initialises the device
        os.environ.setdefault(key, value)

    # Under accelerate launch every process builds the same examples; rank 0 alone writes files.
    main = is_main_process()
    examples, sources = build_examples(recipe)
    examples, preferences = sft_and_preferences(examples, sources, recipe)
    checkpoints = run / "checkpoints"
    # With a DPO stage the SFT adapter is kept apart; run/adapter appears once DPO has finished.
    sft_out = run / ("model" if recipe.method == "full" else "adapter-sft" if recipe.dpo is not None else "adapter")
    if recipe.dpo is not None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise LabError("dpo: the DPO stage runs in one process; train without LAUNCH/NPROC, or drop the dpo section")
    resume_from, sft_done = None, False
    if resume:
        from lab.recipe import check_resume, load_saved

        check_resume(run, load_saved(run), recipe)
        check_same_data(sources, run)
        # SFT finished and only DPO was cut off: DPO resumes from its own checkpoints
        sft_done = recipe.dpo is not None and (run / "train.json").is_file() and sft_out.is_dir()
        resume_from = None if sft_done else last_complete_checkpoint(checkpoints, remove_partial=main)
        if resume_from is None and not sft_done:
            raise LabError(f"RESUME=1 but {checkpoints} holds no complete checkpoint to resume from")
    if main and not resume:  # a resumed run keeps what it started with
        write_examples(examples, run / "data" / "train.jsonl")
        write_json(run / "data" / "sources.json", sources)
        # What the identity data answers, for every later probe: they read this file, never the
        # datasets (a host that only drives containers has no pyarrow or datasets; big data is slow).
        from lab.probe import REFERENCES_FILE, identity_references

        write_json(run / "data" / REFERENCES_FILE, identity_references(recipe))
        for s in sources:
            if s["stage"] == "dpo":
                print(f"data: {s['path']}: {s['rows']} rows -> {s['examples']} preference pairs (the DPO stage)")
            else:
                print(f"data: {s['path']}: {s['rows']} rows, {s['assistant_turns']} assistant turns, "
                      f"{s['turns_trained']} trained ({s['train_on']}) -> {s['examples']} examples")
        print(f"data: {len(examples)} training examples -> {run / 'data' / 'train.jsonl'}")
        write_text_atomic(run / "recipe.yaml", recipe.to_yaml())
    if resume_from:
        print(f"train: resuming from {resume_from.name}")
    # What this device runs (precision, weight dtype), before anything heavy loads; a GPU backend
    # that sees no GPU stops here with the cause.
    device = capability.detect(recipe.backend)
    dtype, device_settings, decisions = capability.decide(recipe, device)
    if main:
        print(f"device: {device.name} ({device.arch or recipe.backend})")
        for d in decisions:
            print(f"device: {d['setting']}={d['value']} ({d['why']})")
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

    settings = {**TRAIN_DEFAULTS, **HW_DEFAULTS[recipe.backend]["train"], **recipe.train, **device_settings}
    # train.assistant_only_loss: the lab's masks from the model's own template (lab/data.py:
    # tokenize_in_lab), so TRL is not asked to patch a template it does not know by name
    settings.pop("assistant_only_loss", None)
    plan = speed_plan(recipe, base, tokenizer, examples, settings, dtype)
    attn = plan.attn_implementation if plan else recipe.model.attn_implementation.replace("auto", "sdpa")
    if plan:
        settings.update(plan.settings)
        if main:
            for d in plan.decisions:
                print(f"speed: {d['setting']}={d['value']} ({d['why']})")
    from lab import tracking
    from lab.runs import RUNS_DIR

    settings.update(tracking.training_settings(recipe, run, RUNS_DIR))  # report_to: trackio, kept local
    if recipe.deterministic:  # TrainingArguments enables it (use_deterministic_algorithms, seeds, cuBLAS)
        settings.update(full_determinism=True, data_seed=recipe.seed, dataloader_num_workers=0)
    try:
        args = SFTConfig(
            output_dir=str(checkpoints), seed=recipe.seed,
            model_init_kwargs={"dtype": dtype, "attn_implementation": attn, "revision": recipe.model.revision,
                               "use_safetensors": not recipe.model.allow_pickle},
            **settings,
        )
    except ValueError as e:  # transformers' own validation of the settings
        raise LabError(f"train settings rejected by SFTConfig: {str(e).splitlines()[0]}") from None
    if sft_done:
        print(f"train: SFT finished earlier ({sft_out.name}); resuming the DPO stage")
        return dpo_stage(recipe, run, base, dtype, tokenizer, sft_out, examples, preferences, settings, resume=True)
    quantization = quantization_config(recipe.lora.quantize if recipe.method == "lora" else "none", dtype)
    dataset = to_dataset(tokenize_in_lab(tokenizer, examples) if tokenized_in_lab(recipe, examples) else examples)
    trainer = SFTTrainer(model=base, args=args, train_dataset=dataset,
                         processing_class=tokenizer, peft_config=peft_config(recipe),
                         quantization_config=quantization, callbacks=[stop_on_non_finite_loss()])
    rows = trained_rows(trainer.train_dataset)
    trained_tokens = check_trained_tokens(rows, len(examples))
    if main:
        parity = parity_sample(rows, examples, tokenizer, packed=bool(args.packing), max_length=args.max_length)
        if not parity:
            print(f"train: no parity sample: the first {PARITY_SCAN} examples all reached train.max_length="
                  f"{args.max_length} (or were not found whole); the probe cannot check template parity")
        write_json(run / "parity.json", parity)

    try:
        # an explicit directory: transformers' own pick is the highest number, complete or not
        result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
        diverged = divergence([(e["step"], e["loss"]) for e in trainer.state.log_history if "loss" in e])
        if diverged:
            raise TrainingFailed(f"{divergence_message(diverged, args.learning_rate)}; no model was saved (losses: "
                                 f"{run / 'metrics.jsonl'})")
    except TrainingFailed:
        # Before anything is saved as a result. The checkpoints hold weights that diverged or went
        # NaN, and RESUME=1 would only repeat them, so they go: a new run is then one that failed
        # before its first checkpoint, removed by `lab train` with its loss curve kept in runs/.failed/.
        if main:
            import shutil

            write_metrics(run, trainer.state.log_history)
            shutil.rmtree(checkpoints, ignore_errors=True)
        raise
    history = trainer.state.log_history
    out = sft_out
    trainer.save_model(str(out))  # collective under FSDP/ZeRO-3; rank 0 writes
    if not main:
        return out
    peak_gib = speed.peak_memory_gib(recipe.backend)
    write_metrics(run, history)
    losses = [e["loss"] for e in history if "loss" in e]
    write_json(run / "train.json", {
        "base_model": base, "method": recipe.method, "dtype": dtype, "output": out.name,
        # QLoRA: the base it trained against (merge rebuilds it from this)
        "quantize": recipe.lora.quantize if recipe.method == "lora" else "none",
        "examples": len(examples), "trained_tokens_per_epoch": trained_tokens, "sources": sources,
        "global_steps": trainer.state.global_step, "train_runtime_s": round(result.metrics["train_runtime"], 1),
        "final_loss": losses[-1] if losses else None, "attn_implementation": attn,
        "packed_rows": len(trainer.train_dataset) if args.packing else None,
        "peak_memory_gib": peak_gib,
        # merge refuses a run whose DPO stage has not finished (lab/merge.py)
        **({"dpo": "pending"} if recipe.dpo is not None else {}),
    })
    from lab import manifest

    manifest.update(
        run,
        # A hub download lives in .../snapshots/<commit>/: that commit pins what "main" meant then;
        # a GGUF file's sha256 and the wheel it came from are recorded as converted_from.
        **manifest.training(recipe, sources, base, {"commit": snapshot_commit(base),
                                                    "converted_from": source_record(base)}, out),
        # what this device could run, and what was decided from it (precision, weight dtype)
        device={**device.record(), "dtype": dtype, "decisions": decisions},
        seeds={"seed": recipe.seed, "data_seed": args.data_seed, "deterministic": recipe.deterministic,
               "full_determinism": args.full_determinism, "torch_threads": torch.get_num_threads()},
        # what accelerate actually ran (on CPU an FSDP or ZeRO config still runs as multi-CPU DDP)
        distributed={"processes": trainer.args.world_size, "accelerate_config": os.environ.get("LAB_DIST"),
                     "type": str(trainer.accelerator.distributed_type).split(".")[-1],
                     **json.loads(os.environ.get("LAB_TOPOLOGY") or '{"nodes": 1}')},
        # what the lab chose for speed and why, its memory estimate, and what training really used
        speed={**(plan.record() if plan else {"enabled": False}), "attn_implementation": attn,
               "measured_peak_gib": peak_gib},
        hardware=host(recipe.backend),
        loss_curve=[[e["step"], e["loss"]] for e in history if "loss" in e],
    )
    print(f"train: {trainer.state.global_step} steps, final loss {losses[-1] if losses else 'n/a'} -> {out}")
    if recipe.dpo is not None:
        del trainer  # the DPO stage loads its own copy of the base with the SFT adapter
        return dpo_stage(recipe, run, base, dtype, tokenizer, out, examples, preferences, settings)
    return out


def dpo_stage(recipe: Recipe, run: Path, base: str, dtype: str, tokenizer, sft_out: Path, examples: list[dict],
              preferences: list[dict], settings: dict, resume: bool = False) -> Path:
    """lab/dpo.py on the SFT adapter; then train.json and the manifest name its adapter as the output."""
    from lab import manifest
    from lab.dpo import CHECKPOINTS, train_dpo
    from lab.probe import REFERENCES_FILE

    references = json.loads((run / "data" / REFERENCES_FILE).read_text(encoding="utf-8"))
    # what SFT ran with that DPO keeps: the device's precision, determinism, checkpointing, logging
    kept = {k: settings[k] for k in ("use_cpu", "bf16", "fp16", "full_determinism", "data_seed",
                                     "dataloader_num_workers", "max_length") if k in settings}
    resume_from = last_complete_checkpoint(run / CHECKPOINTS) if resume else None
    record = train_dpo(recipe, run, base, dtype, tokenizer, sft_out, examples, references, preferences,
                       {**TRAIN_DEFAULTS, **kept}, [stop_on_non_finite_loss()], resume_from)
    out = run / "adapter"
    info = json.loads((run / "train.json").read_text(encoding="utf-8"))
    summary = {k: v for k, v in record.items() if k != "answers"}  # the answers stay in dpo.json
    info.update(output=out.name, dpo=summary)
    write_json(run / "train.json", info)
    manifest.update(run, output={"dir": out.name, "weights_sha256": manifest.weights_sha256(out),
                                 "sft": {"dir": sft_out.name, "weights_sha256": manifest.weights_sha256(sft_out)}},
                    dpo=summary)
    return out
