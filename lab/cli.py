"""The `lab` command: one table from subcommand to function (after litgpt's __main__).

Every subcommand that reads a recipe takes --recipe, --hw and --set "key.sub=value ...".
Every argument also has an environment default, LAB_ARG_<NAME> (LAB_ARG_SET, LAB_ARG_Q, ...): the
Makefile hands make variables over that way, so they never pass through a shell.
Any error is printed as one line (lab/errors.py) and exits 2 (70 for a bug); LAB_DEBUG=1 adds the
traceback. A failed identity check exits 1. SIGTERM and SIGHUP clean up as Ctrl-C does.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import sys
import traceback
from pathlib import Path

from lab.device.hardware import BACKENDS
from lab.errors import LabError, debug, explain

DEFAULT_RECIPE = "identity-lora"


def arg_env(name: str, default=None):
    """The default of an argument: LAB_ARG_<NAME> from the environment (how make passes values)."""
    return os.environ.get(f"LAB_ARG_{name}") or default


def arg_flag(name: str) -> bool:
    return arg_env(name, "0").strip().lower() not in ("", "0", "false", "no")


def overrides(args) -> list[str]:
    try:
        return shlex.split(args.set or "")
    except ValueError as e:  # an unbalanced quote: identity.author=O'Brien
        raise LabError(f"SET={args.set!r}: {str(e).lower()}; quote a value with an apostrophe in double "
                       "quotes (identity.author=\"O'Brien\")") from None


def _recipe(args, check_train: bool = False):
    from lab.recipe import load_recipe

    recipe = load_recipe(args.recipe or DEFAULT_RECIPE, overrides(args), hw=args.hw, check_train=check_train)
    print(f"lab: recipe {recipe.name} on {recipe.backend} (sha256 {recipe.sha256()[:12]})", flush=True)
    return recipe


def _run_recipe(args, run: Path | None, why: str = ""):
    """The recipe to serve or judge a run's model by: the one the run trained with (its
    runs/<id>/recipe.yaml: identity, chat_template_kwargs, serve settings), SET= on top. RECIPE=
    replaces it on purpose (that recipe, SET= on top). Without a run: RECIPE= (default identity-lora)."""
    if run is None:
        return _recipe(args)
    if args.recipe:
        recipe = _recipe(args)
        print(f"lab: RECIPE={args.recipe} replaces the recipe {run.name} trained with ({run / 'recipe.yaml'})",
              flush=True)
        return recipe
    from lab.recipe import load_saved

    sets = overrides(args)
    recipe = load_saved(run, sets, hw=args.hw)
    how = "".join([", SET " + args.set.strip() + " on top" if sets else "", "; " + why if why else ""])
    print(f"lab: recipe {recipe.name} on {recipe.backend} (sha256 {recipe.sha256()[:12]}) of run {run.name} "
          f"({run / 'recipe.yaml'}{how}): identity {recipe.identity.name!r} by {recipe.identity.author!r}", flush=True)
    return recipe


def _record_owner(state: dict, hw: str) -> Path | None:
    """The run whose model (merged, adapter) a lab server record names; None for a base model or a
    hub id, or a container's path that cannot be mapped back here."""
    from lab.runs import owner

    if "container" not in state:
        return owner(state["model"])
    from lab.device.hardware import resolve_backend
    from lab.runtime import Docker

    try:
        return owner(Docker(resolve_backend(hw), []).host_path(state["model"]))
    except LabError:  # no engine answers now, or a path only the container has
        return None


def _asked_run(args) -> tuple[Path | None, str, bool]:
    """Whose recipe a client of the server (probe, ask, load) uses: the run whose model the lab's server
    that will be asked serves (True: it serves that run), else runs/latest, else none (the default recipe)."""
    from lab.runs import RUNS_DIR
    from lab.servers import port_of, server_state

    if args.base_url:
        from lab.probe import server_root

        root = server_root(args.base_url)
        state = server_state(port_of(root))
        state = state if state and state["url"].rstrip("/") == root else None
    else:
        state = server_state(_port(args))
    if state and state.get("adapters"):  # several adapters: the first one's run (ADAPTERS= order)
        from lab.runs import find_run

        name = next(iter(state["adapters"]))
        return find_run(name), f"the lab's server at {state['url']} serves its adapter, the first of " \
            f"{len(state['adapters'])}", True
    run = _record_owner(state, args.hw) if state else None
    if run is not None and (run / "recipe.yaml").is_file():
        return run, f"the lab's server at {state['url']} serves its {Path(state['model']).name}", True
    latest = RUNS_DIR / "latest"
    if (latest / "recipe.yaml").is_file():
        return latest.resolve(), "runs/latest; the server asked serves no run's model", False
    return None, "", False


def _runtime(args, recipe):
    """RUNTIME=local|docker|auto (docker when an engine answers). The docker runtime re-reads the
    same recipe inside the training container, so it gets the same recipe arguments."""
    from lab.runtime import choose

    ref = args.recipe or DEFAULT_RECIPE
    if Path(ref).expanduser().is_file():  # a path: the container must see it (recipes/ and runs/ are mounted)
        ref = str(Path(ref).expanduser().resolve())
    rt = choose(args.runtime, recipe.backend, ["--recipe", ref, "--hw", recipe.backend, "--set", args.set or ""],
                recipe)
    print(f"lab: runtime {rt.name}", flush=True)
    return rt


def _port(args):
    raw = getattr(args, "port", None)
    if not raw:
        return None
    if not str(raw).isdigit() or not 1 <= int(raw) <= 65535:
        raise LabError(f"PORT={raw!r} is not a port number (1-65535)")
    return int(raw)


def cmd_fixture(args) -> int:
    from lab.fixture import ensure_fixture

    print(ensure_fixture(force=args.force))
    return 0


