"""Job specs: a recipe's training as a batch job of the scheduler a cluster has.

Slurm: an sbatch script that runs the same `lab train` once per node (srun, one task each) with
NODES, NODE_RANK and MAIN from Slurm's own variables: the first node of the allocation is the
rendezvous (accelerate, NCCL between nodes) and writes the run. It runs in the lab's checkout, at
the same path on every node (shared storage), with the environments `make setup` made there. The
lab submits nothing: the script is written, checked with `bash -n`, and named.

Kubernetes: a Kubeflow Trainer `TrainJob` (trainer.kubeflow.org/v1alpha1) on the cluster's
`torch-distributed` runtime: numNodes pods of the lab's training image, each running the same
`lab train` with NODES, NODE_RANK and MAIN from the runtime's PET_* variables (Kubernetes expands
$(VAR) in a container's command), GPUs per pod as the hardware's resource name. The pods mount
three volumes the user provides (PersistentVolumeClaims lab-runs, lab-cache, lab-recipes) where
the lab's containers mount runs/, the cache and recipes/. It is checked against the TrainJob
models Kubeflow generates from its CRD (kubeflow-trainer-api): types, and no field the CRD lacks.
"""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

from lab.errors import LabError
from lab.recipe import Recipe
from lab.runs import write_text_atomic

MAIN_PORT = 29500  # torchrun's default; LAB_MAIN_PORT= at submission picks another
TARGETS = ("slurm", "k8s")
SUFFIX = {"slurm": "sbatch", "k8s": "yaml"}
# Hardware differences as data: the pod resource a GPU is (Kubernetes device plugins' names).
GPU_RESOURCE = {"cuda": "nvidia.com/gpu", "rocm": "amd.com/gpu"}
# The claims a TrainJob's pods mount, where compose.yaml mounts the same directories.
K8S_VOLUMES = {"lab-runs": "/runs", "lab-cache": "/cache", "lab-recipes": "/opt/lab/app/recipes"}
IN_IMAGE_RECIPES = K8S_VOLUMES["lab-recipes"]


def slurm_script(recipe: Recipe, recipe_ref: str, sets: str, hw: str, nodes: int, gpus: int, root: Path,
                 runs_dir: Path, path: Path) -> str:
    """The sbatch script, at `path` (each task runs it again, from the checkout `root`)."""
    train = ["python", "-m", "lab", "train", "--hw", hw, "--recipe", recipe_ref, *(["--set", sets] if sets else []),
             "--gpus", str(gpus)]
    return f"""#!/bin/bash
# `lab train` of recipe {recipe.name} (sha256 {recipe.sha256()[:12]}) on {nodes} nodes x {gpus} GPUs,
# written by `make job TARGET=slurm`. The checkout {root} must be at that path on every
# node (shared storage), set up there with `make setup`. Submit:  sbatch {path}
# One task per node runs the same `lab train`; they rendezvous at the allocation's first node
# (accelerate; NCCL between nodes), whose rank 0 writes the run into {runs_dir}.
#SBATCH --job-name=lab-{recipe.name}
#SBATCH --nodes={nodes}
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node={gpus}
#SBATCH --output={runs_dir}/slurm-%j.log
set -euo pipefail
cd {shlex.quote(str(root))}
if [ "${{1:-}}" = node ]; then  # one task on one node (srun below)
  exec .venv/train/bin/{shlex.join(train)} \\
    --nodes "$SLURM_NNODES" --node-rank "$SLURM_NODEID" --main "$LAB_MAIN"
fi
LAB_MAIN="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1):${{LAB_MAIN_PORT:-{MAIN_PORT}}}"
export LAB_MAIN
srun --ntasks-per-node=1 bash {shlex.quote(str(path))} node
"""


def trainjob(recipe: Recipe, recipe_ref: str, sets: str, hw: str, nodes: int, gpus: int, image: str) -> dict:
    """The TrainJob: `lab train` on every pod, the rendezvous from the torch runtime's PET_* variables."""
    train = ["python", "-m", "lab", "train", "--hw", hw, "--recipe", recipe_ref, *(["--set", sets] if sets else []),
             "--gpus", str(gpus), "--nodes", "$(PET_NNODES)", "--node-rank", "$(PET_NODE_RANK)",
             "--main", "$(PET_MASTER_ADDR):$(PET_MASTER_PORT)"]
    trainer = {"image": image, "numNodes": nodes, "command": train,
               "env": [{"name": "LAB_RUNTIME", "value": "local"}]}
    if hw in GPU_RESOURCE:
        trainer["resourcesPerNode"] = {"limits": {GPU_RESOURCE[hw]: str(gpus)}}
    pod = {"volumes": [{"name": claim, "persistentVolumeClaim": {"claimName": claim}} for claim in K8S_VOLUMES],
           # the torch-distributed runtime's trainer: replicated job and container "node"
           "containers": [{"name": "node", "volumeMounts": [
               {"name": claim, "mountPath": path, **({"readOnly": True} if claim == "lab-recipes" else {})}
               for claim, path in K8S_VOLUMES.items()]}]}
    return {
        "apiVersion": "trainer.kubeflow.org/v1alpha1", "kind": "TrainJob",
        "metadata": {"name": f"lab-{recipe.name}".lower().replace("_", "-")[:63],
                     "labels": {"app.kubernetes.io/name": "lab", "lab/recipe-sha256": recipe.sha256()[:12]}},
        "spec": {"runtimeRef": {"name": "torch-distributed"}, "trainer": trainer,
                 "runtimePatches": [{"manager": "lab", "trainingRuntimeSpec": {"template": {"spec": {
                     "replicatedJobs": [{"name": "node", "template": {"spec": {"template": {"spec": pod}}}}]}}}}]},
    }


