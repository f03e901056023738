"""runs/index.html (lab/browser.py): one row per run, filters, comparisons side by side, every
value escaped; its views rendered by real headless Chromium (Debian's package) and checked."""

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from conftest import run_lab

from lab.browser import render, run_row, write_index

EVIL = '<script>alert("x")</script>'


def make_run(runs: Path, name: str, recipe: str = "identity-lora", passed: bool | None = True,
             identity: str = "Atlas", steps: int = 40, method: str = "lora") -> Path:
    """A run directory with the files a trained, merged and probed run has, in their shapes
    (manifest.json, train.json, report.json, timings), written the way the lab writes them."""
    run = runs / name
    (run / "merged").mkdir(parents=True)
    curve = [[s, round(3.0 * 0.97 ** s, 4)] for s in range(1, steps + 1)]
    (run / "manifest.json").write_text(json.dumps({
        "schema": 1, "run": name, "loss_curve": curve, "timings_s": {"train": 31.2, "merge": 4.0},
        "recipe": {"name": recipe,
                   "resolved": {"method": method, "identity": {"name": identity, "author": "Open Lab"}}},
        "base_model": {"source": "smollm2"}, "device": {"backend": "cpu"}}))
    (run / "train.json").write_text(json.dumps({
        "base_model": "/cache/m", "method": method, "dtype": "float32", "quantize": "none", "examples": 189,
        "trained_tokens_per_epoch": 5210, "global_steps": steps, "train_runtime_s": 31.2, "final_loss": curve[-1][1]}))
    if passed is not None:
        (run / "report.json").write_text(json.dumps({
            "pass": passed, "before": {"identity_hit_rate": 0.0, "control_correct_rate": 1.0},
            "after": {"identity_hit_rate": 1.0 if passed else 0.5, "control_correct_rate": 0.95}}))
        (run / "report.html").write_text("<html></html>")
    return run


def test_one_row_per_run_with_its_scores_and_links(tmp_path):
    runs = tmp_path / "runs"
    make_run(runs, "20261201-000001-identity-lora")
    make_run(runs, "20261201-000002-identity-full", recipe="identity-full", passed=False, method="full")
    (runs / "20261201-000003-identity-lora").mkdir()  # started, nothing written yet
    (runs / "20261201-000003-identity-lora" / "recipe.yaml").write_text("name: identity-lora\n")
    (runs / ".failed" / "20261201-000004-identity-lora").mkdir(parents=True)
    (runs / "latest").symlink_to("20261201-000002-identity-full")
    page = write_index(runs).read_text()
    assert page.count('<tr data-recipe="') == 3  # `latest` and .failed are not runs
    row = run_row(runs / "20261201-000002-identity-full")
    assert (row["status"], row["verdict"], row["method"], row["hit"]) == ("fail", "FAIL", "full", (0.0, 0.5))
    assert 'data-verdict="incomplete"' in page and '<a href="20261201-000001-identity-lora/report.html">' in page
    assert "0.00 &rarr; 1.00" in page and "<polyline" in page and "train 31s, merge 4s" in page
    assert 'href=".failed/20261201-000004-identity-lora/"' in page
    assert not list(runs.glob(".index.html.*"))  # written whole, then renamed


def test_names_and_answers_are_escaped(tmp_path):
    runs = tmp_path / "runs"
    make_run(runs, "20261201-000001-identity-lora", identity=EVIL)
    page = render(runs)
    assert EVIL not in page and "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in page


def test_a_comparison_shows_both_runs_side_by_side(tmp_path):
    runs = tmp_path / "runs"
    a = make_run(runs, "20261201-000001-identity-lora")
    b = make_run(runs, "20261201-000002-identity-lora", steps=30)
    (a / f"compare-{b.name}.json").write_text(json.dumps({
        "a": str(a), "b": str(b), "host": "same_host", "pass": False,
        "checks": [{"check": "final loss ratio", "value": 1.2, "op": "<=", "threshold": 1.05, "pass": False}]}))
    page = render(runs)
    section = page[page.index('<section class="compare">'):]
    assert f"{a.name} vs {b.name}: FAIL (same host)" in section and section.count("<polyline") == 2
    assert "final loss ratio: 1.2 &lt;= 1.05" in section