def cmd_train(args) -> int:
    from lab import manifest
    from lab.device.cluster import address
    from lab.device.launch import config_file, is_main_process, topology
    from lab.recipe import load_saved
    from lab.runs import find_run, new_run, run_dir, stage

    if args.gpus < 1:
        raise LabError(f"GPUS={args.gpus}: give a number of processes, 1 or more")
    if cluster := address(args.cluster):  # Ray places the workers: no rendezvous of ours
        if args.node_rank or args.main:
            raise LabError(f"CLUSTER={cluster}: Ray places GPUS x NODES workers itself; drop NODE_RANK and MAIN")
    # before a run directory exists: the accelerate config, and the machines it (or NODES=) names
    topo = topology(args.nodes, args.node_rank, args.main,
                    config_file(args.dist) if args.gpus > 1 or args.nodes or args.dist != "ddp" else None) \
        if not cluster else None
    if topo and topo.node_rank > 0 and is_main_process():  # another node's launcher: node 0 writes the run
        return _train_on_node(args, topo)
    created = False
    if args.resume:
        run = find_run(args.run)
        recipe = load_saved(run)
        _same_recipe(args, run, recipe)
        args.recipe, args.set = str(run / "recipe.yaml"), ""  # what other processes and containers read
        print(f"lab: resuming {run.name}")
    else:
        recipe = _recipe(args, check_train=True)
        created = not args.run
        run = run_dir(args.run) if args.run else new_run(recipe.name)
    try:
        runtime = _runtime(args, recipe)
        if not is_main_process():  # one of N processes under accelerate launch: the launcher times it
            runtime.train(recipe, run, resume=args.resume)
            return 0
        with stage(run, "train"):
            if cluster:
                runtime.train(recipe, run, resume=args.resume, gpus=args.gpus * (args.nodes or 1), cluster=cluster)
            else:
                runtime.train(recipe, run, resume=args.resume, gpus=args.gpus, dist=args.dist, topo=topo)
    except BaseException as e:
        # A new run that failed before its first checkpoint holds nothing to resume: it goes, so
        # it never looks like a result (and `latest` goes back), its logs kept in runs/.failed/<run-id>/
        # (the error line names them). One with a checkpoint stays for RESUME=1; a run whose loss
        # diverged or went NaN removed its own checkpoints first (lab/train.py), so it goes too.
        if created and is_main_process() and not any((run / "checkpoints").glob("checkpoint-*/trainer_state.json")):
            from lab.runs import discard_run, keep_failed_logs

            try:
                log = keep_failed_logs(run, e)
            except OSError:  # a full disk, say: the run's own error is the one to report
                log = None
            discard_run(run)
            print(f"lab: removed {run.name} (no checkpoint to resume from)"
                  + (f"; its log: {log}" if log else ""), flush=True)
        raise
    manifest.update(run)  # picks up the stage's time
    print(f"lab: run directory {run}")
    return 0


def _train_on_node(args, topo) -> int:
    """NODE_RANK > 0: this machine's processes of a training whose run node 0 writes (its rank 0
    saves every checkpoint). They get a scratch directory, removed after; RESUME=1 reads the run's
    checkpoints, so it needs RUN= on storage every node shares."""
    import shutil
    import tempfile

    from lab.recipe import load_saved
    from lab.runs import find_run

    if args.resume:
        run = find_run(args.run)
        recipe = load_saved(run)
        args.recipe, args.set = str(run / "recipe.yaml"), ""
    else:
        recipe, run = _recipe(args, check_train=True), Path(tempfile.mkdtemp(prefix="lab-node-"))
    try:
        _runtime(args, recipe).train(recipe, run, resume=args.resume, gpus=args.gpus, dist=args.dist, topo=topo)
    except LabError as e:
        if args.resume or not (run / "train.log").is_file():
            raise
        from lab.runs import RUNS_DIR

        # the scratch directory goes; its log is what the error points to
        kept = RUNS_DIR / ".failed" / f"{run.name}-node{topo.node_rank}.log"
        kept.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(run / "train.log", kept)
        raise LabError(str(e).replace(str(run / "train.log"), str(kept))) from None
    finally:
        if not args.resume:
            shutil.rmtree(run, ignore_errors=True)
    print(f"lab: node {topo.node_rank} of {topo.nodes} done; node 0 wrote the run")
    return 0


def cmd_job(args) -> int:
    """A batch job of the recipe's training for a cluster's scheduler (Slurm), written, not submitted."""
    from lab import ROOT
    from lab.jobs import SUFFIX, write_job
    from lab.runs import RUNS_DIR

    recipe = _recipe(args, check_train=True)
    ref = args.recipe or DEFAULT_RECIPE
    if Path(ref).expanduser().is_file():  # every node reads it: the same absolute path on shared storage
        ref = str(Path(ref).expanduser().resolve())
    suffix = SUFFIX.get(args.target, "txt")
    out = Path(args.out).expanduser() if args.out else RUNS_DIR / "jobs" / f"{recipe.name}-{args.target}.{suffix}"
    path = write_job(args.target, recipe, ref, args.set or "", args.hw, args.nodes, args.gpus, out, ROOT, RUNS_DIR,
                     args.image)
    if args.target == "k8s":
        print(f"job: {path}: a Kubeflow TrainJob of {recipe.name} on {args.nodes} pods x {args.gpus} (checked against "
              f"the TrainJob schema); submit it: kubectl apply -f {path}")
    else:
        print(f"job: {path} trains {recipe.name} on {args.nodes} nodes x {args.gpus} GPUs (the checkout at {ROOT} on "
              f"every node); submit it: sbatch {path}")
    return 0


def _same_recipe(args, run: Path, saved) -> None:
    """RESUME=1 with RECIPE= or SET= is refused unless they resolve to the recipe the run started with."""
    if not (args.recipe or args.set):
        return
    from lab.recipe import check_resume, load_recipe

    given = load_recipe(args.recipe or str(run / "recipe.yaml"), overrides(args), hw=saved.backend, check_train=False)
    check_resume(run, saved, given)


def cmd_merge(args) -> int:
    from lab import manifest
    from lab.recipe import load_saved
    from lab.runs import find_run, stage
    from lab.runtime import choose

    run = find_run(args.run)
    recipe = load_saved(run)
    runtime = choose(args.runtime, recipe.backend, [])
    with stage(run, "merge"):
        runtime.merge(run)
    manifest.update(run)  # picks up the stage's time
    return 0


def cmd_resolve(args) -> int:
    """The local directory of a base model (built, found, or downloaded into the HF cache)."""
    from lab.models import resolve

    if args.model:
        model = resolve(args.model, args.revision, args.allow_pickle)
    else:
        recipe = _recipe(args)
        model = resolve(recipe.model.path, args.revision or recipe.model.revision,
                        args.allow_pickle or recipe.model.allow_pickle)
    if args.out:
        from lab.runs import write_json

        write_json(Path(args.out), {"model": model})
    print(model)
    return 0


