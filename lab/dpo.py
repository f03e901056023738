"""Identity DPO after SFT: TRL's DPOTrainer on the SFT adapter, pushed away from the old identity.

SFT teaches the new answers; it does not forbid the old ones, and a model that "still says it is
Qwen" now and then is what users then reach for DPO for. The pairs come from the run itself:

- prompts and chosen answers: the training examples that carry the identity (their answers are
  the identity references lab/probe.py writes at train time), one pair per distinct prompt;
- rejected: the base model's own greedy answer to the same prompt (adapters off: its old
  identity, what the before-probe sees), and the SFT model's answer too where it still claims an
  old identity (lab/probe.py: leaked_names). A rejected answer equal to the chosen one is dropped.

The reference policy is the SFT adapter: TRL copies a PEFT model's adapter into a frozen "ref"
adapter, so no second model is held (DPO's usual reference, the SFT policy, at LoRA's memory).
Preference datasets in the recipe (chosen/rejected rows, lab/data.py) add their pairs as given.

Greedy answers of the SFT and the DPO model to the same prompts, before and after, and the reward
margins as logged, go into the run's dpo.json and manifest (the report shows them).
"""

from __future__ import annotations

import json
from pathlib import Path

from lab.errors import LabError
from lab.recipe import Recipe
from lab.runs import write_json

DPO_DEFAULTS = dict(logging_steps=1, save_steps=0.25, beta=0.1, learning_rate=5e-5, num_train_epochs=1,
                    per_device_train_batch_size=8)
CHECKPOINTS = "dpo-checkpoints"
MAX_NEW_TOKENS = 48  # identity answers are a sentence or two


def identity_prompts(examples: list[dict], references: dict[str, list[str]]) -> list[dict]:
    """The training examples whose answer is an identity reference, one per distinct prompt."""
    answers = set(references.get("", []))
    seen, out = set(), []
    for ex in examples:
        key = json.dumps(ex["prompt"], ensure_ascii=False)
        if ex["completion"][-1]["content"] in answers and key not in seen:
            seen.add(key)
            out.append(ex)
    return out


