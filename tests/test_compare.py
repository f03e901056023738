"""`lab compare`: two runs' manifests side by side, judged by the first recipe's tolerances."""

import json

import pytest
from conftest import run_lab

from lab.compare import compare, loss_deviation, straddling
from lab.recipe import load_recipe


def make_run(root, name, losses, weights="w1", cpu="Xeon", lr=None, every=5, resumes=(), data="d1"):
    run = root / name
    run.mkdir(parents=True)
    recipe = load_recipe("identity-lora", [f"train.learning_rate={lr}"] if lr else [], hw="cpu", check_train=False)
    manifest = {"recipe": {"resolved": recipe.model_dump(mode="json", exclude={"source"})},
                "environment": {"packages": {"torch": "2.13.0+cpu"}},
                "hardware": {"backend": "cpu", "cpu": cpu, "devices": []},
                "datasets": [{"rows_sha256": data}],
                "loss_curve": [[i * every, v] for i, v in enumerate(losses, 1)],
                "merged": {"weights_sha256": {"model.safetensors": weights}}}
    if resumes:  # as Local.train records a RESUME=1
        manifest["resumes"] = [{"checkpoint": f"checkpoint-{s}", "step": s} for s in resumes]
    (run / "manifest.json").write_text(json.dumps(manifest))
    return run


def test_identical_runs_on_one_host_pass_exactly(runs_dir):
    a = make_run(runs_dir, "a", [2.0, 1.5, 1.0])
    b = make_run(runs_dir, "b", [2.0, 1.5, 1.0])
    r = compare(str(a), str(b))
    assert r["host"] == "same_host" and r["pass"] and r["weights_identical"] is True and r["data_identical"]
    assert (a / "compare-b.png").stat().st_size > 0 and json.loads((a / "compare-b.json").read_text())["pass"]


def test_any_drift_on_one_host_fails(runs_dir):
    a = make_run(runs_dir, "a", [2.0, 1.5, 1.0])
    b = make_run(runs_dir, "b", [2.0, 1.5, 1.001], weights="w2", lr=0.0005)
    r = compare(str(a), str(b))
    failed = {c["check"] for c in r["checks"] if not c["pass"]}
    assert not r["pass"] and failed == {"loss max abs deviation", "loss max rel deviation", "final loss ratio",
                                        "weights identical"}
    assert {"key": "train.learning_rate", "a": 0.002, "b": 0.0005} in r["recipe_differences"]  # identity-lora: 2e-3


def test_another_host_gets_the_looser_tolerances(runs_dir):
    a = make_run(runs_dir, "a", [2.0, 1.5, 1.0])
    b = make_run(runs_dir, "b", [2.02, 1.52, 1.03], weights="w2", cpu="EPYC")
    r = compare(str(a), str(b))
    assert r["host"] == "cross_host" and r["pass"], r["checks"]
    assert {"key": "hardware.cpu", "a": "Xeon", "b": "EPYC"} in r["environment_differences"]
    assert r["loss"]["max_abs"] == pytest.approx(0.03) and r["loss"]["final_ratio"] == pytest.approx(1.03)


def test_loss_deviation_compares_shared_steps_only():
    d = loss_deviation([[5, 2.0], [10, 1.0]], [[10, 1.5], [15, 1.2]])
    assert d["steps_compared"] == 1 and d["max_abs"] == 0.5 and d["max_rel"] == 0.5


def test_only_the_logging_window_that_spans_a_resume_is_left_out():
    logged = [[4, 2.0], [8, 1.5], [12, 1.2], [16, 1.0]]
    # 5 and 6 fall inside (4, 8]; 12 was logged before its checkpoint; nothing is logged after 17
    assert straddling(logged, [5, 6, 12, 17]) == {8}
    assert straddling(logged, []) == set() and straddling([], [5]) == set()


