"""Start a jaxrlhf job's JAX trainer processes on a Ray cluster: one per node, joined by jax.distributed.

The OpenRLHF-style workflow (scripts/ray_ppo_job.sh submits this as a Ray job)::

    ray job submit --address http://HEAD:8265 -- \\
        python scripts/ray_launch_trainers.py --num_trainers 4 --gpus_per_trainer 8 -- \\
        python -m jaxrlhf.ppo --mesh 8x4 ... --ray_address auto

A placement group reserves ``--num_trainers`` bundles of ``--gpus_per_trainer`` GPUs, one per node
(``STRICT_SPREAD``); an actor in each bundle runs the command after ``--`` as a subprocess, with Ray's
``CUDA_VISIBLE_DEVICES`` and ``JAXRLHF_COORDINATOR_ADDRESS`` (trainer 0's node, a free port there),
``JAXRLHF_NUM_PROCESSES`` and ``JAXRLHF_PROCESS_ID`` set: ``--dist_init auto`` (sharding/distributed.py) turns them
into ``jax.distributed.initialize``. Trainer 0 then joins the same Ray cluster (``--ray_address auto``) and places
the vLLM engines on the GPUs left over. The launcher waits for all trainers; when one fails, it stops the others and
exits with its code.

Verified: on a local Ray cluster (tests/test_scripts.py) it forms a real 2-process JAX group; a multi-node GPU
cluster has not run it yet (check there with a --dry_run command, then --max_steps 2).
"""
from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys


def trainer_env(coordinator: str, num_trainers: int, rank: int, extra: dict[str, str]) -> dict[str, str]:
    """The variables trainer ``rank`` gets on top of its actor's environment."""
    return {**extra, "JAXRLHF_COORDINATOR_ADDRESS": coordinator, "JAXRLHF_NUM_PROCESSES": str(num_trainers),
            "JAXRLHF_PROCESS_ID": str(rank)}


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    if "--" not in argv:
        raise SystemExit("usage: ray_launch_trainers.py [options] -- COMMAND ...  (the trainer command after --)")
    cut = argv.index("--")
    p = argparse.ArgumentParser(prog="ray_launch_trainers.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num_trainers", type=int, required=True, help="JAX processes (nodes) of the trainer")
    p.add_argument("--gpus_per_trainer", type=float, default=8, help="GPUs each trainer process takes (0: CPU)")
    p.add_argument("--cpus_per_trainer", type=float, default=8, help="CPUs reserved per trainer process")
    p.add_argument("--strategy", default="STRICT_SPREAD", choices=("STRICT_SPREAD", "SPREAD", "PACK", "STRICT_PACK"),
                   help="placement of the trainer bundles (STRICT_SPREAD: one per node)")
    p.add_argument("--ray_address", default="auto", help="Ray cluster to join (auto inside a Ray job; local: start "
                                                         "a one-machine cluster)")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="extra environment variable for every trainer (repeatable)")
    p.add_argument("--timeout_s", type=float, default=600, help="seconds to wait for the trainers' resources")
    args = p.parse_args(argv[:cut])
    command = argv[cut + 1:]
    if not command:
        p.error("no trainer command after --")
    if args.num_trainers < 1:
        p.error("--num_trainers must be >= 1")
    for kv in args.env:
        if "=" not in kv:
            p.error(f"--env {kv!r} is not KEY=VALUE")
    return args, command


class Trainer:
    """One trainer process's Ray actor (decorated with ray.remote in main)."""

    def address(self) -> tuple[str, int]:
        import ray

        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return ray.util.get_node_ip_address(), port

    def run(self, command: list[str], env: dict[str, str]) -> int:
        self.proc = subprocess.Popen(command, env={**os.environ, **env})
        return self.proc.wait()

    def stop(self) -> None:
        proc = getattr(self, "proc", None)
        if proc is not None and proc.poll() is None:
            proc.terminate()


def main(argv: list[str] | None = None) -> int:
    args, command = parse_args(sys.argv[1:] if argv is None else argv)
    import ray
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    ray.init(address=args.ray_address)
    bundle = {"CPU": args.cpus_per_trainer, **({"GPU": args.gpus_per_trainer} if args.gpus_per_trainer else {})}
    pg = placement_group([dict(bundle) for _ in range(args.num_trainers)], strategy=args.strategy)
    ready, _ = ray.wait([pg.ready()], timeout=args.timeout_s)
    if not ready:
        print(f"error: the Ray cluster cannot give {args.num_trainers} x {bundle} ({args.strategy}); it has "
              f"{ray.cluster_resources()}", file=sys.stderr)
        return 2
    actor = ray.remote(Trainer)
    trainers = [actor.options(num_cpus=args.cpus_per_trainer, num_gpus=args.gpus_per_trainer,
                              scheduling_strategy=PlacementGroupSchedulingStrategy(pg, i), max_concurrency=2).remote()
                for i in range(args.num_trainers)]
    host, port = ray.get(trainers[0].address.remote())
    extra = dict(kv.split("=", 1) for kv in args.env)
    runs = {t.run.remote(command, trainer_env(f"{host}:{port}", args.num_trainers, i, extra)): i
            for i, t in enumerate(trainers)}
    print(f"[launch] {args.num_trainers} trainers, coordinator {host}:{port}: {' '.join(command)}", flush=True)
    status, pending = 0, list(runs)
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        code = ray.get(done[0])
        if code and not status:
            status = code
            print(f"[launch] trainer {runs[done[0]]} exited with {code}: stopping the others", file=sys.stderr)
            ray.get([t.stop.remote() for t in trainers])
    return status


if __name__ == "__main__":
    sys.exit(main())
