"""The Ray Train driver of `lab train --cluster` (lab/device/cluster.py starts it with Ray's
environment: .venv/ray, or the lab-ray image's own): connect to the cluster, run a
`TorchTrainer` whose workers each run one rank's `lab train`, in the process group Ray sets up;
a worker group Ray starts again after a failure resumes from the run's last complete checkpoint.

    .venv/ray/bin/python -m lab.raytrain --address ray://head:10001 --workers N --run RUN -- TRAIN_ARGS
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from lab import ROOT
from lab.device.cluster import NO_CLUSTER, NO_LAB, NOT_PLACED

# what the workers inherit from the driver's environment (where the lab keeps things, and how it runs)
PASSED_ENV = ("LAB_", "HF_", "TRANSFORMERS_", "TRACKIO_", "OMP_NUM_THREADS", "PYTORCH_", "NCCL_", "HIP_", "CUDA_")


def _worker(config: dict) -> None:
    """One Ray Train worker: the `lab train` of one rank, in the process group Ray made."""
    import ray
    import torch.distributed as dist

    import lab.cli
    from lab.train import last_complete_checkpoint

    # Which machines the workers landed on: the manifest names the cluster and counts them.
    nodes: list = [None] * dist.get_world_size()
    dist.all_gather_object(nodes, ray.get_runtime_context().get_node_id())
    os.environ["LAB_TOPOLOGY"] = json.dumps({"nodes": len(set(nodes)), "engine": "ray", "cluster": config["address"],
                                             "workers": dist.get_world_size()})
    os.environ.pop("LAB_DIST", None)  # no accelerate config: Ray made the process group
    # A worker group Ray started again after a failure resumes from the run's last complete
    # checkpoint (shared storage); the first start begins as the user asked.
    dist.barrier()  # every rank looks before rank 0 can tidy a partial checkpoint
    argv = config["argv"]
    if "--resume" not in argv and last_complete_checkpoint(Path(config["run"]) / "checkpoints",
                                                           remove_partial=False) is not None:
        argv = [*argv, "--resume"]
    # cmd_train itself, not lab.cli.main: Ray runs this in a thread, where signal handlers cannot be set
    args = lab.cli.make_parser().parse_args(["train", *argv])
    args.func(args)


def main(argv: list[str]) -> int:
    """`python -m lab.raytrain` in .venv/ray: connect, train, report."""
    import argparse

    parser = argparse.ArgumentParser(prog="lab.raytrain")
    parser.add_argument("--address", required=True)
    parser.add_argument("--workers", type=int, required=True)
    parser.add_argument("--run", required=True)
    parser.add_argument("--use-gpu", action="store_true")
    parser.add_argument("--cpus-per-worker", type=float, default=1)
    parser.add_argument("--max-failures", type=int, default=2)
    parser.add_argument("--join-timeout", type=float, default=600)
    parser.add_argument("--storage", required=True)
    parser.add_argument("train_argv", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    train_argv = [a for a in args.train_argv if a != "--"]

    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    env = {k: v for k, v in os.environ.items() if k.startswith(PASSED_ENV) and not k.startswith("LAB_ARG_")}
    # every worker imports the lab from the checkout, at the same path on every node
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    # Ray Train routes print() through its logger, which also catches the disassembly dill prints
    # into a buffer it means to read (datasets' hashing): hundreds of lines per worker in train.log
    env["RAY_TRAIN_ENABLE_PRINT_PATCH"] = "0"
    # How long a worker group may wait for its workers' resources (nodes joining, an autoscaler),
    # once: Ray's controller otherwise retries the start forever (controller_failure_limit below).
    # It runs on the cluster, so it reads this from the job's environment, not from ours.
    env["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = str(args.join_timeout)
    try:
        ray.init(address=args.address, runtime_env={"env_vars": env}, log_to_driver=True,
                 logging_level="WARNING")
    except (ConnectionError, TimeoutError, RuntimeError) as e:
        print(f"lab.raytrain: {args.address}: {e}", file=sys.stderr)
        return NO_CLUSTER
    run = Path(args.run)
    trainer = TorchTrainer(
        _worker,
        train_loop_config={"argv": [*train_argv, "--run", str(run), "--runtime", "local", "--cluster", ""],
                           "run": str(run), "address": args.address},
        scaling_config=ScalingConfig(num_workers=args.workers, use_gpu=args.use_gpu,
                                     resources_per_worker={"CPU": args.cpus_per_worker,
                                                           **({"GPU": 1} if args.use_gpu else {})}),
        # Ray's own records of the run (its controller state), on storage every node shares
        run_config=RunConfig(name=run.name, storage_path=args.storage,
                             failure_config=FailureConfig(max_failures=args.max_failures,
                                                          controller_failure_limit=0)),
    )
    try:
        trainer.fit()
    except Exception as e:
        # _worker's first import: nodes started from another environment (or image) than the
        # driver's have no lab at ROOT (each failed start of the group says so; Ray retries first)
        said = f"{e} {e.__cause__}"
        if "No module named 'lab'" in said:
            print(f"lab.raytrain: the workers cannot import the lab from {ROOT}", file=sys.stderr)
            return NO_LAB
        if "worker group startup timed out" in said:
            alive = [n for n in ray.nodes() if n.get("Alive")]
            total = ray.cluster_resources()
            print(f"lab.raytrain: cluster has {len(alive)} node(s), {total.get('CPU', 0):g} CPU, "
                  f"{total.get('GPU', 0):g} GPU", flush=True)
            return NOT_PLACED
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
