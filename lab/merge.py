"""Merge: adapter + base -> one complete Hugging Face checkpoint that vLLM loads as-is.

After litgpt's merge_lora: idempotent, reads the base model and dtype from what training
saved, merges on CPU in the training dtype (pitfall 8), writes to a temporary directory and
renames it into place only after every check passed. The checks are the field's known merge
failures: tied embeddings (pitfall 4), end-of-turn eos (2), tokenizer files (3), chat template
(1), and greedy agreement of adapter-on-base and merged model on the probe prompts.
"""

from __future__ import annotations

import filecmp
import shutil
from pathlib import Path

from lab.errors import LabError
from lab.runs import read_json, write_json

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "chat_template.json", "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json")
MERGE_RECORD = "lab_merge.json"
AGREEMENT_MIN = {"float32": 1.0, "bfloat16": 0.8, "float16": 0.8}  # half precision rounds the merged sum


def end_of_turn_id(tokenizer, chat_template_kwargs: dict) -> int:
    """The special token the chat template closes an assistant turn with (e.g. <|im_end|>)."""
    user = [{"role": "user", "content": "hi"}]
    prompt = tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=False, **chat_template_kwargs)
    full = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": "ok"}], tokenize=False,
                                         **chat_template_kwargs)
    tail = tokenizer(full[len(prompt):], add_special_tokens=False)["input_ids"]
    specials = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    for token in tail:
        if token in specials:
            return token
    raise LabError("the chat template closes an assistant turn with no special token; cannot check eos")


def _saved_tensor_names(model_dir: Path) -> set[str]:
    from safetensors import safe_open

    names: set[str] = set()
    for f in model_dir.glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            names.update(st.keys())
    return names


def check_merged(merged: Path, base: Path | str, chat_template_kwargs: dict) -> dict:
    """The properties vLLM relies on; raises LabError naming the first one that fails."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    # Cheap file checks first: a damaged tokenizer file would not even load below.
    base_dir = Path(base)
    copied = [f for f in TOKENIZER_FILES if (base_dir / f).is_file()]
    for f in copied:
        if not (merged / f).is_file() or not filecmp.cmp(base_dir / f, merged / f, shallow=False):
            raise LabError(f"{merged}/{f} differs from the base model's copy")
    names = _saved_tensor_names(merged)
    if not names:
        raise LabError(f"{merged}: no safetensors weights written")
    config = AutoConfig.from_pretrained(merged)
    tied = bool(getattr(config.get_text_config(), "tie_word_embeddings", False))
    has_head = any(n.endswith("lm_head.weight") for n in names)
    if tied and has_head:
        raise LabError(f"{merged}: config ties word embeddings but a separate lm_head was saved (trained head would be dropped)")
    if not tied and not has_head:
        raise LabError(f"{merged}: config unties word embeddings but no lm_head weight was saved")
    tokenizer = AutoTokenizer.from_pretrained(merged)
    if not tokenizer.chat_template:
        raise LabError(f"{merged}: no chat template in the merged model")
    eot = end_of_turn_id(tokenizer, chat_template_kwargs)
    eos = _eos_ids(GenerationConfig.from_pretrained(merged))
    if eot not in eos:
        raise LabError(f"{merged}: generation_config eos ids {eos} miss the end-of-turn token {eot}")
    return {"tie_word_embeddings": tied, "end_of_turn_id": eot, "eos_token_id": eos, "tokenizer_files": copied}


def _eos_ids(generation_config) -> list[int]:
    eos = generation_config.eos_token_id
    return [eos] if isinstance(eos, int) else list(eos or [])


def _write_generation_config(model, out: Path, eot: int) -> None:
    gen = model.generation_config
    eos = _eos_ids(gen)
    if eot not in eos:
        gen.eos_token_id = [eot, *eos]
    gen.save_pretrained(out)


def merge(run: Path) -> Path:
    merged = run / "merged"
    if (merged / MERGE_RECORD).is_file():
        print(f"merge: {merged} is already merged; nothing to do")
        return merged
    info = read_json(run / "train.json", "make train")
    trained = run / info["output"]
    if not trained.is_dir():
        raise LabError(f"{trained} is missing; `make train` produces it")

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lab.fixture import greedy_answers
    from lab.probe import load_questions
    from lab.recipe import load_saved

    recipe = load_saved(run)
    base, dtype = info["base_model"], getattr(torch, info["dtype"])
    tokenizer = AutoTokenizer.from_pretrained(base)
    if info["method"] == "lora":
        from peft import PeftModel

        # safetensors only (pickle can run code), unless the recipe opted in for its base model
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(
            base, dtype=dtype, use_safetensors=not recipe.model.allow_pickle), trained).eval()
        probe = load_questions(recipe)
        questions = [q["q"] for q in probe["identity"] + probe["controls"]]
        with_adapter = greedy_answers(model, tokenizer, questions, recipe.probe.max_tokens)
        model = model.merge_and_unload()
    else:
        model = AutoModelForCausalLM.from_pretrained(trained, dtype=dtype, use_safetensors=True).eval()
        questions, with_adapter = [], []

    tmp = run / ".merged.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp)
        for f in TOKENIZER_FILES:  # byte for byte: a re-saved tokenizer can break vLLM (pitfall 3)
            if (Path(base) / f).is_file():
                shutil.copyfile(Path(base) / f, tmp / f)
        _write_generation_config(model, tmp, end_of_turn_id(tokenizer, recipe.chat_template_kwargs))
        checks = check_merged(tmp, base, recipe.chat_template_kwargs)
        if questions:
            reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=dtype, use_safetensors=True).eval()
            merged_answers = greedy_answers(reloaded, tokenizer, questions, recipe.probe.max_tokens)
            agree = sum(a == b for a, b in zip(with_adapter, merged_answers)) / len(questions)
            if agree < AGREEMENT_MIN[info["dtype"]]:
                diff = next((q, a, b) for q, a, b in zip(questions, with_adapter, merged_answers) if a != b)
                raise LabError(f"merged model disagrees with adapter-on-base on {1 - agree:.0%} of probe prompts, "
                               f"e.g. {diff[0]!r}: {diff[1]!r} vs {diff[2]!r}")
            checks["greedy_agreement"] = agree
        write_json(tmp / MERGE_RECORD, {"base_model": base, "method": info["method"], "dtype": info["dtype"],
                                        "checks": checks})
        shutil.rmtree(merged, ignore_errors=True)
        tmp.rename(merged)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    from lab import manifest

    manifest.update(run, merged={"dir": merged.name, "dtype": info["dtype"], "checks": checks,
                                 "weights_sha256": manifest.weights_sha256(merged)})
    print(f"merge: {merged} ({info['dtype']}, checks passed: {', '.join(checks)})")
    return merged