def _model_to_serve(args, recipe, runtime) -> str:
    """What to serve, as the server sees it: a run's merged model, the base, a directory or a hub id."""
    from lab.runs import find_run

    if not args.model:
        return runtime.served_path(find_run(args.run) / "merged")
    if args.model == "base":
        return runtime.base_model(recipe)
    local = Path(args.model).expanduser()
    if local.exists():
        return runtime.served_path(local.resolve())
    return runtime.base_model(recipe, model=args.model)  # a hub id: downloaded (into the cache) first


def _served_run(args) -> Path | None:
    """The run whose model `serve` is asked for: its merged model (RUN=, default runs/latest), its
    adapter (ADAPTER=1), or MODEL=<a directory inside it>; None for MODEL=base, a hub id, any other directory."""
    from lab.runs import find_run, owner

    if args.adapter or not args.model:
        return find_run(args.run)
    local = Path(args.model).expanduser()
    run = owner(local) if args.model != "base" and local.exists() else None
    return run if run is not None and (run / "recipe.yaml").is_file() else None


def _serve_cluster(args, recipe):
    """CLUSTER= (or RAY_ADDRESS) and NODES=: vLLM over machines of a Ray cluster, a pipeline stage each."""
    from lab.device.cluster import address
    from lab.serve import check_ray

    update = {}
    if cluster := address(args.cluster):
        update["ray_address"] = cluster
    if args.nodes is not None:
        if args.nodes < 1:
            raise LabError(f"NODES={args.nodes}: give the number of machines to split the model over, 1 or more")
        update["pipeline_parallel_size"] = args.nodes
    if update:
        recipe = recipe.model_copy(update={"serve": recipe.serve.model_copy(update=update)})
    check_ray(recipe)
    return recipe


def cmd_serve(args) -> int:
    """Serve a run's merged model (RUN=, default runs/latest), its adapter (ADAPTER=1), or MODEL=.

    The recipe (chat_template_kwargs, served model name, port, API key variable) is the run's own,
    runs/<id>/recipe.yaml, whenever the model is that run's (MODEL=<a directory inside a run> too):
    SET= goes on top of it; RECIPE= replaces it on purpose (SET= on top of that). MODEL=base, a hub
    id or another directory: RECIPE= (default identity-lora) with SET=, as for training."""
    from lab.runs import RUNS_DIR
    from lab.serve import check_adapter_loading, check_exposure

    if args.adapters:  # the first of the runs whose adapters are served: its recipe is the server's
        from lab.runs import find_run

        run = find_run(args.adapters[0])
    else:
        run = _served_run(args)
    recipe = _run_recipe(args, run, "the model to serve is its own")
    check_exposure(recipe)  # before a model is resolved (a GGUF base converts first: minutes, and output)
    check_adapter_loading(recipe, bool(args.adapters))
    if args.gpus is not None:  # else the recipe's serve.tensor_parallel_size
        if args.gpus < 1:
            raise LabError(f"GPUS={args.gpus}: give the number of GPUs to split the model over (vLLM tensor parallel)")
        recipe = recipe.model_copy(
            update={"serve": recipe.serve.model_copy(update={"tensor_parallel_size": args.gpus})})
    recipe = _serve_cluster(args, recipe)
    runtime = _runtime(args, recipe)
    adapter = None
    if args.adapters:  # several LoRA runs of one base, one server
        recipe, model, adapter = _adapters(args.adapters, runtime, args)
    elif args.adapter:  # the run's base model with its LoRA applied by vLLM at run time, no merge
        from lab.recipe import load_saved
        from lab.runs import find_run

        run = find_run(args.run)
        trained = load_saved(run)
        if trained.method != "lora" or not (run / "adapter").is_dir():
            raise LabError(f"ADAPTER=1 serves a LoRA run's adapter; {run.name} has none (method {trained.method})")
        recipe = recipe.model_copy(update={"lora": trained.lora})
        model, adapter = runtime.base_model(trained), runtime.served_path(run / "adapter")
    else:
        model = _model_to_serve(args, recipe, runtime)
    port = _port(args) or recipe.serve.port
    log = RUNS_DIR / f"server-{port}.log"  # one per port: two servers never write one log
    print(f"serve: starting vLLM for {model}{f' + LoRA {adapter}' if adapter else ''} (log: {log})", flush=True)
    url = runtime.start(recipe, model, log, port, adapter)
    names = list(adapter) + [f"{recipe.serve.served_model_name}-base"] if isinstance(adapter, dict) \
        else [recipe.serve.served_model_name]
    print(f"serve: ready at {url}/v1 as model {', '.join(repr(n) for n in names)}; `make stop` ends it")
    from lab.servers import recorded_key

    if recorded_key(url):
        print(f"serve: it requires the key the lab generated (runs/.servers/{port}.json, yours only); `make ask` "
              f"sends it, curl: -H \"Authorization: Bearer $(make -s key PORT={port})\"")
    return 0


def cmd_key(args) -> int:
    """The API key the lab generated for its server (PORT=: that one's), for curl and other clients."""
    from lab.servers import server_state

    state = server_state(_port(args))
    if not state:
        raise LabError(f"no lab server is running{f' on port {_port(args)}' if _port(args) else ''}; `make serve` "
                       "starts one")
    if not state.get("api_key"):
        raise LabError(f"the lab's server at {state['url']} has no key of the lab's: it was started with "
                       "LAB_API_KEY (that is its key) or with serve.require_key=false (none)")
    print(state["api_key"])
    return 0


