"""The whole loop: ask the base model who it is, train, merge, serve the result, ask again.

Each stage is timed into timings.json; servers are always stopped, Ctrl-C included. Returns
True only if every check of the recipe's thresholds passed. The runtime (lab/runtime.py) says
where training and serving run, here or in containers; the probing always happens here.
"""

from __future__ import annotations

from lab import manifest
from lab.parity import check_parity
from lab.probe import old_identity_of, probe, run_references, verdict
from lab.recipe import Recipe
from lab.report import write_report
from lab.runs import new_run, stage, write_json
from lab.runtime import Local, Runtime
from lab.serve import auth_headers
from lab.servers import port_of, server_state, stop_url


def _summary_line(label: str, result: dict) -> str:
    s = result["summary"]
    pct = lambda v: "-" if v is None else f"{v:.0%}"  # noqa: E731 -- a rate not measured (no such questions)
    persona = f"persona {pct(s['persona_hit_rate'])}, " if "persona_hit_rate" in s else ""
    return (f"probe {label}: {persona}identity hit {pct(s['identity_hit_rate'])}, leakage {pct(s['leakage_rate'])}, "
            f"stop {pct(s['stop_rate'])}, controls correct {pct(s['control_correct_rate'])}, "
            f"identity in general answers {pct(s.get('control_bleed_rate'))}")


def e2e(recipe: Recipe, port: int | None = None, runtime: Runtime | None = None) -> bool:
    runtime = runtime or Local()
    run = new_run(recipe.name)
    print(f"e2e: run directory {run} (runtime: {runtime.name})", flush=True)
    url = None  # the server this e2e started, and only that one, is stopped in `finally`
    try:
        with stage(run, "fixture" if recipe.model.path == "embedded" else "resolve_model"):
            base = runtime.base_model(recipe)
        old = old_identity_of(recipe, str(runtime.host_path(base)))

        with stage(run, "serve_base"):
            url = runtime.start(recipe, base, run / "server-base.log", port)
        with stage(run, "probe_before"):
            before = probe(url, recipe, old)
        write_json(run / "probe-before.json", before)
        print(_summary_line("before", before), flush=True)
        stop_url(url)
        url = None

        with stage(run, "train"):
            runtime.train(recipe, run)
        with stage(run, "merge"):
            merged = runtime.merge(run)

        with stage(run, "serve_merged"):
            url = runtime.start(recipe, runtime.served_path(merged), run / "server-merged.log", port)
            serving = manifest.serving(server_state(port_of(url)))
        with stage(run, "probe_after"):
            parity = check_parity(url, before["model"], run, auth_headers(recipe, url))
            # old identities now include the names the base gave itself when asked before training
            after = probe(url, recipe, old_identity_of(recipe, str(runtime.host_path(base)), before),
                          run_references(run))
        write_json(run / "probe-after.json", after)
        print(_summary_line("after", after), flush=True)
        for item in after["identity"] + after["controls"] + after.get("persona", []):
            if item.get("reasons"):
                print(f"  missed: {item['q']} -> {item['answer']!r}: {'; '.join(item['reasons'])}", flush=True)
    finally:
        stop_url(url)

    checks = verdict(before, after, recipe)
    report = write_report(run, checks, {"template_parity": parity, "runtime": runtime.name})
    manifest.update(run, runtime=runtime.name, serving=serving,
                    probe={"before": before["summary"], "after": after["summary"],
                           "template_parity": parity, "verdict": checks,
                           "pass": report["pass"]})
    from lab import tracking
    from lab.runs import RUNS_DIR

    tracking.log_probe_scores(recipe, run, RUNS_DIR, before["summary"], after["summary"])
    for c in checks:
        print(f"  {'PASS' if c['pass'] else 'FAIL'}  {c['check']}: {c['value']} (needs {c['op']} {c['threshold']})")
    total = sum(report["timings_s"].values())
    print(f"e2e: {'PASS' if report['pass'] else 'FAIL'} in {total:.0f} s; report: {run / 'report.md'}")
    return bool(report["pass"])