def test_a_resumed_run_is_compared_outside_the_window_around_its_resume(runs_dir):
    # Logged every 4 steps; b was killed after checkpoint-5 and resumed there, so its step-8 log
    # averages steps 6-8 only (the deviation `make compare` used to fail on). Its weights differ
    # (as on a GPU, where runs are not bit-exact): the loss alone must judge it.
    a = make_run(runs_dir, "a", [2.0, 1.5, 1.2, 1.0], every=4)
    b = make_run(runs_dir, "b", [2.0, 1.225, 1.2, 1.0], every=4, weights="w2", resumes=[5])
    r = compare(str(a), str(b))
    assert r["resumed_at"] == {"a": [], "b": [5]}
    assert r["loss"]["steps_skipped"] == [8] and r["loss"]["steps_compared"] == 3 and r["loss"]["max_abs"] == 0
    assert [c["check"] for c in r["checks"] if not c["pass"]] == ["weights identical"]
    # The same curves without the record: the step-8 window is compared, and fails.
    c = make_run(runs_dir, "c", [2.0, 1.225, 1.2, 1.0], every=4, weights="w2")
    r = compare(str(a), str(c))
    assert r["loss"]["steps_skipped"] == [] and r["loss"]["max_abs"] == pytest.approx(0.275)
    assert {"loss max abs deviation", "loss max rel deviation"} <= {x["check"] for x in r["checks"] if not x["pass"]}
    # A deviation outside that window still fails; and a resume after the last full window moves
    # the final-loss comparison to the last window both logged whole.
    d = make_run(runs_dir, "d", [2.0, 1.225, 1.3, 1.0], every=4, weights="w2", resumes=[5])
    assert not compare(str(a), str(d))["pass"]
    e = make_run(runs_dir, "e", [2.0, 1.5, 1.2, 0.7], every=4, weights="w2", resumes=[14])
    loss = compare(str(a), str(e))["loss"]
    assert loss["steps_skipped"] == [16] and loss["final_a"] == loss["final_b"] == 1.2


def test_identical_weights_from_the_same_data_pass_a_logged_loss_difference(runs_dir):
    # A run resumed before the lab recorded resumes: the weights show it trained the same.
    a = make_run(runs_dir, "a", [2.0, 1.5, 1.2, 1.0], every=4)
    b = make_run(runs_dir, "b", [2.0, 1.225, 1.2, 1.0], every=4)
    r = compare(str(a), str(b))
    assert r["pass"] and r["weights_identical"] is True
    judged = [c for c in r["checks"] if c.get("judged_by")]
    assert {c["check"] for c in judged} == {"loss max abs deviation (judged by the identical weights)",
                                            "loss max rel deviation (judged by the identical weights)"}
    assert judged[0]["value"] == pytest.approx(0.275)  # the deviation is still reported
    # identical weights from other data (a learning rate of 0 leaves every run at its base) do not
    c = make_run(runs_dir, "c", [2.0, 1.225, 1.2, 1.0], every=4, data="d2")
    assert not compare(str(a), str(c))["pass"]


def test_cli_exit_codes(runs_dir):
    make_run(runs_dir, "a", [2.0, 1.0])
    make_run(runs_dir, "b", [2.0, 1.0])
    make_run(runs_dir, "c", [2.0, 1.2], weights="w2")
    assert run_lab("compare", "a", "b").returncode == 0
    r = run_lab("compare", "a", "c")
    assert r.returncode == 1 and "FAIL  loss max abs deviation" in r.stdout
    (runs_dir / "empty").mkdir()
    r = run_lab("compare", "a", "empty")
    assert r.returncode == 2 and "manifest.json is missing" in r.stderr and "Traceback" not in r.stderr


def test_report_page_shows_plots_and_links_manifest_and_comparisons(runs_dir):
    from lab.report import write_report

    a = make_run(runs_dir, "a", [2.0, 1.5, 1.0])
    make_run(runs_dir, "b", [2.0, 1.5, 1.0])
    (a / "metrics.jsonl").write_text('{"step": 5, "loss": 2.0}\n{"step": 10, "loss": 1.5}\n')
    (a / "probe-after.json").write_text(json.dumps({"summary": {"identity_hit_rate": 1.0}, "controls": [],
                                                    "identity": [{"q": "Who?", "answer": "<think>x</think> I am A|B",
                                                                  "hit": True, "finish_reason": "stop"}]}))
    write_report(a, [{"check": "c", "value": 1, "op": ">=", "threshold": 1, "pass": True}], {"runtime": "local"})
    compare(str(a), str(runs_dir / "b"))  # rewrites the report with a link to the comparison
    page = (a / "report.html").read_text()
    assert '<img alt="loss curve" src="loss.png"' in page and 'src="compare-b.png"' in page
    assert 'href="manifest.json"' in page and 'href="compare-b.json"' in page and "<table>" in page
    assert "&lt;think&gt;" in page and "<think>" not in page  # model output is text, not markup
    assert json.loads((a / "report.json").read_text())["runtime"] == "local"  # kept across the rewrite