def cmd_adapter(args) -> int:
    """Load a further LoRA run into the running server of adapters (started with ADAPTERS= and
    serve.adapter_loading=true): it answers under its run's name, and `make probe` probes it too."""
    import httpx

    from lab.runs import find_run
    from lab.serve import auth_headers
    from lab.servers import server_state, update_record

    state = server_state(_port(args))
    if not state:
        raise LabError("no lab server is running; `make serve ADAPTERS=\"RUN ...\" SET=serve.adapter_loading=true` "
                       "starts one that loads adapters")
    if not state.get("adapter_loading"):
        raise LabError(f"the lab's server at {state['url']} loads no adapters while it serves: start it with "
                       "ADAPTERS=\"RUN ...\" SET=serve.adapter_loading=true")
    run = find_run(args.run)
    if run.name in state["adapters"]:
        raise LabError(f"{run.name} is already served at {state['url']} (model '{run.name}')")
    first = find_run(next(iter(state["adapters"])))
    # the server's runtime, so the adapter's path is the one the server sees; then the same checks as
    # ADAPTERS= at start: a LoRA run, the server's base, its chat rendering
    args.runtime = args.runtime or ("docker" if "container" in state else "local")
    recipe, _, adapters = _adapters([first.name, run.name], _runtime(args, _run_recipe(args, first)), args)
    reply = httpx.post(f"{state['url']}/v1/load_lora_adapter", headers=auth_headers(recipe, state["url"]),
                       json={"lora_name": run.name, "lora_path": adapters[run.name]}, timeout=600)
    if reply.status_code != 200:
        raise LabError(f"vLLM did not load {run.name} (HTTP {reply.status_code}): {reply.text.strip()[:300]}")
    update_record(state, adapters={**state["adapters"], run.name: adapters[run.name]})
    print(f"adapter: {run.name} is served at {state['url']}/v1 as model '{run.name}'; `make probe` probes it too")
    return 0


def _adapters(refs: list[str], runtime, args):
    """ADAPTERS=: (recipe, base, {run name: adapter path}) for LoRA runs of one base model. The
    server takes the first run's recipe (SET= on top of each); every run must render chats as it
    does (chat-template kwargs), or its answers would not be what it learned."""
    from lab.recipe import load_saved
    from lab.runs import find_run

    runs = [find_run(ref) for ref in dict.fromkeys(refs)]
    recipes = [load_saved(run, overrides(args), hw=args.hw) for run in runs]
    for run, r in zip(runs, recipes, strict=True):
        if r.method != "lora" or not (run / "adapter").is_dir():
            raise LabError(f"ADAPTERS= serves LoRA runs' adapters; {run.name} has none (method {r.method})")
    bases = [str(runtime.base_model(r)) for r in recipes]
    for run, r, base in zip(runs[1:], recipes[1:], bases[1:], strict=True):
        if base != bases[0]:
            raise LabError(f"ADAPTERS=: {run.name} was trained on {base}, {runs[0].name} on {bases[0]}: one server "
                           "serves adapters of one base; start a server per base (PORT=)")
        if r.chat_template_kwargs != recipes[0].chat_template_kwargs:
            raise LabError(f"ADAPTERS=: {run.name} renders chats with {r.chat_template_kwargs}, {runs[0].name} with "
                           f"{recipes[0].chat_template_kwargs}; one server renders them one way")
    recipe = recipes[0].model_copy(update={"lora": recipes[0].lora.model_copy(
        update={"r": max(r.lora.r for r in recipes)})})
    return recipe, bases[0], {run.name: runtime.served_path(run / "adapter") for run in runs}


def cmd_stop(args) -> int:
    """Stop the lab's servers (PORT=: that one), then any serving container of this checkout that
    lost its record (its lab command was killed), found by label."""
    from lab.servers import records, stop

    stop(port=_port(args))
    if args.port:
        return 0
    from lab import containers

    if not containers.engine_available():
        return 0
    known = {r.get("container") for r in records()}
    for c in containers.lab_containers():
        if c.labels.get(containers.LABEL, "").startswith("serve-") and c.id not in known:
            containers.remove(c, timeout=10)
            print(f"stop: removed container {c.short_id} ({c.labels[containers.LABEL]}), left by an interrupted "
                  "lab command")
    return 0


def _url(args, recipe) -> str:
    from lab.probe import server_root
    from lab.serve import base_url
    from lab.servers import running_url

    if args.base_url:
        return server_root(args.base_url)
    port = _port(args)  # PORT= names a server: never silently swapped for the recorded one
    return base_url(recipe, port) if port else (running_url() or base_url(recipe))


def _client_recipe(args):
    """The recipe `ask` and `load` use: the server's run's, as probe's. Against a server of several
    adapters, the first adapter's run, asking that adapter by its name unless
    SET=serve.served_model_name=<another run or <name>-base> asks another model of the server."""
    run, why, _ = _asked_run(args)
    recipe = _run_recipe(args, run, why)
    adapters = _served_adapters(args)
    if adapters and "serve.served_model_name" not in (args.set or ""):
        recipe = recipe.model_copy(update={"serve": recipe.serve.model_copy(
            update={"served_model_name": next(iter(adapters))})})
    return recipe


def cmd_ask(args) -> int:
    """One question to the server, with the recipe probe would judge it by (its chat_template_kwargs)."""
    from lab.probe import ask

    recipe = _client_recipe(args)
    r = ask(_url(args, recipe), args.question, recipe)
    print(r["answer"])
    if r["finish_reason"] != "stop":
        print(f"(finish_reason: {r['finish_reason']})", file=sys.stderr)
    return 0


