"""Job specs: a recipe's training as a batch job of the scheduler a cluster has.

Slurm: an sbatch script that runs the same `lab train` once per node (srun, one task each) with
NODES, NODE_RANK and MAIN from Slurm's own variables: the first node of the allocation is the
rendezvous (accelerate, NCCL between nodes) and writes the run. It runs in the lab's checkout, at
the same path on every node (shared storage), with the environments `make setup` made there. The
lab submits nothing: the script is written, checked with `bash -n`, and named.
"""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

from lab.errors import LabError
from lab.recipe import Recipe
from lab.runs import write_text_atomic

MAIN_PORT = 29500  # torchrun's default; LAB_MAIN_PORT= at submission picks another


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


def write_job(target: str, recipe: Recipe, recipe_ref: str, sets: str, hw: str, nodes: int, gpus: int,
              out: Path, root: Path, runs_dir: Path) -> Path:
    if target != "slurm":
        raise LabError(f"TARGET={target!r}: the lab writes Slurm jobs (TARGET=slurm)")
    if nodes < 1 or gpus < 1:
        raise LabError(f"NODES={nodes} GPUS={gpus}: give machines and GPUs per machine, 1 or more")
    out = out.expanduser().resolve()
    text = slurm_script(recipe, recipe_ref, sets, hw, nodes, gpus, root.resolve(), runs_dir.resolve(), out)
    checked = subprocess.run(["bash", "-n"], input=text, capture_output=True, text=True)
    if checked.returncode != 0:  # a bug of ours: never a script that does not parse
        raise LabError(f"the Slurm script for {recipe.name} does not parse: {checked.stderr.strip()}")
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, text)
    out.chmod(0o755)
    return out