def check_trainjob(doc: dict) -> None:
    """Against the TrainJob models generated from the Kubeflow Trainer CRD: a wrong type fails
    pydantic's validation; a field the CRD lacks is dropped by the models, so a document that
    does not come back whole names it (kubeconform's --strict)."""
    import pydantic
    from kubeflow_trainer_api.models.trainer_v1alpha1_train_job import TrainerV1alpha1TrainJob

    try:
        back = TrainerV1alpha1TrainJob.from_dict(doc).to_dict()
    except pydantic.ValidationError as e:
        err = e.errors()[0]  # its place within the nested model that failed: named from the top
        where = next(_paths(doc, tuple(map(str, err["loc"]))), ".".join(map(str, err["loc"])))
        raise LabError(f"the TrainJob does not fit Kubeflow's schema: {where}: {err['msg']}") from None
    if (extra := _first_difference(doc, back)) is not None:
        raise LabError(f"the TrainJob does not fit Kubeflow's schema: {extra} is not a TrainJob field")


def _paths(doc, tail: tuple[str, ...], path: tuple[str, ...] = ()):
    """Every full path in `doc` that ends in `tail`, as a.b[0].c."""
    if path[-len(tail):] == tail:
        yield ".".join(path).replace(".[", "[")
    items = doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else ()
    for key, value in items:
        yield from _paths(value, tail, (*path, f"[{key}]" if isinstance(doc, list) else str(key)))


def _first_difference(a, b, path: str = "") -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in a:
            where = f"{path}.{key}" if path else key
            if key not in b:
                return where
            if (d := _first_difference(a[key], b[key], where)) is not None:
                return d
        return None
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        pairs = enumerate(zip(a, b, strict=True))
        return next((d for i, (x, y) in pairs if (d := _first_difference(x, y, f"{path}[{i}]")) is not None), None)
    return None if a == b else path


def default_image(hw: str) -> str:
    """The lab's training image for HW (push it to a registry the cluster pulls from: IMAGE=)."""
    return "lab-train:rocm-gfx942" if hw == "rocm" else f"lab-train:{hw}"


def write_job(target: str, recipe: Recipe, recipe_ref: str, sets: str, hw: str, nodes: int, gpus: int,
              out: Path, root: Path, runs_dir: Path, image: str | None = None) -> Path:
    if target not in TARGETS:
        raise LabError(f"TARGET={target!r}: the lab writes {' or '.join(TARGETS)} jobs (TARGET=slurm|k8s)")
    if nodes < 1 or gpus < 1:
        raise LabError(f"NODES={nodes} GPUS={gpus}: give machines and GPUs per machine, 1 or more")
    out = out.expanduser().resolve()
    if target == "k8s":
        if hw not in ("cpu", *GPU_RESOURCE):
            raise LabError(f"TARGET=k8s HW={hw}: name the pods' hardware, HW=cuda, rocm or cpu (it picks the image "
                           "and the GPU resource)")
        recipes = (root / "recipes").resolve()
        path = Path(recipe_ref) if Path(recipe_ref).is_absolute() else None
        if path is not None and not path.is_relative_to(recipes):
            raise LabError(f"TARGET=k8s: the pods read recipes from the lab-recipes volume, a copy of {recipes}; "
                           f"put {recipe_ref} (and its data) under recipes/ and give RECIPE= its path there")
        ref = f"{IN_IMAGE_RECIPES}/{path.relative_to(recipes)}" if path is not None else recipe_ref
        doc = trainjob(recipe, ref, sets, hw, nodes, gpus, image or default_image(hw))
        check_trainjob(doc)
        import yaml

        each = "GPUs" if hw in GPU_RESOURCE else "processes"
        text = (f"# `lab train` of recipe {recipe.name} on {nodes} pods x {gpus} {each}, written by `make job "
                "TARGET=k8s`.\n# Needs Kubeflow Trainer (its torch-distributed runtime), the image pushed where the "
                f"cluster pulls,\n# and PersistentVolumeClaims {', '.join(K8S_VOLUMES)} (recipes/ copied onto "
                f"lab-recipes). Submit:  kubectl apply -f {out}\n"
                + yaml.safe_dump(doc, sort_keys=False, allow_unicode=True, width=1000))
    else:
        text = slurm_script(recipe, recipe_ref, sets, hw, nodes, gpus, root.resolve(), runs_dir.resolve(), out)
        checked = subprocess.run(["bash", "-n"], input=text, capture_output=True, text=True)
        if checked.returncode != 0:  # a bug of ours: never a script that does not parse
            raise LabError(f"the Slurm script for {recipe.name} does not parse: {checked.stderr.strip()}")
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, text)
    out.chmod(0o755 if target == "slurm" else 0o644)
    return out
