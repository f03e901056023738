"""Merge: adapter + base -> one complete Hugging Face checkpoint that vLLM loads as-is.

After litgpt's merge_lora: idempotent, reads the base model and dtype from what training
saved, merges in the training dtype (docs/pitfalls.md: quantized merge), on the GPU when one is present and the base
fits in its free memory, else on CPU, writes to a temporary directory and renames it into place
only after every check passed. One copy of the model is in memory at a time: the adapter is
merged into the loaded base in place, and that model is freed before the saved one is loaded
back. The checks are the field's known merge failures: tied embeddings (docs/pitfalls.md: tied embeddings), end-of-turn
eos (2), tokenizer files (3), chat template (1), and agreement of adapter-on-base and the saved
merged model on the next token, teacher-forced along the adapter's first greedy tokens after
each probe prompt (a near-tie late in a long answer cannot cascade into a different string).
"""

from __future__ import annotations

import filecmp
import shutil
from pathlib import Path

from lab.errors import LabError
from lab.runs import read_json, share_weights, write_json

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "chat_template.json", "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json")
MERGE_RECORD = "lab_merge.json"
AGREEMENT_MIN = {"float32": 1.0, "bfloat16": 0.8, "float16": 0.8}  # half precision rounds the merged sum
AGREEMENT_TOKENS = 8  # greedy tokens of the adapter after each probe prompt; each position's top-1 is compared
TOP_K = 5  # reference logits kept per position (max_logit_diff), not the whole vocabulary
GPU_HEADROOM = 1.25  # weights x this must fit in free GPU memory (activations of short prompts, the adapter)


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
        raise LabError(f"{merged}: config ties word embeddings but a separate lm_head was saved "
                       "(trained head would be dropped)")
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


def _parameter_bytes(model_dir: Path | str, dtype) -> int:
    """The model's weights in `dtype`, from the safetensors headers (nothing loaded); for pickled
    weights (model.allow_pickle), the files' own size."""
    import math

    from safetensors import safe_open

    count = 0
    for f in Path(model_dir).glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            count += sum(math.prod(st.get_slice(name).get_shape()) for name in st.keys())
    if not count:
        return sum(f.stat().st_size for f in Path(model_dir).glob("*.bin") if f.name != "training_args.bin")
    return count * dtype.itemsize


def merge_device(base: Path | str, dtype) -> str:
    """cuda when a GPU is present and the base model fits in its free memory, else cpu."""
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    need, (free, _) = _parameter_bytes(base, dtype) * GPU_HEADROOM, torch.cuda.mem_get_info()
    if need > free:
        print(f"merge: on CPU: the base model needs {need / 2**30:.1f} GiB, the GPU has {free / 2**30:.1f} GiB free")
        return "cpu"
    return "cuda"


def _free() -> None:
    """Return a dropped model's memory now (the next load must not stack on it)."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _logits(model, ids, prompt_len: int):
    """Next-token logits at the prompt's last position and at every generated one."""
    import torch

    with torch.inference_mode():
        return model(input_ids=ids.to(model.device)).logits[0, prompt_len - 1:].float().cpu()


def reference_predictions(model, tokenizer, questions: list[str], chat_template_kwargs: dict) -> list[dict]:
    """For each question: the prompt (rendered as training and serving render it) plus the model's
    first AGREEMENT_TOKENS greedy tokens, and the model's top-1 and TOP_K logits at each position."""
    import torch

    out = []
    for q in questions:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                               return_tensors="pt", return_dict=True, **chat_template_kwargs)
        with torch.inference_mode():
            ids = model.generate(**prompt.to(model.device), max_new_tokens=AGREEMENT_TOKENS, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id).cpu()
        n = prompt["input_ids"].shape[1]
        logits = _logits(model, ids, n)
        top = logits.topk(min(TOP_K, logits.shape[-1]))
        out.append({"q": q, "ids": ids, "prompt_len": n, "top1": logits.argmax(-1), "top_ids": top.indices,
                    "top_values": top.values})
    return out


def agreement(model, reference: list[dict]) -> dict:
    """How far `model` predicts the next token as the reference model did, on the same ids: the
    share of positions with the same top-1, and the largest logit difference on the reference's
    TOP_K tokens; the first disagreement, if any, as (question, position, reference id, model id)."""
    same = total = 0
    worst, first = 0.0, None
    for r in reference:
        logits = _logits(model, r["ids"], r["prompt_len"])
        top1 = logits.argmax(-1)
        hits = top1 == r["top1"]
        same, total = same + int(hits.sum()), total + len(hits)
        worst = max(worst, float((logits.gather(-1, r["top_ids"]) - r["top_values"]).abs().max()))
        if first is None and not bool(hits.all()):
            i = int((~hits).nonzero()[0])
            first = (r["q"], i, int(r["top1"][i]), int(top1[i]))
    return {"share": same / total if total else 1.0, "positions": total, "max_logit_diff": worst, "first": first}


