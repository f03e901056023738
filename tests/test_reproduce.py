"""Determinism, for real: two CPU runs of the identity recipe with `deterministic: true` give
bit-identical adapter and merged weights, and `lab compare` passes with exact tolerances."""

import json

import pytest
from conftest import TINY, run_lab

pytestmark = pytest.mark.slow


def test_two_deterministic_runs_are_bit_identical(runs_dir, embedded_model):
    overrides = f"{TINY} deterministic=true train.num_train_epochs=3"
    for name in ("first", "second"):
        r = run_lab("train", "--hw", "cpu", "--set", overrides, "--run", name, timeout=900)
        assert r.returncode == 0, r.stderr[-2000:]
        r = run_lab("merge", "--run", name, timeout=600)
        assert r.returncode == 0, r.stderr[-2000:]
    a, b = (json.loads((runs_dir / n / "manifest.json").read_text()) for n in ("first", "second"))
    assert a["seeds"]["deterministic"] is True and a["seeds"]["full_determinism"] is True
    assert a["output"]["weights_sha256"] == b["output"]["weights_sha256"]
    assert a["merged"]["weights_sha256"] == b["merged"]["weights_sha256"]
    assert a["loss_curve"] == b["loss_curve"]
    r = run_lab("compare", "first", "second")
    assert r.returncode == 0 and "same host" in r.stdout, r.stdout

    # make reproduce: from the manifest alone, into a third run, compared with the first
    r = run_lab("reproduce", "first", timeout=900)
    assert r.returncode == 0 and "inputs match" in r.stdout and "compare: PASS" in r.stdout, r.stdout[-3000:]
    third = json.loads((runs_dir / "latest" / "manifest.json").read_text())
    assert third["reproduces"] == "first" and third["merged"]["weights_sha256"] == a["merged"]["weights_sha256"]


def test_reproduce_refuses_changed_inputs(runs_dir, tmp_path):
    """A manifest whose data no longer match stops before training, naming the dataset."""
    from lab.recipe import load_recipe

    recipe = load_recipe("identity-lora", hw="cpu", check_train=False)
    run = runs_dir / "old"
    run.mkdir(parents=True)
    resolved = recipe.model_dump(mode="json", exclude={"source"})
    (run / "manifest.json").write_text(json.dumps({
        "recipe": {"name": recipe.name, "sha256": recipe.sha256(), "source": "recipes/identity-lora.yaml",
                   "resolved": resolved},
        "datasets": [{"rows": 161, "rows_sha256": "0" * 64}, {"rows": 28, "rows_sha256": "0" * 64}]}))
    r = run_lab("reproduce", "old", timeout=300)
    assert r.returncode == 2 and "identity.json differs from the run's" in r.stderr and "Traceback" not in r.stderr
    assert sorted(p.name for p in runs_dir.iterdir()) == ["index.html", "old"]  # nothing half-made