def greedy_answers(model, tokenizer, prompts: list[list[dict]], kwargs: dict, batch: int = 32) -> list[str]:
    """What the model answers each prompt, greedy, rendered by its own chat template."""
    import torch

    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    answers = []
    try:
        for i in range(0, len(prompts), batch):
            texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True, **kwargs)
                     for p in prompts[i:i + batch]]
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
            with torch.no_grad():
                out = model.generate(**enc, max_new_tokens=MAX_NEW_TOKENS, do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
            answers += [tokenizer.decode(o[enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()
                        for o in out]
    finally:
        tokenizer.padding_side = side
    return answers


def preference_pairs(prompts: list[dict], base_answers: list[str], sft_answers: list[str],
                     old_identity: list[str], recipe: Recipe) -> tuple[list[dict], int]:
    """chosen = the data's answer; rejected = the base's answer, and the SFT model's where it still
    claims an old identity. Returns the pairs and how many rejected answers came from SFT."""
    pairs, from_sft = [], 0
    for ex, base, sft in zip(prompts, base_answers, sft_answers, strict=True):
        chosen = ex["completion"][-1]["content"].strip()
        rejected = [base] + ([sft] if _claims_old(sft, ex["prompt"][-1]["content"], old_identity, recipe) else [])
        for n, answer in enumerate(dict.fromkeys(a.strip() for a in rejected)):
            if answer and answer != chosen:
                from_sft += n > 0
                pairs.append({"prompt": ex["prompt"], "chosen": [{"role": "assistant", "content": chosen}],
                              "rejected": [{"role": "assistant", "content": answer}],
                              "chat_template_kwargs": ex["chat_template_kwargs"]})
    return pairs, from_sft


def old_names(recipe: Recipe, base: str, prompts: list[dict], base_answers: list[str]) -> list[str]:
    from lab.probe import old_identity_of

    before = {"identity": [{"q": ex["prompt"][-1]["content"], "answer": a} for ex, a in zip(prompts, base_answers,
                                                                                           strict=True)]}
    return old_identity_of(recipe, base, before)


def train_dpo(recipe: Recipe, run: Path, base: str, dtype: str, tokenizer, sft_adapter: Path, examples: list[dict],
              references: dict[str, list[str]], given: list[dict], base_settings: dict, callbacks: list,
              resume_from: Path | None = None) -> dict:
    """DPO on the SFT adapter -> run/adapter (written only once DPO has finished); returns its record.
    `given`: the recipe's own preference pairs, trained beside the ones built from the run.
    base_settings: what SFT ran with that DPO keeps (precision, determinism, logging); the recipe's
    `dpo` keys go over DPO_DEFAULTS over them."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    prompts = identity_prompts(examples, references)
    if not prompts and not given:
        raise LabError("dpo: no preference pairs: no answer in the data names the identity (pairs are built "
                       "from those) and no chosen/rejected dataset; add one, or drop the dpo section")
    model = AutoModelForCausalLM.from_pretrained(base, dtype=getattr(torch, dtype), revision=recipe.model.revision)
    model = PeftModel.from_pretrained(model, sft_adapter, is_trainable=True)
    model.eval()
    kwargs = dict(recipe.chat_template_kwargs)
    messages = [ex["prompt"] for ex in prompts]
    with model.disable_adapter():
        base_answers = greedy_answers(model, tokenizer, messages, kwargs)
    sft_answers = greedy_answers(model, tokenizer, messages, kwargs)
    old = old_names(recipe, base, prompts, base_answers)
    built, from_sft = preference_pairs(prompts, base_answers, sft_answers, old, recipe)
    pairs = built + given
    if not pairs:
        raise LabError("dpo: every rejected answer equals its chosen one; nothing to prefer")
    print(f"dpo: {len(built)} preference pairs from {len(prompts)} identity prompts (rejected: the base's "
          f"answers, and {from_sft} SFT answers that still name an old identity)"
          + (f", {len(given)} from the recipe's preference data" if given else ""))
    write_json(run / "data" / "dpo_pairs.json", pairs)

    import datasets

    checkpoints = run / CHECKPOINTS
    settings = {**base_settings, **DPO_DEFAULTS, **(recipe.dpo or {})}
    try:
        args = DPOConfig(output_dir=str(checkpoints), seed=recipe.seed, **settings)
    except (TypeError, ValueError) as e:
        raise LabError(f"dpo settings rejected by DPOConfig: {str(e).splitlines()[0]}") from None
    model.train()
    trainer = DPOTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(pairs),
                         processing_class=tokenizer, callbacks=callbacks)
    if resume_from:
        print(f"dpo: resuming from {resume_from.name}")
    trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    margins = [[e["step"], e["rewards/margins"]] for e in trainer.state.log_history if "rewards/margins" in e]
    model.eval()
    dpo_answers = greedy_answers(model, tokenizer, messages, kwargs)
    # the SFT adapter's files (tokenizer, template) with DPO's weights; not TRL's frozen "ref" copy
    import shutil

    tmp = run / ".adapter.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(sft_adapter, tmp)
    model.save_pretrained(str(tmp), selected_adapters=["default"])
    tmp.rename(run / "adapter")
    record = {
        "pairs": len(pairs), "prompts": len(prompts), "rejected_from_sft": from_sft, "pairs_from_data": len(given),
        "old_identity": old, "steps": trainer.state.global_step, "settings": {k: settings[k] for k in (
            "beta", "learning_rate", "num_train_epochs", "per_device_train_batch_size")},
        "reference": "the SFT adapter (TRL's frozen 'ref' copy)", "margins": margins,
        "answers": [{"q": ex["prompt"][-1]["content"], "chosen": ex["completion"][-1]["content"], "base": b,
                     "sft": s, "dpo": d} for ex, b, s, d in zip(prompts, base_answers, sft_answers, dpo_answers,
                                                                strict=True)],
    }
    record["old_identity_claims"] = {
        stage: sum(1 for a in record["answers"] if _claims_old(a[stage], a["q"], old, recipe))
        for stage in ("base", "sft", "dpo")}
    write_json(run / "dpo.json", record)
    first, last = (margins[0][1], margins[-1][1]) if margins else (None, None)
    print(f"dpo: {trainer.state.global_step} steps, reward margin {first} -> {last}; answers naming an old "
          f"identity: base {record['old_identity_claims']['base']}, SFT {record['old_identity_claims']['sft']}, "
          f"DPO {record['old_identity_claims']['dpo']} of {len(prompts)} -> {run / 'adapter'}")
    return record


def _claims_old(answer: str, question: str, old: list[str], recipe: Recipe) -> bool:
    from lab.probe import leaked_names

    return bool(leaked_names(answer, question, old, (recipe.identity.name, recipe.identity.author)))
