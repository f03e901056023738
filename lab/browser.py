"""runs/index.html: every run on one static page, rebuilt from the run directories after each lab command.

One row per run (recipe, base model, identity, backend, method, status, probe verdict and scores
before -> after, final loss with an inline SVG curve, stage times, links to its report, loss plot
and files), filters by recipe and verdict, and each `make compare` result as the two runs side by
side with both loss curves on one plot. Static HTML with inline SVG and a few lines of script for
the filters: it opens from file:// and from an archive, needs no server, and nothing in it can
hold up training (the peers' web UIs stall runs when their page closes). Everything read from a
run is escaped: model output and user-chosen names are data, never markup.
"""

from __future__ import annotations

import html
import json
import os
import time
from pathlib import Path

INDEX = "index.html"


def _load(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # absent, being written, or damaged: the row shows what is there
        return None


def _e(value) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def run_row(run: Path) -> dict:
    """What the page shows of one run directory, from its manifest, report and training record."""
    m = _load(run / "manifest.json") or {}
    report = _load(run / "report.json") or {}
    train = _load(run / "train.json") or {}
    resolved = (m.get("recipe") or {}).get("resolved") or {}
    identity = resolved.get("identity") or {}
    curve = m.get("loss_curve") or report.get("loss_curve") or []
    before, after = report.get("before") or {}, report.get("after") or {}
    method = train.get("method") or resolved.get("method")
    if train.get("quantize") not in (None, "none"):
        method = f"q{method} ({train['quantize']})"
    if report.get("pass") is not None:
        status = "pass" if report["pass"] else "fail"
    elif (run / "merged").is_dir():
        status = "merged"
    elif train:
        status = "trained"
    elif run.name.endswith("-probe") or m.get("probes"):
        status = "probed"
    else:
        status = "incomplete"
    return {
        "run": run.name, "recipe": (m.get("recipe") or {}).get("name") or run.name.split("-", 2)[-1],
        "base": (m.get("base_model") or {}).get("source") or train.get("base_model"),
        "identity": f"{identity.get('name', '')} / {identity.get('author', '')}" if identity else "",
        "backend": (m.get("device") or {}).get("backend") or resolved.get("backend"),
        "method": method, "status": status, "verdict": {True: "PASS", False: "FAIL"}.get(report.get("pass"), ""),
        "hit": (before.get("identity_hit_rate"), after.get("identity_hit_rate")),
        "controls": (before.get("control_correct_rate"), after.get("control_correct_rate")),
        "final_loss": curve[-1][1] if curve else train.get("final_loss"), "curve": curve,
        "timings": m.get("timings_s") or report.get("timings_s") or {},
        "files": [f for f in ("report.html", "loss.png", "manifest.json", "report.json") if (run / f).is_file()],
    }


def sparkline(curves: list[list], width: int = 160, height: int = 36, colors=("#1f77b4", "#d62728")) -> str:
    """Loss curves as one inline SVG polyline each, on shared axes (steps across, loss down)."""
    points = [p for c in curves for p in c]
    if not points:
        return ""
    x0, x1 = min(p[0] for p in points), max(p[0] for p in points)
    y0, y1 = min(p[1] for p in points), max(p[1] for p in points)
    sx, sy = (width - 4) / ((x1 - x0) or 1), (height - 4) / ((y1 - y0) or 1)
    lines = "".join(
        f'<polyline fill="none" stroke="{colors[i % len(colors)]}" stroke-width="1.5" points="'
        + " ".join(f"{2 + (x - x0) * sx:.1f},{2 + (y1 - y) * sy:.1f}" for x, y in c) + '"/>'
        for i, c in enumerate(curves) if c)
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
            f'aria-label="loss from {y0:.3g} to {y1:.3g}">{lines}</svg>')


def _rate(pair: tuple) -> str:
    fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    return "" if pair == (None, None) else f"{fmt(pair[0])} &rarr; {fmt(pair[1])}"


def _row_html(r: dict) -> str:
    links = " ".join(f'<a href="{_e(r["run"])}/{f}">{f.split(".")[0] if f != "report.json" else "json"}</a>'
                     for f in r["files"])
    times = ", ".join(f"{_e(k)} {v:.0f}s" for k, v in r["timings"].items() if isinstance(v, (int, float)))
    loss = "" if r["final_loss"] is None else f"{r['final_loss']:.4g}"
    return (f'<tr data-recipe="{_e(r["recipe"])}" data-verdict="{_e(r["verdict"] or r["status"])}">'
            f'<td><a href="{_e(r["run"])}/">{_e(r["run"])}</a></td><td>{_e(r["recipe"])}</td><td>{_e(r["base"])}</td>'
            f'<td>{_e(r["identity"])}</td><td>{_e(r["backend"])}</td><td>{_e(r["method"])}</td>'
            f'<td class="{_e(r["status"])}">{_e(r["verdict"] or r["status"])}</td><td>{_rate(r["hit"])}</td>'
            f'<td>{_rate(r["controls"])}</td><td>{loss} {sparkline([r["curve"]])}</td><td>{times}</td>'
            f'<td>{links}</td></tr>')


