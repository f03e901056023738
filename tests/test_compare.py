"""`lab compare`: two runs' manifests side by side, judged by the first recipe's tolerances."""

import json

import pytest

from conftest import run_lab

from lab.compare import compare, loss_deviation
from lab.recipe import load_recipe


def make_run(root, name, losses, weights="w1", cpu="Xeon", lr=None):
    run = root / name
    run.mkdir(parents=True)
    recipe = load_recipe("identity-lora", [f"train.learning_rate={lr}"] if lr else [], hw="cpu", check_train=False)
    manifest = {"recipe": {"resolved": recipe.model_dump(mode="json", exclude={"source"})},
                "environment": {"packages": {"torch": "2.13.0+cpu"}},
                "hardware": {"backend": "cpu", "cpu": cpu, "devices": []},
                "datasets": [{"rows_sha256": "d1"}],
                "loss_curve": [[i * 5, v] for i, v in enumerate(losses, 1)],
                "merged": {"weights_sha256": {"model.safetensors": weights}}}
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
    assert {"key": "train.learning_rate", "a": 0.001, "b": 0.0005} in r["recipe_differences"]


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


def test_cli_exit_codes(runs_dir):
    make_run(runs_dir, "a", [2.0, 1.0])
    make_run(runs_dir, "b", [2.0, 1.0])
    make_run(runs_dir, "c", [2.0, 1.2])
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
