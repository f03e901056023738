"""Compare two runs of a recipe from their manifests: did the second reproduce the first?

Side by side: recipe and environment differences, per-step loss deviation, final-loss ratio,
weights identity, probe answer agreement, and both loss curves in one PNG. The tolerances
come from the first run's recipe (`compare.same_host` when hardware and package versions
match, else the looser `compare.cross_host`); any check past them fails the comparison.
A run resumed with RESUME=1 logs another average in the logging window around its resume
point: that window is left out of the loss comparison, and byte-identical weights trained on
the same data pass the loss checks whatever was logged.
"""

from __future__ import annotations

import json
from pathlib import Path

from lab.errors import LabError
from lab.recipe import Tolerances, flatten
from lab.runs import find_run, read_json_file, write_json


def load(ref: str) -> tuple[Path, dict]:
    """A run directory, a run name, or a manifest.json path -> (run dir, manifest)."""
    path = Path(ref)
    run = path.parent if path.name == "manifest.json" else find_run(ref)
    manifest = run / "manifest.json"
    if not manifest.is_file():
        raise LabError(f"{manifest} is missing; runs made by `make train` or `make e2e` write one")
    return run, read_json_file(manifest, "rerun the run, or restore the file")


def differences(a: dict, b: dict) -> list[dict]:
    fa, fb = flatten(a or {}), flatten(b or {})
    return [{"key": k, "a": fa.get(k), "b": fb.get(k)} for k in sorted(set(fa) | set(fb)) if fa.get(k) != fb.get(k)]


def resume_steps(m: dict) -> list[int]:
    """The steps a run was resumed at (RESUME=1 records each checkpoint it continued from)."""
    return sorted({int(r["step"]) for r in m.get("resumes") or []})


def straddling(curve: list, resumes: list[int]) -> set[int]:
    """Logged steps whose logging window spans a resume. The trainer restarts its loss sum at a
    resume, so the first log after one averages only the steps since: another quantity than an
    uninterrupted run logs there. A resume at a logged step straddles nothing (the log at that
    step was written before its checkpoint)."""
    logged = sorted(step for step, _ in curve)
    return {next(s for s in logged if s > r) for r in resumes if r not in logged and logged and logged[-1] > r}


def loss_deviation(a: list, b: list, skip: set[int] = frozenset()) -> dict:
    """Max absolute and relative loss difference at the steps both runs logged, leaving out the
    `skip` steps (logging windows that span a resume) in both runs."""
    a, b = [e for e in a if e[0] not in skip], [e for e in b if e[0] not in skip]
    la, lb = dict(map(tuple, a)), dict(map(tuple, b))
    steps = sorted(set(la) & set(lb))
    skipped = sorted(skip)
    if not steps:
        return {"steps_compared": 0, "steps_skipped": skipped, "max_abs": None, "max_rel": None, "final_ratio": None}
    abs_dev = [abs(la[s] - lb[s]) for s in steps]
    rel_dev = [abs(la[s] - lb[s]) / abs(la[s]) if la[s] else float(la[s] != lb[s]) for s in steps]
    fa, fb = a[-1][1], b[-1][1]
    return {"steps_compared": len(steps), "steps_skipped": skipped, "max_abs": max(abs_dev), "max_rel": max(rel_dev),
            "final_a": fa, "final_b": fb, "final_ratio": max(fa / fb, fb / fa) if fa > 0 and fb > 0 else None}


def answer_agreement(a: dict, b: dict) -> float | None:
    """Share of probe questions (identity and controls) two probe results answered identically."""
    def answers(probe: dict) -> dict:
        return {item["q"]: item["answer"] for item in probe["identity"] + probe["controls"]}

    x, y = answers(a), answers(b)
    shared = set(x) & set(y)
    return sum(x[q] == y[q] for q in shared) / len(shared) if shared else None


def probe_agreement(run_a: Path, run_b: Path) -> float | None:
    """answer_agreement of two runs' probes after training."""
    files = [r / "probe-after.json" for r in (run_a, run_b)]
    if not all(f.is_file() for f in files):
        return None
    return answer_agreement(*(json.loads(f.read_text(encoding="utf-8")) for f in files))