def merge(run: Path) -> Path:
    merged = run / "merged"
    if (merged / MERGE_RECORD).is_file():
        print(f"merge: {merged} is already merged; nothing to do")
        return merged
    info = read_json(run / "train.json", "make train")
    if info.get("dpo") == "pending":
        raise LabError(f"{run.name}: SFT finished but its DPO stage did not; `make train RUN={run.name} RESUME=1` "
                       "continues it")
    trained = run / info["output"]
    if not trained.is_dir():
        raise LabError(f"{trained} is missing; `make train` produces it")

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lab.probe import load_questions
    from lab.recipe import load_saved

    recipe = load_saved(run)
    kwargs = recipe.chat_template_kwargs
    base, dtype = info["base_model"], getattr(torch, info["dtype"])
    tokenizer = AutoTokenizer.from_pretrained(base)
    device, reference = "cpu", []  # a full fine-tune is only re-saved: no compute, the CPU is enough
    quantize = info.get("quantize", "none")
    if info["method"] == "lora":
        from peft import PeftModel

        from lab.models import quantization_config

        device = merge_device(base, dtype)
        # safetensors only (pickle can run code), unless the recipe opted in for its base model
        load = dict(dtype=dtype, use_safetensors=not recipe.model.allow_pickle,
                    device_map=device if device != "cpu" else None)
        quantized = quantization_config(quantize, info["dtype"])
        # the reference: the adapter on the base it trained against (QLoRA: the NF4 base)
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(
            base, quantization_config=quantized, **load), trained).eval()
        probe = load_questions(recipe)
        reference = reference_predictions(model, tokenizer, [q["q"] for q in probe["identity"] + probe["controls"]],
                                          kwargs)
        if quantized is not None:
            # Never merged into 4-bit weights (peft would round the sum back to NF4): into the NF4
            # base dequantized (what was trained), or, on purpose, into the original base.
            del model
            _free()
            into = recipe.lora.merge_into
            plain = (AutoModelForCausalLM.from_pretrained(base, quantization_config=quantized, **load).dequantize()
                     .to(dtype) if into == "dequantized" else AutoModelForCausalLM.from_pretrained(base, **load))
            model = PeftModel.from_pretrained(plain, trained).eval()
            print(f"merge: QLoRA adapter into the {'dequantized NF4' if into == 'dequantized' else 'original'} base")
        model = model.merge_and_unload()  # into the base's own weights, in place: still one copy
    else:
        model = AutoModelForCausalLM.from_pretrained(trained, dtype=dtype, use_safetensors=True).eval()

    tmp = run / ".merged.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp)
        # byte for byte: a re-saved tokenizer can break vLLM (docs/pitfalls.md: re-saved tokenizer)
        for f in TOKENIZER_FILES:
            if (Path(base) / f).is_file():
                shutil.copyfile(Path(base) / f, tmp / f)
        _write_generation_config(model, tmp, end_of_turn_id(tokenizer, kwargs))
        del model
        _free()
        checks = check_merged(tmp, base, kwargs)
        if reference:  # what was saved, as vLLM will load it, against the adapter on the base
            saved = AutoModelForCausalLM.from_pretrained(tmp, dtype=dtype, use_safetensors=True,
                                                         device_map=device if device != "cpu" else None).eval()
            agreed = agreement(saved, reference)
            del saved
            _free()
            # the original base under a QLoRA adapter differs by the quantization error: recorded, and
            # held to the half-precision bar; every other merge to its dtype's
            least = AGREEMENT_MIN["bfloat16" if quantize != "none" else info["dtype"]]
            if agreed["share"] < least:
                q, i, want, got = agreed["first"]
                raise LabError(f"merged model disagrees with adapter-on-base on {1 - agreed['share']:.0%} of "
                               f"{agreed['positions']} next-token predictions (up to {AGREEMENT_TOKENS} greedy "
                               f"tokens after each of {len(reference)} probe prompts), e.g. {q!r} at token {i}: "
                               f"{tokenizer.decode([want])!r} vs {tokenizer.decode([got])!r}")
            checks.update(greedy_agreement=round(agreed["share"], 4), agreement_positions=agreed["positions"],
                          max_logit_diff=round(agreed["max_logit_diff"], 6))
        if quantize != "none":
            checks["qlora"] = {"quantize": quantize, "merged_into": recipe.lora.merge_into}
        write_json(tmp / MERGE_RECORD, {"base_model": base, "method": info["method"], "dtype": info["dtype"],
                                        "device": device, "checks": checks})
        share_weights(tmp)
        shutil.rmtree(merged, ignore_errors=True)
        tmp.rename(merged)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    from lab import manifest

    manifest.update(run, merged={"dir": merged.name, "dtype": info["dtype"], "device": device, "checks": checks,
                                 "weights_sha256": manifest.weights_sha256(merged)})
    agreed_line = (f"next-token agreement with the adapter {checks['greedy_agreement']:.0%} of "
                   f"{checks['agreement_positions']} positions, max logit difference {checks['max_logit_diff']:.2g}; "
                   if reference else "")
    print(f"merge: {merged} ({info['dtype']} on {device}; {agreed_line}checks passed: embeddings and head, "
          "end-of-turn eos, tokenizer files, chat template)")
    return merged
