"""Report: one function from a run directory's artifacts to report.md, report.json and loss.png."""

from __future__ import annotations

import json
import re
from pathlib import Path

from lab.runs import write_json


def _load(path: Path):
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def loss_curve(run: Path) -> list[tuple[int, float]]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r and "step" in r]


def plot_loss(series: dict[str, list], out: Path, title: str) -> None:
    """One or more loss curves ({label: [(step, loss), ...]}) in one PNG."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on servers
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    for label, points in series.items():
        ax.plot([p[0] for p in points], [p[1] for p in points], marker=".", linewidth=1, label=label)
    if len(series) > 1:
        ax.legend(fontsize=7)
    ax.set(xlabel="step", ylabel="training loss", title=title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


_MARKDOWN = re.compile(r"([\\`*_\[\]()!#])")


def _cell(text: str) -> str:
    """Model output inside a table cell: no pipes, no newlines, no raw HTML (e.g. <think>), and no
    Markdown of its own: a `[x](javascript:...)` or `![](http://...)` in an answer stays text."""
    text = str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("\n", " ")
    return _MARKDOWN.sub(r"\\\1", text).replace("|", "\\|")


def write_report(run: Path, verdict: list[dict] | None = None, extra: dict | None = None) -> dict:
    before, after = _load(run / "probe-before.json"), _load(run / "probe-after.json")
    train, timings = _load(run / "train.json"), _load(run / "timings.json") or {}
    points = loss_curve(run)
    if points:
        plot_loss({run.name: points}, run / "loss.png", f"{run.name}")
    passed = all(c["pass"] for c in verdict) if verdict else None
    previous = _load(run / "report.json") or {}  # a rewrite keeps what the first writer added
    report = {**previous, "run": run.name, "pass": passed, "verdict": verdict, "timings_s": timings, "train": train,
              "before": before and before["summary"], "after": after and after["summary"],
              "loss_curve": points, **(extra or {})}
    md = [f"# Run {run.name}", ""]
    if verdict:
        md += [f"**Result: {'PASS' if passed else 'FAIL'}**", "",
               "| check | value | threshold | pass |", "|---|---|---|---|"]
        md += [f"| {c['check']} | {c['value']} | {c['op']} {c['threshold']} | {'yes' if c['pass'] else '**no**'} |"
               for c in verdict]
        md.append("")
    if timings:
        md += ["## Time per stage", "", "| stage | seconds |", "|---|---|"]
        md += [f"| {k} | {v} |" for k, v in timings.items()] + [f"| total | {round(sum(timings.values()), 1)} |", ""]
    if train:
        md += ["## Training", "", f"- base model: `{train['base_model']}` ({train['method']}, {train['dtype']})",
               f"- {train['examples']} examples, {train['trained_tokens_per_epoch']} trained tokens per epoch, "
               f"{train['global_steps']} steps in {train['train_runtime_s']} s, final loss {train['final_loss']}", ""]
    if points:
        md += ["![loss curve](loss.png)", ""]
    dpo = _load(run / "dpo.json")
    if dpo:
        report["dpo"] = {k: v for k, v in dpo.items() if k != "answers"}
        margins = [m for _, m in dpo["margins"]]
        claims = dpo["old_identity_claims"]
        md += ["## What DPO changed", "",
               f"- {dpo['pairs']} preference pairs from {dpo['prompts']} identity prompts ({dpo['rejected_from_sft']} "
               f"rejected answers from SFT), {dpo['steps']} steps, beta {dpo['settings']['beta']}, reference: "
               f"{dpo['reference']}",
               f"- reward margin (chosen - rejected) {margins[0] if margins else 'n/a'} at the first step -> "
               f"{margins[-1] if margins else 'n/a'} at the last",
               f"- answers naming an old identity ({', '.join(dpo['old_identity'][:6])}): base {claims['base']}, "
               f"after SFT {claims['sft']}, after DPO {claims['dpo']} of {dpo['prompts']} (greedy, before serving)",
               "", "| question | base | after SFT | after DPO |", "|---|---|---|---|"]
        md += [f"| {_cell(a['q'])} | {_cell(a['base'])} | {_cell(a['sft'])} | {_cell(a['dpo'])} |"
               for a in dpo["answers"] if a["sft"] != a["dpo"]][:12]
        md.append("")
    sections = (("Persona questions", "persona"), ("Identity questions", "identity"), ("Control questions", "controls"))
    for name, key in sections:
        rows = (after or before or {}).get(key) or []
        if not rows:
            continue
        md += [f"## {name}", "", "| question | before | after | after ok | why not |", "|---|---|---|---|---|"]
        before_rows = {r["q"]: r for r in (before or {}).get(key, [])}
        for r in rows:
            b = before_rows.get(r["q"], {}).get("answer", "") if after else ""
            a = r["answer"] if after else ""
            ok = r.get("hit", r.get("correct"))
            reasons = list(r.get("reasons") or [])
            if r["finish_reason"] != "stop" and not any("finish_reason" in x for x in reasons):
                reasons.append(f"finish_reason {r['finish_reason']}")
            if not ok and r.get("similarity") is not None:  # a diagnostic: a real model answers in its own words
                reasons.append(f"similarity to the data {r['similarity']}")
            md.append(f"| {_cell(r['q'])} | {_cell(b or (r['answer'] if not after else ''))} | {_cell(a)} | "
                      f"{'yes' if ok else '**no**'} | {_cell('; '.join(reasons))} |")
        md.append("")
    for label, probe in (("before", before), ("after", after)):
        if probe:
            md.append(f"- {label}: " + ", ".join(f"{k} {v}" for k, v in probe["summary"].items()))
    comparisons = sorted(run.glob("compare-*.json"))
    if comparisons:
        md += ["", "## Comparisons", ""]
        for c in comparisons:
            result = json.loads(c.read_text(encoding="utf-8"))
            md += [f"- [{c.stem}]({c.name}) with `{Path(result['b']).name}` ({result['host'].replace('_', ' ')}): "
                   f"{'PASS' if result['pass'] else 'FAIL'}", "", f"![{c.stem}]({c.stem}.png)", ""]
    md += ["", "Files: [manifest.json](manifest.json) (what a rerun needs), [report.json](report.json)."]
    write_json(run / "report.json", report)
    text = "\n".join(md) + "\n"
    (run / "report.md").write_text(text, encoding="utf-8")
    write_html(text, run / "report.html", f"Run {run.name}")
    return report


def write_html(markdown_text: str, out: Path, title: str) -> None:
    """The same report as a page that shows the plots (Python-Markdown with its tables extension)."""
    import html

    import markdown

    body = markdown.markdown(markdown_text, extensions=["tables"])
    out.write_text(f"<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>\n"
                   "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto}table{border-collapse:collapse}"
                   "td,th{border:1px solid #ccc;padding:.2em .5em}</style></head><body>\n"
                   f"{body}\n</body></html>\n", encoding="utf-8")