def _comparison_html(c: dict, rows: dict[str, dict]) -> str:
    """A `make compare` result: the two runs side by side, both loss curves on one plot."""
    a, b = (rows.get(Path(c.get(k, "")).name, {"run": Path(c.get(k, "")).name}) for k in ("a", "b"))
    fields = (("recipe", "recipe"), ("method", "method"), ("status", "status"), ("identity hit", "hit"),
              ("controls", "controls"), ("final loss", "final_loss"))
    cell = lambda r, k: _rate(r.get(k, (None, None))) if k in ("hit", "controls") else _e(r.get(k))  # noqa: E731
    body = "".join(f"<tr><th>{label}</th><td>{cell(a, key)}</td><td>{cell(b, key)}</td></tr>" for label, key in fields)
    checks = "".join(f'<li class="{"pass" if k.get("pass") else "fail"}">{_e(k.get("check"))}: {_e(k.get("value"))} '
                     f'{_e(k.get("op"))} {_e(k.get("threshold"))}</li>' for k in c.get("checks") or ())
    return (f'<section class="compare"><h3>{_e(a["run"])} vs {_e(b["run"])}: '
            f'{"PASS" if c.get("pass") else "FAIL"} ({_e(str(c.get("host", "")).replace("_", " "))})</h3>'
            f'{sparkline([a.get("curve") or [], b.get("curve") or []], 320, 80)}'
            f'<table><tr><th></th><th style="color:#1f77b4">A</th><th style="color:#d62728">B</th></tr>{body}</table>'
            f'<ul>{checks}</ul></section>')


# The filters; #recipe=NAME&status=PASS in the address applies them on load (a link to a view).
SCRIPT = """
function filterRuns(){var r=document.getElementById('recipe').value,v=document.getElementById('verdict').value;
document.querySelectorAll('#runs tbody tr').forEach(function(t){t.hidden=(r&&t.dataset.recipe!==r)||
(v&&t.dataset.verdict!==v);});}
document.addEventListener('DOMContentLoaded',function(){var q=new URLSearchParams(location.hash.slice(1));
if(q.get('recipe'))document.getElementById('recipe').value=q.get('recipe');
if(q.get('status'))document.getElementById('verdict').value=q.get('status');filterRuns();});
"""
STYLE = ("body{font-family:sans-serif;margin:1.5em}table{border-collapse:collapse;font-size:90%}"
         "td,th{border:1px solid #ccc;padding:.2em .4em;vertical-align:middle}.PASS,.pass{color:#080;font-weight:bold}"
         ".FAIL,.fail{color:#b00;font-weight:bold}section.compare{display:inline-block;margin:0 1em 1em 0}")


def render(runs_dir: Path) -> str:
    runs = sorted((d for d in runs_dir.iterdir() if d.is_dir() and not d.is_symlink() and not d.name.startswith(".")
                   and ((d / "manifest.json").is_file() or (d / "recipe.yaml").is_file())), key=lambda d: d.name,
                  reverse=True)
    rows = [run_row(d) for d in runs]
    failed_dir = runs_dir / ".failed"
    failed = sorted((d for d in failed_dir.iterdir() if d.is_dir()), reverse=True) if failed_dir.is_dir() else []
    comparisons = [c for d in runs for c in (_load(p) for p in sorted(d.glob("compare-*.json"))) if c]
    options = lambda values: "".join(f'<option value="{_e(v)}">{_e(v)}</option>' for v in sorted(set(values)))  # noqa: E731
    head = ("<tr><th>run</th><th>recipe</th><th>base model</th><th>identity</th><th>backend</th><th>method</th>"
            "<th>status</th><th>identity hit before &rarr; after</th><th>controls before &rarr; after</th>"
            "<th>final loss</th><th>stage times</th><th>files</th></tr>")
    parts = [f"<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>Runs</title><style>{STYLE}</style>"
             f"<script>{SCRIPT}</script></head><body>",
             f"<h1>Runs ({len(rows)})</h1><p>Rebuilt after every lab command from each run's manifest.json and "
             f"report.json; {_e(time.strftime('%Y-%m-%d %H:%M:%S'))}.</p>",
             f'<p>recipe <select id="recipe" onchange="filterRuns()"><option value="">all</option>'
             f'{options(r["recipe"] for r in rows)}</select> status <select id="verdict" onchange="filterRuns()">'
             f'<option value="">all</option>{options(r["verdict"] or r["status"] for r in rows)}</select></p>',
             f'<table id="runs"><thead>{head}</thead><tbody>{"".join(_row_html(r) for r in rows)}</tbody></table>']
    if comparisons:
        by_name = {r["run"]: r for r in rows}
        parts += ["<h2>Comparisons (make compare)</h2>"] + [_comparison_html(c, by_name) for c in comparisons]
    if failed:
        parts += ["<h2>Failed before their first checkpoint</h2><ul>"] + [
            f'<li><a href=".failed/{_e(d.name)}/">{_e(d.name)}</a></li>' for d in failed] + ["</ul>"]
    return "\n".join(parts + ["</body></html>\n"])


def write_index(runs_dir: Path) -> Path | None:
    """runs/index.html, replaced atomically (a reader never sees half a page); None without runs."""
    if not runs_dir.is_dir():
        return None
    out = runs_dir / INDEX
    tmp = runs_dir / f".{INDEX}.{os.getpid()}.tmp"
    tmp.write_text(render(runs_dir), encoding="utf-8")
    os.replace(tmp, out)
    return out
