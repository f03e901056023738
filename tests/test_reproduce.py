"""Determinism, for real: two CPU runs of the identity recipe with `deterministic: true` give
bit-identical adapter and merged weights, and `lab compare` passes with exact tolerances."""

import json

import pytest

from conftest import run_lab

pytestmark = pytest.mark.slow


def test_two_deterministic_runs_are_bit_identical(runs_dir, embedded_model):
    overrides = "deterministic=true train.num_train_epochs=3"
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