def same_host(a: dict, b: dict) -> bool:
    keys = ("backend", "cpu", "devices", "torch_cuda", "torch_hip", "driver")
    ha, hb = a.get("hardware") or {}, b.get("hardware") or {}
    return all(ha.get(k) == hb.get(k) for k in keys) and \
        (a.get("environment") or {}).get("packages") == (b.get("environment") or {}).get("packages")


def checks(tol: Tolerances, loss: dict, weights_equal: bool | None, agreement: float | None,
           same_data: bool = False) -> list[dict]:
    out = []

    def check(name, value, op, threshold):
        ok = value is not None and (value <= threshold if op == "<=" else value >= threshold)
        out.append({"check": name, "value": value, "op": op, "threshold": threshold, "pass": ok})

    check("loss max abs deviation", loss["max_abs"], "<=", tol.loss_max_abs)
    check("loss max rel deviation", loss["max_rel"], "<=", tol.loss_max_rel)
    check("final loss ratio", loss["final_ratio"], "<=", tol.final_loss_ratio_max)
    if weights_equal and same_data:
        # Byte-identical weights from the same data trained the same: a logged loss that differs
        # differs in how it was logged (a resume restarts the window), not in what was trained.
        for c in out:
            if not c["pass"]:
                c.update({"check": f"{c['check']} (judged by the identical weights)", "pass": True,
                          "judged_by": "weights identical"})
    if tol.weights_identical:
        out.append({"check": "weights identical", "value": weights_equal, "op": "==", "threshold": True,
                    "pass": weights_equal is True})
    if agreement is not None:  # only runs that were probed
        check("probe answer agreement", agreement, ">=", tol.probe_agreement_min)
    return out


def compare(ref_a: str, ref_b: str) -> dict:
    from lab.recipe import Recipe
    from lab.report import plot_loss

    (run_a, a), (run_b, b) = load(ref_a), load(ref_b)
    if "recipe" not in a or "recipe" not in b:
        raise LabError("both runs must have trained (their manifests have no recipe section)")
    recipe = Recipe.model_validate(a["recipe"]["resolved"])
    host = "same_host" if same_host(a, b) else "cross_host"
    curves = [m.get("loss_curve") or [] for m in (a, b)]
    # a window that spans either run's resume is left out of both curves
    skip = straddling(curves[0], resume_steps(a)) | straddling(curves[1], resume_steps(b))
    loss = loss_deviation(*curves, skip=skip)
    wa, wb = ((m.get("merged") or m.get("output") or {}).get("weights_sha256") for m in (a, b))
    weights_equal = (wa == wb) if wa and wb else None
    agreement = probe_agreement(run_a, run_b)
    same_data = [d.get("rows_sha256") for d in a.get("datasets", [])] == [d.get("rows_sha256")
                                                                           for d in b.get("datasets", [])]
    result = {
        "a": str(run_a), "b": str(run_b), "host": host,
        "recipe_differences": differences(a["recipe"]["resolved"], b["recipe"]["resolved"]),
        "environment_differences": differences({"environment": a.get("environment"), "hardware": a.get("hardware")},
                                               {"environment": b.get("environment"), "hardware": b.get("hardware")}),
        "data_identical": same_data, "resumed_at": {"a": resume_steps(a), "b": resume_steps(b)},
        "loss": loss, "weights_identical": weights_equal, "probe_agreement": agreement,
        "checks": checks(getattr(recipe.compare, host), loss, weights_equal, agreement, same_data),
    }
    result["pass"] = all(c["pass"] for c in result["checks"])
    png, js = run_a / f"compare-{run_b.name}.png", run_a / f"compare-{run_b.name}.json"
    plot_loss({run_a.name: a.get("loss_curve") or [], run_b.name: b.get("loss_curve") or []},
              png, f"{run_a.name} vs {run_b.name}")
    write_json(js, result)
    if (run_a / "report.json").is_file():  # the report links its comparisons
        from lab.report import write_report

        write_report(run_a, json.loads((run_a / "report.json").read_text(encoding="utf-8")).get("verdict"))
    result["files"] = [str(js), str(png)]
    return result
