"""Job specs (lab/jobs.py): `make job TARGET=slurm` writes an sbatch script that parses (bash -n)
and passes shellcheck; its per-node command is run for real, as Slurm's srun would run it on two
nodes (Slurm's own per-task variables, two processes rendezvousing on loopback over gloo).
`make job TARGET=k8s` writes a Kubeflow TrainJob checked against the models Kubeflow generates
from its CRD (kubeflow-trainer-api): a wrong type or a field the CRD lacks is refused."""

import os
import shutil
import subprocess

import pytest
from conftest import ROOT, TINY, free_port, run_lab

from lab.errors import LabError


def _job(runs_dir, *extra):
    r = run_lab("job", "--hw", "cpu", "--set", f"{TINY} train.num_train_epochs=2", "--nodes", "2", "--gpus", "1",
                *extra)
    assert r.returncode == 0, r.stderr[-2000:]
    return runs_dir / "jobs" / "identity-lora-slurm.sbatch", r.stdout


def test_a_slurm_job_of_the_recipe_parses_and_passes_shellcheck(runs_dir):
    script, out = _job(runs_dir)
    text = script.read_text()
    assert f"submit it: sbatch {script}" in out and os.access(script, os.X_OK)
    assert [line for line in text.splitlines() if line.startswith("#SBATCH")] == [
        "#SBATCH --job-name=lab-identity-lora", "#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1",
        "#SBATCH --gpus-per-node=1", f"#SBATCH --output={runs_dir}/slurm-%j.log"]
    assert f"cd {ROOT}" in text and f"srun --ntasks-per-node=1 bash {script} node" in text
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    if shutil.which("shellcheck") is None:
        if os.environ.get("CI"):
            pytest.fail("shellcheck is missing (.ci/run installs Debian's)")
        pytest.skip("shellcheck is not installed here")
    r = subprocess.run(["shellcheck", "-s", "bash", str(script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout


def test_a_kubeflow_trainjob_of_the_recipe_fits_the_crd(runs_dir):
    import yaml

    from lab.jobs import check_trainjob

    r = run_lab("job", "--target", "k8s", "--hw", "cuda", "--nodes", "2", "--gpus", "8", "--set", "identity.name=Orion",
                "--recipe", str(ROOT / "recipes" / "identity-lora.yaml"))
    assert r.returncode == 0, r.stderr[-2000:]
    path = runs_dir / "jobs" / "identity-lora-k8s.yaml"
    assert f"submit it: kubectl apply -f {path}" in r.stdout
    doc = yaml.safe_load(path.read_text())
    trainer = doc["spec"]["trainer"]
    assert doc["kind"] == "TrainJob" and doc["spec"]["runtimeRef"] == {"name": "torch-distributed"}
    assert trainer["numNodes"] == 2 and trainer["image"] == "lab-train:cuda"
    assert trainer["resourcesPerNode"] == {"limits": {"nvidia.com/gpu": "8"}}
    # the recipe as the pods see it (the lab-recipes volume), the rendezvous from the runtime's PET_*
    assert trainer["command"] == ["python", "-m", "lab", "train", "--hw", "cuda", "--recipe",
                                  "/opt/lab/app/recipes/identity-lora.yaml", "--set", "identity.name=Orion", "--gpus",
                                  "8", "--nodes", "$(PET_NNODES)", "--node-rank", "$(PET_NODE_RANK)", "--main",
                                  "$(PET_MASTER_ADDR):$(PET_MASTER_PORT)"]
    check_trainjob(doc)
    pod = doc["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0][
        "template"]["spec"]["template"]["spec"]
    assert [m["mountPath"] for m in pod["containers"][0]["volumeMounts"]] == ["/runs", "/cache", "/opt/lab/app/recipes"]
    # the check bites: a wrong type, a field the CRD does not have (kubeconform --strict)
    trainer["numNodes"] = "two"
    with pytest.raises(LabError, match=r"spec.trainer.numNodes: Input should be a valid integer"):
        check_trainjob(doc)
    trainer["numNodes"], trainer["numProcsPerNode"] = 2, 8
    with pytest.raises(LabError, match=r"spec.trainer.numProcsPerNode is not a TrainJob field"):
        check_trainjob(doc)
    del trainer["numProcsPerNode"]
    pod["containers"][0]["volumeMounts"][0]["mountpath"] = "/runs"
    with pytest.raises(LabError, match=r"\.volumeMounts\[0\]\.mountpath is not a TrainJob field"):
        check_trainjob(doc)


def test_only_slurm_or_k8s_and_real_numbers(runs_dir, tmp_path):
    r = run_lab("job", "--hw", "cpu", "--target", "sge")
    assert r.returncode == 2 and "TARGET='sge': the lab writes slurm or k8s jobs (TARGET=slurm|k8s)" in r.stderr
    r = run_lab("job", "--target", "k8s")  # HW=auto: this host's hardware says nothing about the pods'
    assert r.returncode == 2 and "TARGET=k8s HW=auto: name the pods' hardware, HW=cuda, rocm or cpu" in r.stderr
    outside = tmp_path / "mine.yaml"
    shutil.copy(ROOT / "recipes" / "identity-lora.yaml", outside)
    (tmp_path / "data").symlink_to(ROOT / "recipes" / "data")
    r = run_lab("job", "--target", "k8s", "--hw", "cpu", "--recipe", str(outside))
    assert r.returncode == 2 and "TARGET=k8s: the pods read recipes from the lab-recipes volume" in r.stderr, r.stderr
    r = run_lab("job", "--hw", "cpu", "--nodes", "0")
    assert r.returncode == 2 and "NODES=0 GPUS=1: give machines and GPUs per machine" in r.stderr
    assert not runs_dir.exists() or not (runs_dir / "jobs").exists()


@pytest.mark.slow
def test_the_jobs_node_command_trains_on_two_nodes(runs_dir):
    """What each srun task runs (`bash SCRIPT node`), with the variables Slurm gives a task on
    node 0 and node 1 of two; the rendezvous at node 0 (loopback here), node 0 writing the run."""
    script, _ = _job(runs_dir)
    main = f"127.0.0.1:{free_port()}"
    tasks = [subprocess.Popen(["bash", str(script), "node"], env={**os.environ, "SLURM_NNODES": "2",
                                                                  "SLURM_NODEID": str(node), "LAB_MAIN": main},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for node in (1, 0)]
    out = [t.communicate(timeout=900)[0] for t in tasks]
    assert [t.returncode for t in tasks] == [0, 0], out[0][-3000:] + out[1][-3000:]
    assert "node 1 of 2 done; node 0 wrote the run" in out[0] and f"rendezvous at {main}" in out[1]
    run = (runs_dir / "latest").resolve()
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    import json

    assert json.loads((run / "manifest.json").read_text())["distributed"]["nodes"] == 2
