"""`lab bench` for real on CPU: TRL's defaults, hand-tuned TRL and the lab's speed plan on the
embedded shape, same data. Figures are printed and written, never asserted as speeds; the maths
must agree."""

import json
from pathlib import Path

import pytest
from conftest import run_lab


@pytest.mark.slow
def test_bench_writes_three_arms_and_the_lab_keeps_the_maths(runs_dir, embedded_model):
    r = run_lab("bench", "--hw", "cpu", "--steps", "8", "--method", "lora", "--profile", timeout=1200)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    report = json.loads(Path(r.stdout.strip().splitlines()[-1].split("bench: ", 1)[1]).read_text())
    assert report["backend"] == "cpu" and report["matmul_peak_tflops"] > 0 and report["environment"]["packages"]
    arms = {x["arm"]: x for x in report["results"]}
    assert set(arms) == {"trl_defaults", "trl_tuned", "lab"}
    assert arms["trl_tuned"]["settings"]["packing"] is True
    lab = arms["lab"]
    assert lab["settings"]["gradient_checkpointing"] is False and lab["settings"]["packing"] is False
    assert {d["setting"] for d in lab["plan"]["decisions"]} >= {"attn_implementation", "packing",
                                                                "gradient_checkpointing"}
    for x in arms.values():
        assert x["steady_tokens_per_s"] > 0 and 0 < x["mfu"] < 1 and x["peak_memory_gib"] > 0, x
        assert len(x["loss_curve"]) >= 2
    # same init, same data, same batches: dropping checkpointing must not change the loss
    assert lab["loss_gap_vs_trl_defaults"] is not None and lab["loss_gap_vs_trl_defaults"] <= 1e-3
    assert lab["loss_gap_vs_trl_tuned"] is None  # packed rows are other batches: not comparable step by step
    assert lab["x_trl_defaults"] > 0 and lab["x_trl_tuned"] > 0
    # --profile: where a steady step's time goes, by operator
    for x in arms.values():
        p = x["profile"]
        assert p["ms_per_step"] > 0 and p["steps"] == [2, 4] and len(p["top"]) >= 5
        shares = [t["share"] for t in p["top"]]
        assert shares == sorted(shares, reverse=True) and sum(shares) <= 1.001
    assert "profile lora lab:" in r.stdout


def test_bench_refuses_too_few_steps_in_one_line(runs_dir):
    r = run_lab("bench", "--hw", "cpu", "--steps", "3", timeout=120)
    assert r.returncode == 2 and "STEPS=3" in r.stderr and "Traceback" not in r.stderr
    r = run_lab("bench", "--hw", "cpu", "--shape", "llama-9000", timeout=300)
    assert r.returncode == 2 and "SHAPE='llama-9000'" in r.stderr and "Traceback" not in r.stderr