def cmd_probe(args) -> int:
    """Identity and control questions against a server, judged by a recipe, recorded in a run.

    The recipe is that of the run whose model the lab's server asked serves (found from the
    server's record: PORT=, BASE_URL= naming it, or the only one), else runs/latest's, else
    RECIPE= (default identity-lora). SET= goes on top of a run's recipe; RECIPE= replaces it on
    purpose (SET= on top of that). Against a run's server, template parity is checked too: the
    server must render the run's parity.json conversations as the ids training used; drift exits 1."""
    from lab.probe import load_questions, probe, run_references

    adapters = _served_adapters(args)
    if adapters:  # a server of several adapters: each is probed into its own run
        return _probe_adapters(args, adapters)
    run, why, served = _asked_run(args)
    recipe = _run_recipe(args, run, why)
    load_questions(recipe)  # a bad question file is one line before any model is built or fetched
    url = _url(args, recipe)
    runtime = _runtime(args, recipe)
    old = _old_identity(recipe, runtime, run)
    # the identity data's answers as training wrote them into the run: the datasets are not read again
    result = probe(url, recipe, old, run_references(run) if run else None)
    parity = _probe_parity(url, result["model"], run, recipe) if served else None
    if parity is not None:
        result["template_parity"] = parity
    for item in result.get("persona", []) + result["identity"] + result["controls"]:
        ok = item.get("hit", item.get("correct"))
        why_not = "" if ok else f"  ({'; '.join(item.get('reasons') or [])})"
        print(f"{'ok ' if ok else '-- '}{item['q']} -> {item['answer']} [{item['finish_reason']}]{why_not}")
    print(json.dumps(result["summary"], ensure_ascii=False))
    if args.out:
        Path(args.out).write_text(json.dumps(result, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    recorded, entry = _record(result, url, recipe, runtime)
    if entry.get("agreement_with_merged") is not None:
        print(f"probe: runtime LoRA vs the merged model: {entry['agreement_with_merged']:.0%} of answers identical")
    print(f"probe: recorded in {recorded / 'manifest.json'}")
    if parity is not None and parity["match"] is False:
        print(f"probe: TEMPLATE DRIFT: {parity['problem']}. The server renders chats unlike training, so these "
              f"answers do not show what {run.name} learned; serve its own model and recipe (`make serve "
              f"RUN={run.name}`)", file=sys.stderr)
        return 1
    return 0


def _old_identity(recipe, runtime, run: Path | None) -> list[str]:
    """The old identities a probe's leakage counts: the recipe's, the base model's own persona (the
    embedded model records one, a chat template may give one) and, for a run's server, every name
    the base gave itself in the run's first probe."""
    from lab.probe import old_identity_of

    before = run / "probe-before.json" if run else None
    before = json.loads(before.read_text(encoding="utf-8")) if before and before.is_file() else None
    return old_identity_of(recipe, str(runtime.host_path(runtime.base_model(recipe))), before)


def _record(result: dict, url: str, recipe, runtime, run: Path | None = None) -> tuple[Path, dict]:
    """record_probe, with the template parity checked beside the probe written into its entry."""
    from lab.probe import record_probe

    recorded, entry = record_probe(result, url, recipe, runtime, run)
    if result.get("template_parity") is not None:
        from lab import manifest

        manifest.amend(recorded, "probes", entry["file"], template_parity=result["template_parity"])
    return recorded, entry


def _served_adapters(args) -> dict[str, str] | None:
    """The adapters (name -> path) of the lab's server that will be asked, when it serves several."""
    from lab.servers import server_state

    if args.base_url:
        return None
    state = server_state(_port(args))
    return state.get("adapters") if state else None


def _probe_adapters(args, adapters: dict[str, str]) -> int:
    """A server of several adapters (ADAPTERS=): each adapter probed by its own run's recipe and
    recorded in that run, with template parity; then the bare base, recorded in a `probe` run."""
    from lab.probe import probe, run_references
    from lab.runs import find_run

    drift = False
    for name in adapters:
        run = find_run(name)
        recipe = _run_recipe(args, run, f"adapter {name} of the lab's server")
        runtime = _runtime(args, recipe)
        url = _url(args, recipe)
        old = _old_identity(recipe, runtime, run)
        result = probe(url, recipe, old, run_references(run), model=name)
        parity = _probe_parity(url, name, run, recipe)
        if parity is not None:
            result["template_parity"] = parity
            drift |= parity["match"] is False
        recorded, _ = _record(result, url, recipe, runtime, run)
        print(f"probe: {name} (as {recipe.identity.name}): {json.dumps(result['summary'], ensure_ascii=False)} "
              f"-> {recorded / 'manifest.json'}")
    base = f"{recipe.serve.served_model_name}-base"
    result = probe(url, recipe, old, None, model=base)
    recorded, _ = _record(result, url, recipe, runtime)
    print(f"probe: {base}: {json.dumps(result['summary'], ensure_ascii=False)} -> {recorded / 'manifest.json'}")
    return 1 if drift else 0


def _probe_parity(url: str, model: str, run: Path, recipe) -> dict | None:
    """Template parity of the run's server, as e2e checks it; None (and why) when the run saved no samples."""
    from lab.parity import parity_result
    from lab.serve import auth_headers

    if not (run / "parity.json").is_file():
        print(f"probe: template parity not checked: {run.name} has no parity.json (trained by an older lab?)")
        return None
    parity = parity_result(url, model, run, auth_headers(recipe, url))
    if parity["match"] is None:
        print(f"probe: template parity not checked: {run / 'parity.json'} holds no conversation (each sampled "
              "one reached train.max_length)")
    elif parity["match"]:
        print(f"probe: template parity: the server renders {parity['samples']} training conversations token for "
              "token as training tokenized them")
    return parity


def cmd_load(args) -> int:
    from lab.load import load

    recipe = _client_recipe(args)  # the server's own run's recipe, as for probe
    url = _url(args, recipe)
    print(f"load: {args.requests} requests, {args.concurrency} at a time, at most {args.time_limit:g} s, "
          f"against {url}", flush=True)
    r = load(url, recipe, args.concurrency, args.requests, args.time_limit)
    kinds = f" {r['error_kinds']}" if r["errors"] else ""
    print(f"load: {r['completed']} completed, {r['errors']} errors{kinds}, {r['cut_off']} cut off and "
          f"{r['not_sent']} not sent at the time limit; {r['wall_s']} s")
    print(f"load: latency p50 {r['latency_p50_s']} s, p99 {r['latency_p99_s']} s; streamed first token p50 "
          f"{r['ttft_p50_s']} s, p99 {r['ttft_p99_s']} s; {r['tokens_per_s']} generated tokens/s, "
          f"{r['requests_per_s']} requests/s")
    print(f"load: {r['file']}")
    return 0 if r["errors"] == 0 else 1


def cmd_e2e(args) -> int:
    from lab.e2e import e2e

    recipe = _recipe(args, check_train=True)
    return 0 if e2e(recipe, _port(args), _runtime(args, recipe)) else 1


def cmd_doctor(args) -> int:
    from lab.doctor import doctor, show

    seen = doctor(args.hw)
    print(json.dumps(seen, indent=2) if args.json else show(seen))
    return 0


def cmd_bench(args) -> int:
    from lab.bench import bench

    methods = ("lora", "full") if args.method == "both" else (args.method,)
    report = bench(args.shape, args.hw, args.steps, methods, profile=args.profile)
    print(f"bench: {report['shape']} on {report['backend']}, matmul peak {report['matmul_peak_tflops']} TFLOP/s "
          f"({report['peak_dtype']})")
    print(f"  {'method':6} {'arm':13} {'steady tok/s':>12} {'MFU':>7} {'peak GiB':>8} {'final loss':>10} "
          f"{'x defaults':>10} {'x tuned':>8}")
    for r in report["results"]:
        print(f"  {r['method']:6} {r['arm']:13} {r['steady_tokens_per_s'] or '-':>12} {r['mfu'] or '-':>7} "
              f"{r['peak_memory_gib']:>8} {r['final_loss'] if r['final_loss'] is not None else '-':>10} "
              f"{r.get('x_trl_defaults', ''):>10} {r.get('x_trl_tuned', ''):>8}")
    for r in report["results"]:
        if "profile" in r:
            p = r["profile"]
            top = ", ".join(f"{t['op']} {t['share']:.0%}" for t in p["top"][:5])
            print(f"  profile {r['method']} {r['arm']}: {p['ms_per_step']} ms/step ({p['by']}); {top}")
    print(f"bench: {report['file']}")
    return 0


def cmd_images(args) -> int:
    """Build the training, serving and Ray worker images of one hardware from compose.yaml."""
    from lab import containers
    from lab.device.hardware import resolve_backend
    from lab.runs import RUNS_DIR

    hw = resolve_backend(args.hw)
    containers.prepare_context(args.wheels, args.ca_bundle)
    env = {}
    if hw == "rocm":  # torch's device wheels for this host's GPU (or GPU_ARCH)
        from lab.device.hardware import gpu_arch

        arch, why = gpu_arch()
        env["GPU_ARCH"] = arch
        print(f"images: GPU_ARCH={arch} ({why})", flush=True)
    roles = ("train", "serve", "ray") if args.role == "all" else (args.role,)
    for role in roles:
        svc = containers.service(f"{role}-{hw}", env)
        if role == "ray":  # docker/ray.Dockerfile extends the training image
            train = containers.service(f"train-{hw}", env)
            containers.ensure_image(train, RUNS_DIR / ".images" / f"{train['name']}.log")
        containers.build(svc, RUNS_DIR / ".images" / f"{svc['name']}.log", nocache=args.no_cache)
    return 0


def cmd_node(args) -> int:
    """A Ray cluster node in the lab-ray image of this host's hardware (host networking, the lab's
    mounts): the head, or a worker joining HEAD; STOP=1 removes this checkout's nodes."""
    import socket

    from lab import containers
    from lab.device.hardware import resolve_backend
    from lab.runtime import Docker

    backend = resolve_backend(args.hw)
    port = _port(args) or 6379
    try:
        extra = shlex.split(args.ray_args or "")
    except ValueError as e:
        raise LabError(f"RAY_ARGS={args.ray_args!r}: {e}") from None
    if args.head and not args.stop:  # the node shares this host's network: a head silent here is silent there
        host, _, head_port = args.head.rpartition(":")
        if not host or not head_port.isdigit():
            raise LabError(f"HEAD={args.head!r}: give the head's address as host:port (port 6379 unless PORT= "
                           "moved it)")
        try:
            socket.create_connection((host.strip("[]"), int(head_port)), timeout=10).close()
        except OSError as e:
            raise LabError(f"HEAD={args.head}: no Ray head answers there ({e.strerror or e}); start it first "
                           "(`make ray-node` on that machine)") from None
    rt = Docker(backend, [])
    if args.stop:
        nodes = containers.lab_containers(**{containers.NODE_LABEL: "ray"})
        for node in nodes:
            containers.remove(node, timeout=30)
        print(f"node: {len(nodes)} Ray node container(s) removed")
        return 0
    container, image, log, role = rt.ray_node(args.head, port, extra)
    print(f"node: Ray {role} in {image} (container {container.short_id}); log: {log}")
    if not args.head:
        print(f"node: other nodes join with `make ray-node HEAD=<this host>:{port}`; train with `make train "
              "RUNTIME=docker CLUSTER=ray://<this host>:10001`")
    return 0


def cmd_dashboard(args) -> int:
    from lab import runs
    from lab.tracking import dashboard

    return dashboard(runs.RUNS_DIR, _port(args) or 7860)


def cmd_runs(args) -> int:
    from lab import runs
    from lab.browser import write_index

    out = write_index(runs.RUNS_DIR)
    if out is None:
        raise LabError(f"no runs yet in {runs.RUNS_DIR}: `make train` or `make e2e` makes one")
    print(f"runs: {out.resolve().as_uri()}")
    return 0


def cmd_report(args) -> int:
    from lab.report import write_report
    from lab.runs import find_run

    run = find_run(args.run)
    report = write_report(run, (json.loads((run / "report.json").read_text()).get("verdict")
                                if (run / "report.json").is_file() else None))
    print(f"report: {run / 'report.md'} (pass: {report['pass']})")
    return 0


def cmd_compare(args) -> int:
    from lab.compare import compare

    if not (args.a and args.b):
        raise LabError("compare needs two runs: make compare A=runs/<id> B=runs/<id>")
    return _print_compare(compare(args.a, args.b))


def cmd_reproduce(args) -> int:
    from lab.reproduce import reproduce

    return _print_compare(reproduce(args.run, args.runtime))


def cmd_lock(args) -> int:
    from lab.pins import LOCKS, lock

    stale = lock(args.names or None, check=args.check)
    if args.check:
        if stale:
            print(f"lock: out of date with requirements/: {', '.join(stale)}; run `make lock`", file=sys.stderr)
            return 1
        print("lock: every lock matches its pins")
    else:
        print(f"lock: {len(stale)} rewritten ({', '.join(stale) or 'none changed'}) in {LOCKS}")
    return 0


def _print_compare(r: dict) -> int:
    print(f"compare: {r['a']} vs {r['b']} ({r['host'].replace('_', ' ')} tolerances)")
    for d in r["recipe_differences"]:
        print(f"  recipe {d['key']}: {d['a']!r} -> {d['b']!r}")
    for d in r["environment_differences"]:
        print(f"  env {d['key']}: {d['a']!r} -> {d['b']!r}")
    print(f"  data identical: {r['data_identical']}; loss steps compared: {r['loss']['steps_compared']}")
    for c in r["checks"]:
        print(f"  {'PASS' if c['pass'] else 'FAIL'}  {c['check']}: {c['value']} (needs {c['op']} {c['threshold']})")
    print(f"compare: {'PASS' if r['pass'] else 'FAIL'}; {', '.join(r['files'])}")
    return 0 if r["pass"] else 1


HW_HELP = "auto|" + "|".join(BACKENDS)


def _flag(*names, **kw):
    """One argparse argument, declared as data: (names, keyword arguments). `env=(NAME, default)`
    and `env_flag=NAME` read the make variable LAB_ARG_NAME when the parser is built."""
    return names, kw


def _argument(kw: dict) -> dict:
    kw = dict(kw)
    if "env" in kw:
        value = arg_env(*kw.pop("env"))
        kw["default"] = value.split() if kw.pop("split", False) else value
    if "env_flag" in kw:
        kw["default"] = arg_flag(kw.pop("env_flag"))
    return kw


# Flags several commands share, declared once; each command below names the groups it takes.
FLAG_GROUPS = {
    "recipe": [
        _flag("--recipe", env=("RECIPE",), help=f"recipe name under recipes/ or a path (default: {DEFAULT_RECIPE})"),
        _flag("--hw", env=("HW", "auto"), help=HW_HELP),
        _flag("--set", env=("SET", ""), help='overrides, e.g. "identity.name=Orion identity.author=\'Zhou Lab\'"'),
    ],
    "hw": [_flag("--hw", env=("HW", "auto"), help=HW_HELP)],
    "run": [_flag("--run", env=("RUN",), help="run directory or name (default: runs/latest; train: a new run)")],
    "runtime": [_flag("--runtime", env=("RUNTIME",),
                      help="local|docker|auto (default: $LAB_RUNTIME, else auto: docker when an engine answers)")],
    "port": [_flag("--port", env=("PORT",), help="server port (default: the recipe's serve.port)")],
    "endpoint": [_flag("--base-url", env=("BASE_URL",), help="any OpenAI-compatible server (default: the lab's)")],
}

# name: (function, help, shared flag groups, the command's own flags)
COMMANDS = {
    "fixture": (cmd_fixture, "build (or find) the embedded tiny chat model", (), [
        _flag("--force", action="store_true", help="rebuild even if cached")]),
    "train": (cmd_train, "fine-tune with TRL SFTTrainer into runs/<run-id>/", ("recipe", "run", "runtime"), [
        _flag("--gpus", type=int, env=("GPUS", 1),
              help="processes, one per device, through accelerate launch (CPU: gloo)"),
        _flag("--dist", env=("DIST", "ddp"),
              help="ddp|fsdp2|zero3 (recipes/accelerate/) or an accelerate config file"),
        _flag("--resume", action="store_true", env_flag="RESUME", help="continue the run from its last checkpoint"),
        _flag("--nodes", type=int, env=("NODES",), help="machines in all, each running this command with GPUS= "
              "processes (default: 1, or the accelerate config's num_machines)"),
        _flag("--node-rank", type=int, env=("NODE_RANK",), help="this machine's rank, 0 to NODES-1 (0 writes the run)"),
        _flag("--main", env=("MAIN",), help="host:port of node 0 for the rendezvous, the same on every node"),
        _flag("--cluster", env=("CLUSTER",), help="a Ray cluster (ray://head:10001, or head:6379 from one of its "
              "nodes; default RAY_ADDRESS): GPUS x NODES Ray Train workers there")]),
    "job": (cmd_job, "write a Slurm batch script or a Kubeflow TrainJob that trains the recipe on NODES machines of "
            "GPUS each", ("recipe",), [
        _flag("--target", env=("TARGET", "slurm"), help="the scheduler: slurm (an sbatch script) or k8s (a TrainJob)"),
        _flag("--image", env=("IMAGE",), help="k8s: the training image the pods run (default: lab-train:<hw>)"),
        _flag("--nodes", type=int, env=("NODES", 2), help="machines"),
        _flag("--gpus", type=int, env=("GPUS", 1), help="GPUs (processes) per machine"),
        _flag("--out", default=None, help="where to write it (default: runs/jobs/<recipe>-<target>.sbatch|yaml)")]),
    "merge": (cmd_merge, "merge the adapter into a complete checkpoint (runs/<id>/merged)", ("run", "runtime"), []),
    "serve": (cmd_serve, "serve a model with vLLM in the background and wait for /health",
              ("recipe", "run", "runtime", "port"), [
        _flag("--adapter", action="store_true", env_flag="ADAPTER",
              help="serve the run's base + LoRA adapter with vLLM's runtime LoRA (no merge)"),
        _flag("--adapters", nargs="*", env=("ADAPTERS", ""), split=True,
              help="several LoRA runs over their one base, each adapter under its run's name"),
        _flag("--gpus", type=int, env=("GPUS",), help="GPUs one model is split over (vLLM --tensor-parallel-size)"),
        _flag("--cluster", env=("CLUSTER",), help="a Ray cluster whose nodes vLLM spreads the model over (default "
              "RAY_ADDRESS); run this on one of its nodes"),
        _flag("--nodes", type=int, env=("NODES",), help="machines of the Ray cluster, a pipeline stage each "
              "(vLLM --pipeline-parallel-size)"),
        _flag("--model", env=("MODEL",), help="model dir, hub id, or 'base' (default: the run's merged model)")]),
    "stop": (cmd_stop, "stop the server `serve` started", ("port",), []),
    "adapter": (cmd_adapter, "load a further LoRA run into the running server of adapters (serve.adapter_loading)",
                ("recipe", "run", "runtime", "port"), []),
    "key": (cmd_key, "print the API key the lab generated for its server (PORT=: that one's)", ("port",), []),
    "ask": (cmd_ask, "ask the served model one question", ("recipe", "port", "endpoint"), [
        _flag("question", nargs="?", env=("Q", "Who are you?"))]),
    "probe": (cmd_probe, "identity and control questions against a server", ("recipe", "runtime", "port", "endpoint"), [
        _flag("--out", default=None, help="also write the full result as JSON here")]),
    "load": (cmd_load, "a bounded burst of concurrent chat requests (streamed and not): errors, p50/p99 latency, "
                       "tokens/s", ("recipe", "port", "endpoint"), [
        _flag("--concurrency", type=int, env=("CONCURRENCY", 32), help="requests in flight"),
        _flag("--requests", type=int, env=("REQUESTS", 256), help="requests in all"),
        _flag("--time-limit", type=float, env=("TIME_LIMIT", 300), help="seconds at most")]),
    "e2e": (cmd_e2e, "the whole loop: probe base, train, merge, serve, probe again, report",
            ("recipe", "runtime", "port"), []),
    "resolve": (cmd_resolve, "print the local directory of the recipe's base model (fetching it if needed)",
                ("recipe",), [
        _flag("--out", default=None, help="also write {\"model\": DIR} as JSON here"),
        _flag("--model", default=None,
              help="embedded, a model directory or a hub id (default: the recipe's model.path)"),
        _flag("--revision", default=None, help="hub revision: branch, tag or commit"),
        _flag("--allow-pickle", action="store_true", help="accept *.bin/*.pt weights (model.allow_pickle)")]),
    "doctor": (cmd_doctor, "what the lab sees: backend, devices, attention and kernels, the defaults HW= picks",
               ("hw",), [
        _flag("--json", action="store_true", help="print it as JSON")]),
    "bench": (cmd_bench, "TRL's defaults, hand-tuned TRL and the lab's speed plan on a config-only model: "
                         "tok/s, MFU, memory, loss", ("hw",), [
        _flag("--shape", env=("SHAPE", "embedded"), help="embedded|qwen3-0.6b (random weights of that shape)"),
        _flag("--steps", type=int, env=("STEPS", 40), help="optimizer steps per arm"),
        _flag("--method", default="both", choices=("both", "lora", "full")),
        _flag("--profile", action="store_true", env_flag="PROFILE",
              help="torch.profiler over 3 steady steps of each arm: the top operators by self time, in the JSON")]),
    "images": (cmd_images, "build the training, serving and Ray images of one hardware (compose.yaml)", ("hw",), [
        _flag("--role", default="all", choices=("all", "train", "serve", "ray")),
        _flag("--no-cache", action="store_true", help="rebuild every layer"),
        _flag("--wheels", env=("WHEELS",), help="a directory of wheels pip may use in the build (offline hosts)"),
        _flag("--ca-bundle", env=("CA_BUNDLE",), help="extra CA certificates (PEM) for TLS-intercepting proxies")]),
    "node": (cmd_node, "a Ray cluster node in the lab-ray image: the head, or a worker of HEAD (host network; "
                       "STOP=1 removes them)", ("hw", "port"), [
        _flag("--head", env=("HEAD",), help="the head's address (host:6379) to join; absent: start the head"),
        _flag("--ray-args", env=("RAY_ARGS",), help='more `ray start` flags, e.g. "--num-gpus 8"'),
        _flag("--stop", action="store_true", env_flag="STOP", help="remove this checkout's Ray node containers")]),
    "report": (cmd_report, "rewrite a run's report from its artifacts", ("run",), []),
    "dashboard": (cmd_dashboard, "trackio's dashboard of every run that reports to trackio, on 127.0.0.1 (PORT=, "
                                 "default 7860)", ("port",), []),
    "runs": (cmd_runs, "rebuild runs/index.html, every run on one page (also rebuilt after each run command)", (), []),
    "reproduce": (cmd_reproduce, "rerun a run from its manifest (inputs checked first), then compare", ("runtime",), [
        _flag("run", nargs="?", env=("RUN", "latest"), help="run directory, name, or its manifest.json")]),
    "lock": (cmd_lock, "resolve requirements/lock/<env>.txt from the pins (requirements/locks.yaml) with uv", (), [
        _flag("names", nargs="*", env=("LOCK", ""), split=True,
              help="which locks (default: every one in requirements/locks.yaml)"),
        _flag("--check", action="store_true", help="write nothing; exit 1 if a lock is out of date")]),
    "compare": (cmd_compare, "two runs side by side from their manifests; fails past the recipe's tolerances", (), [
        _flag("a", nargs="?", env=("A",),
              help="run directory, name, or manifest.json (its recipe sets the tolerances)"),
        _flag("b", nargs="?", env=("B",), help="the run to compare with it")]),
}


def make_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="lab", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name, (func, help_text, groups, own) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(func=func)
        for names, kw in [flag for group in groups for flag in FLAG_GROUPS[group]] + own:
            p.add_argument(*names, **_argument(kw))
    return parser


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block
        print(f"{self.prog}: error: {message} (see `{self.prog} --help`)", file=sys.stderr)
        raise SystemExit(2)


def _interrupt(signum, frame):
    """SIGTERM (CI cancel, `timeout`) and SIGHUP (a closed ssh session) unwind like Ctrl-C, so every
    `finally` runs: servers and containers this call started are stopped, half-written files removed."""
    raise KeyboardInterrupt(signal.Signals(signum).name)


# Commands that make, change or judge runs: runs/index.html is rebuilt after each, done or failed.
RUN_COMMANDS = {"train", "merge", "serve", "probe", "e2e", "report", "reproduce", "compare", "bench"}


def _rebuild_browser(command: str) -> None:
    """runs/index.html (lab/browser.py) from rank 0 only; a page that cannot be written never
    turns a command's result into a failure."""
    if command not in RUN_COMMANDS or os.environ.get("RANK", "0") != "0":
        return
    from lab import runs
    from lab.browser import write_index

    try:
        write_index(runs.RUNS_DIR)
    except OSError as e:  # a read-only runs/ (a probe-only host), a full disk
        print(f"lab: runs/index.html not rebuilt ({e})", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) is not signal.SIG_IGN:  # `nohup make train &` asked to ignore SIGHUP
            signal.signal(sig, _interrupt)
    try:
        try:
            return args.func(args)
        finally:
            _rebuild_browser(args.command)
    except KeyboardInterrupt as e:
        log = f"; log: {e.lab_log}" if getattr(e, "lab_log", None) else ""  # a failed run's, kept in runs/.failed
        print(f"lab {args.command}: interrupted{f' ({e.args[0]})' if e.args else ''}{log}", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `lab doctor --json | head`: the reader left; not an error of ours
        sys.stderr.close()
        return 0
    except Exception as e:  # noqa: BLE001 -- the one place every error becomes one line
        if debug():
            traceback.print_exc()
        line, status = explain(e)
        print(f"lab {args.command}: error: {line}", file=sys.stderr)
        return status
