"""Reproduce: rerun a run from its manifest alone, then compare the two.

Before anything trains, the inputs are checked against the manifest: the recipe's content
hash, every dataset's rows and the base model's weights. A mismatch is an error naming what
changed, never a silently different run. Then train and merge into a new run, here or in the
training image (RUNTIME=docker: the container reads the manifest's resolved recipe from under
runs/), and `compare` judges the result with the recipe's tolerances.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from lab import manifest
from lab.compare import compare, load
from lab.errors import LabError
from lab.recipe import Recipe
from lab.runs import new_run, stage
from lab.runtime import Runtime, choose


def recipe_of(m: dict) -> Recipe:
    section = m.get("recipe") or {}
    if "resolved" not in section:
        raise LabError("the manifest has no resolved recipe; only trained runs can be reproduced")
    source = Path(section.get("source") or "recipes/unknown.yaml")
    recipe = Recipe.model_validate({**section["resolved"],
                                    "source": str(source if source.is_absolute() else manifest.ROOT / source)})
    if recipe.sha256() != section.get("sha256"):
        raise LabError("the manifest's recipe does not match its own sha256 (edited by hand?)")
    return recipe


def check_inputs(recipe: Recipe, m: dict, runtime: Runtime) -> str:
    """The data and base weights the manifest names, or an error saying which differ. Returns the base model."""
    from lab.data import build_examples

    _, sources = build_examples(recipe)
    recorded = m.get("datasets") or []
    for now, then in zip(sources, recorded, strict=False):
        if now["rows_sha256"] != then.get("rows_sha256") or now["rows"] != then.get("rows"):
            raise LabError(f"dataset {now['path']} differs from the run's ({now['rows']} rows now, "
                           f"{then.get('rows')} then; content sha256 {now['rows_sha256'][:12]} vs "
                           f"{str(then.get('rows_sha256'))[:12]})")
    if len(sources) != len(recorded):
        raise LabError(f"the recipe reads {len(sources)} datasets; the run read {len(recorded)}")
    base = runtime.base_model(recipe)
    want = (m.get("base_model") or {}).get("weights_sha256")
    have = manifest.weights_sha256(runtime.host_path(base))
    if want and have is not None and have != want:
        raise LabError(f"base model {base} has other weights than the run's ({recipe.model.path}); "
                       "the embedded model changes when its code or library versions do")
    return base


def reproduce(ref: str, runtime_name: str | None = None) -> dict:

    run, m = load(ref)
    recipe = recipe_of(m)
    resolved = m["recipe"]["resolved"]
    commit = (m.get("base_model") or {}).get("commit")
    if commit and not recipe.model.revision:  # a hub model: the snapshot it trained on, not today's main
        resolved = {**resolved, "model": {**resolved["model"], "revision": commit}}
        recipe = recipe.model_copy(update={"model": recipe.model.model_copy(update={"revision": commit})})
        print(f"reproduce: {recipe.model.path} pinned at commit {commit} (the run's snapshot)", flush=True)
    # The resolved recipe as a file beside its source, so its dataset paths resolve as they did
    # (and a training container sees it: recipes/ is mounted there). Removed when done.
    saved = Path(recipe.source).parent / f".reproduce-{run.name}.yaml"
    try:
        saved.write_text(yaml.safe_dump(resolved, sort_keys=False, allow_unicode=True),
                         encoding="utf-8")
    except OSError as e:
        raise LabError(f"cannot write the run's recipe beside its source {recipe.source}: {e.strerror}") from None
    try:
        runtime = choose(runtime_name, recipe.backend, ["--recipe", str(saved), "--hw", recipe.backend, "--set", ""],
                         recipe)
        print(f"reproduce: {run.name}: recipe {recipe.name} sha256 {recipe.sha256()[:12]}; checking inputs "
              f"(runtime {runtime.name})", flush=True)
        check_inputs(recipe, m, runtime)
        again = new_run(f"{recipe.name}-reproduce")
        print(f"reproduce: inputs match; rerunning into {again}", flush=True)
        with stage(again, "train"):
            runtime.train(recipe, again)
        with stage(again, "merge"):
            runtime.merge(again)
    finally:
        saved.unlink(missing_ok=True)
    manifest.update(again, reproduces=run.name)
    return compare(str(run), str(again))