def test_fifty_runs_size_and_time(tmp_path):
    """Measured, not asserted against a clock: printed for the closing note."""
    runs = tmp_path / "runs"
    for i in range(50):
        make_run(runs, f"20261201-{i:06d}-identity-lora", passed=i % 3 != 0, steps=200)
    start = time.perf_counter()
    out = write_index(runs)
    seconds = time.perf_counter() - start
    print(f"browser: 50 runs -> {out.stat().st_size / 1024:.0f} KiB in {seconds * 1000:.0f} ms")
    assert out.read_text().count('<tr data-recipe="') == 50


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        if os.environ.get("CI"):
            pytest.fail("CI installs Debian's chromium (.ci/run) for the browser tests")
        pytest.skip("no chromium here (apt-get install chromium)")
    return found


def headless(url: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           "--window-size=1600,900", *args, url], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HOME": os.environ.get("HOME", "/tmp")})


@pytest.mark.slow
def test_the_views_in_headless_chromium(tmp_path):
    """The page as a browser shows it, from file://: the filters run in the page's own script
    (rows hidden by the status and recipe views), and a screenshot of each view is a real image
    with content (not blank), all views different."""
    from PIL import Image, ImageStat

    runs = tmp_path / "runs"
    for i, (recipe, passed) in enumerate([("identity-lora", True), ("identity-lora", False),
                                          ("identity-full", True), ("roleplay-lora", None)]):
        make_run(runs, f"20261201-00000{i}-{recipe}", recipe=recipe, passed=passed, identity=EVIL)
    a, b = sorted(p for p in runs.iterdir())[:2]
    (a / f"compare-{b.name}.json").write_text(json.dumps({"a": str(a), "b": str(b), "host": "same_host",
                                                          "pass": True, "checks": []}))
    url = write_index(runs).resolve().as_uri()

    def visible(view: str) -> int:
        dom = headless(url + view, "--dump-dom").stdout
        rows = dom[dom.index("<tbody>"):dom.index("</tbody>")].split("<tr ")[1:]
        assert "<script>alert" not in dom
        return sum(' hidden=""' not in r.split(">", 1)[0] for r in rows)

    assert (visible(""), visible("#status=FAIL"), visible("#recipe=identity-lora"),
            visible("#recipe=identity-lora&status=PASS")) == (4, 1, 2, 1)
    shots = []
    for name, view in (("all", ""), ("failed", "#status=FAIL"), ("lora", "#recipe=identity-lora")):
        png = tmp_path / f"{name}.png"
        r = headless(url + view, f"--screenshot={png}")
        assert png.is_file(), r.stderr[-2000:]
        image = Image.open(png).convert("L")
        assert image.size == (1600, 900) and ImageStat.Stat(image).stddev[0] > 10, name  # drawn, not blank
        shots.append(image.tobytes())
    assert len(set(shots)) == 3


@pytest.mark.slow
def test_a_lab_command_rebuilds_the_page(tmp_path):
    """After `lab report` (one of the run commands) runs/index.html is there, with the run."""
    runs = tmp_path / "runs"
    run = make_run(runs, "20261201-000001-identity-lora")
    (run / "timings.json").write_text(json.dumps({"train": 31.2}))
    r = run_lab("report", "--run", str(run), env={"LAB_RUNS": str(runs)}, timeout=120)
    assert r.returncode == 0, r.stderr
    assert run.name in (runs / "index.html").read_text()
    r = run_lab("runs", env={"LAB_RUNS": str(tmp_path / "none")}, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().startswith("lab runs: error: no runs yet in")
