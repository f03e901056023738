"""Real TRL training and real peft merging on the embedded model (slow: minutes on 2 cores)."""

import json
import os
import shutil
from pathlib import Path

import pytest
from conftest import TINY

from lab.errors import LabError
from lab.merge import check_merged, merge
from lab.recipe import load_recipe
from lab.runs import new_run
from lab.train import train

pytestmark = pytest.mark.slow
SECRETS = ("hf_labtestsecret123", "sk-labtestsecret456", "lab-key-secret789")


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, embedded_model):
    from lab import runs

    old = runs.RUNS_DIR
    runs.RUNS_DIR = tmp_path_factory.mktemp("runs")
    os.environ.update(HF_TOKEN=SECRETS[0], OPENAI_API_KEY=SECRETS[1], LAB_API_KEY=SECRETS[2])  # never in a file
    try:
        recipe = load_recipe("identity-lora", [TINY, "train.num_train_epochs=1", "train.save_strategy=steps",
                                               "train.save_steps=4"], hw="cpu")
        run = new_run(recipe.name)
        train(recipe, run)
        yield run
    finally:
        runs.RUNS_DIR = old
        for key in ("HF_TOKEN", "OPENAI_API_KEY", "LAB_API_KEY"):
            os.environ.pop(key, None)


def test_training_writes_what_merge_and_reproduce_need(trained_run):
    info = json.loads((trained_run / "train.json").read_text())
    assert info["method"] == "lora" and info["examples"] >= 100 and info["trained_tokens_per_epoch"] > 0
    assert (trained_run / "adapter" / "adapter_config.json").is_file()
    assert (trained_run / "recipe.yaml").is_file() and (trained_run / "data" / "train.jsonl").is_file()
    assert any((trained_run / "checkpoints").glob("checkpoint-*"))
    losses = [json.loads(line) for line in (trained_run / "metrics.jsonl").read_text().splitlines()]
    assert any("loss" in e for e in losses)
    parity = json.loads((trained_run / "parity.json").read_text())
    assert parity and all(len(p["prompt_ids"]) < len(p["input_ids"]) for p in parity)


def test_loss_is_on_the_reply_only(trained_run):
    """The saved ids start with the prompt; the trained part is exactly the assistant reply."""
    from transformers import AutoTokenizer

    info = json.loads((trained_run / "train.json").read_text())
    tok = AutoTokenizer.from_pretrained(info["base_model"])
    sample = json.loads((trained_run / "parity.json").read_text())[0]
    reply = tok.decode(sample["input_ids"][len(sample["prompt_ids"]):])
    assert reply.startswith(sample["completion"][0]["content"]) and "<|im_end|>" in reply
    assert "<|im_start|>user" in tok.decode(sample["prompt_ids"])


def test_merge_is_complete_checked_and_idempotent(trained_run, embedded_model, capsys):
    merged = merge(trained_run)
    record = json.loads((merged / "lab_merge.json").read_text())
    assert record["checks"]["greedy_agreement"] == 1.0 and record["checks"]["tie_word_embeddings"] is True
    for f in ("tokenizer.json", "chat_template.jinja", "generation_config.json", "config.json"):
        assert (merged / f).is_file()
    assert not (trained_run / ".merged.tmp").exists()
    # safetensors writes 0600; the lab gives its weights the umask's mode (a container user reads them)
    umask = os.umask(0o022)
    os.umask(umask)
    assert (merged / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask
    capsys.readouterr()
    merge(trained_run)
    assert "already merged" in capsys.readouterr().out


def test_merge_checks_catch_broken_checkpoints(trained_run, embedded_model, tmp_path):
    merged = merge(trained_run)
    broken = tmp_path / "broken"
    shutil.copytree(merged, broken)
    config = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": False}))
    with pytest.raises(LabError, match="no lm_head weight"):
        check_merged(broken, embedded_model, {"enable_thinking": False})

    shutil.rmtree(broken)
    shutil.copytree(merged, broken)
    gen = json.loads((broken / "generation_config.json").read_text())
    (broken / "generation_config.json").write_text(json.dumps({**gen, "eos_token_id": 0}))
    with pytest.raises(LabError, match="miss the end-of-turn token"):
        check_merged(broken, embedded_model, {"enable_thinking": False})

    shutil.rmtree(broken)
    shutil.copytree(merged, broken)
    (broken / "tokenizer.json").write_text((broken / "tokenizer.json").read_text() + "\n")  # re-saved, same JSON
    with pytest.raises(LabError, match="differs from the base model"):
        check_merged(broken, embedded_model, {"enable_thinking": False})


def test_resume_continues_from_the_checkpoint(trained_run):
    from lab.recipe import load_saved

    recipe = load_saved(trained_run)
    steps = json.loads((trained_run / "train.json").read_text())["global_steps"]
    longer = recipe.model_copy(update={"train": {**recipe.train, "num_train_epochs": 2}})
    with pytest.raises(LabError, match="RESUME=1 continues .* with the recipe it started with"):
        train(longer, trained_run, resume=True)  # another recipe: refused (tests/test_faults.py: kill -9)
    train(recipe, trained_run, resume=True)  # from its last checkpoint, the run's end: nothing left to do
    assert json.loads((trained_run / "train.json").read_text())["global_steps"] == steps


def test_manifest_records_what_a_rerun_needs_and_no_secrets(trained_run, embedded_model):
    from lab.merge import merge
    from lab.runs import sha256_file

    merge(trained_run)
    m = json.loads((trained_run / "manifest.json").read_text())
    assert m["recipe"]["name"] == "identity-lora" and len(m["recipe"]["sha256"]) == 64
    from lab.recipe import load_saved

    saved = load_saved(trained_run)  # the last training of this run (an earlier test resumed it)
    assert m["recipe"]["resolved"]["train"] == saved.train and m["recipe"]["sha256"] == saved.sha256()
    (identity, replay) = m["datasets"]
    assert identity["rows"] == 161 and len(identity["rows_sha256"]) == 64
    assert identity["file_sha256"] == sha256_file(Path(identity["path"]))
    assert m["base_model"]["weights_sha256"]["model.safetensors"] == sha256_file(embedded_model / "model.safetensors")
    assert m["output"]["weights_sha256"]["adapter_model.safetensors"]
    assert m["merged"]["weights_sha256"]["model.safetensors"] and m["merged"]["checks"]["greedy_agreement"] == 1.0
    assert m["seeds"]["seed"] == 42
    assert m["environment"]["packages"]["torch"].startswith("2.13.0") and m["environment"]["packages"]["trl"]
    assert m["hardware"]["backend"] == "cpu" and m["hardware"]["cpu_count"] >= 1
    assert m["loss_curve"] and all(len(p) == 2 for p in m["loss_curve"])
    for f in trained_run.rglob("*"):
        if f.is_file() and f.suffix in (".json", ".jsonl", ".yaml", ".log", ".md", ".txt"):
            text = f.read_text(errors="replace")
            assert not any(s in text for s in SECRETS), f
