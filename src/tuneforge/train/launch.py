"""`tuneforge train CONFIG --nproc-per-node N`: start N training processes through torchrun.

The command re-launches itself through `torch.distributed.run` (torchrun's own entry point),
one worker per GPU, each running `tuneforge train CONFIG` without the launch flags. torchrun
sets RANK / LOCAL_RANK / WORLD_SIZE, and when one worker fails it stops the others, so an
error on any rank ends the launch with that rank's message instead of a hang.

On several nodes every node runs the same command once. Where the flags leave them out, the
node count, this node's rank and the rendezvous host come from the scheduler:

    SLURM   SLURM_NNODES, SLURM_NODEID, first host of SLURM_JOB_NODELIST   (srun --ntasks-per-node=1)
    PBS     mpirun -npernode 1: OMPI_COMM_WORLD_SIZE / _RANK; else the hosts of $PBS_NODEFILE
    any     MASTER_ADDR and MASTER_PORT when set
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from tuneforge.errors import ConfigError

DEFAULT_MASTER_PORT = 29500


@dataclass(frozen=True)
class Rendezvous:
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str | None = None
    master_port: int = DEFAULT_MASTER_PORT
    source: str = "command line"


def expand_nodelist(nodelist: str) -> list[str]:
    """SLURM's compressed host list: `gpu[01-03,07],login1` -> gpu01 gpu02 gpu03 gpu07 login1."""
    hosts: list[str] = []
    for prefix, ranges, plain in re.findall(r"([^,\[]+)\[([^\]]+)\]|([^,\[\]]+)", nodelist):
        if plain:
            hosts.append(plain)
            continue
        for part in ranges.split(","):
            first, _, last = part.partition("-")
            for number in range(int(first), int(last or first) + 1):
                hosts.append(f"{prefix}{number:0{len(first)}d}")
    return hosts


def _short(host: str) -> str:
    return host.split(".")[0]


def scheduler_rendezvous(env: Mapping[str, str]) -> Rendezvous | None:
    """Node count, this node's rank and the first node's address from a scheduler's environment."""
    port = int(env.get("MASTER_PORT", DEFAULT_MASTER_PORT))
    if "SLURM_NODEID" in env and ("SLURM_NNODES" in env or "SLURM_JOB_NUM_NODES" in env):
        hosts = expand_nodelist(env.get("SLURM_JOB_NODELIST", env.get("SLURM_NODELIST", "")))
        return Rendezvous(
            nnodes=int(env.get("SLURM_NNODES", env.get("SLURM_JOB_NUM_NODES", "1"))),
            node_rank=int(env["SLURM_NODEID"]),
            master_addr=env.get("MASTER_ADDR") or (hosts[0] if hosts else None),
            master_port=port,
            source="SLURM",
        )
    if "PBS_NODEFILE" in env or "PBS_JOBID" in env:
        hosts = []
        if env.get("PBS_NODEFILE") and Path(env["PBS_NODEFILE"]).is_file():
            # One line per slot: a node appears once per CPU or GPU; keep the first of each.
            hosts = list(dict.fromkeys(line.strip() for line in Path(env["PBS_NODEFILE"]).read_text().splitlines() if line.strip()))
        if "OMPI_COMM_WORLD_RANK" in env:  # mpirun -npernode 1 (ABCI's way): MPI numbers the nodes
            nnodes, node_rank = int(env["OMPI_COMM_WORLD_SIZE"]), int(env["OMPI_COMM_WORLD_RANK"])
        else:
            names = [_short(host) for host in hosts]
            me = _short(socket.gethostname())
            nnodes, node_rank = max(len(hosts), 1), names.index(me) if me in names else 0
        return Rendezvous(
            nnodes=nnodes,
            node_rank=node_rank,
            master_addr=env.get("MASTER_ADDR") or (hosts[0] if hosts else None),
            master_port=port,
            source="PBS",
        )
    return None


def resolve_rendezvous(
    nnodes: int | None, node_rank: int | None, master_addr: str | None, master_port: int | None,
    env: Mapping[str, str],
) -> Rendezvous:
    """The command-line values, filled in from the scheduler's environment where left out.

    Raises:
        ConfigError: several nodes without this node's rank or the first node's address.
    """
    found = scheduler_rendezvous(env) or Rendezvous(source="defaults")
    chosen = Rendezvous(
        nnodes=nnodes if nnodes is not None else found.nnodes,
        node_rank=node_rank if node_rank is not None else found.node_rank,
        master_addr=master_addr or found.master_addr,
        master_port=master_port or found.master_port,
        source=found.source,
    )
    if chosen.nnodes > 1 and (chosen.master_addr is None or (node_rank is None and found.source == "defaults")):
        raise ConfigError(
            f"{chosen.nnodes} nodes need this node's rank and the first node's address",
            where="--nnodes",
            hint="pass --node-rank and --master-addr, or launch inside a SLURM or PBS job "
            "(one tuneforge train per node; see docs/distributed.md)",
        )
    if not 0 <= chosen.node_rank < chosen.nnodes:
        raise ConfigError(
            f"node rank {chosen.node_rank} is outside 0..{chosen.nnodes - 1}", where="--node-rank"
        )
    return chosen


def torchrun_arguments(nproc_per_node: str, rendezvous: Rendezvous, command: list[str]) -> list[str]:
    """torchrun's command line for `command` (module arguments after `-m`)."""
    if rendezvous.nnodes == 1 and rendezvous.master_addr is None:
        # One node: torchrun picks a free port itself, so two runs on one machine never collide.
        placement = ["--standalone", "--nnodes", "1"]
    else:
        placement = [
            "--nnodes", str(rendezvous.nnodes), "--node-rank", str(rendezvous.node_rank),
            "--master-addr", str(rendezvous.master_addr), "--master-port", str(rendezvous.master_port),
        ]
    # No restarts: a failed worker is a failed run, reported with its rank, not retried silently.
    return ["--nproc-per-node", nproc_per_node, *placement, "--max-restarts", "0", "-m", *command]


def launch(nproc_per_node: str, rendezvous: Rendezvous, command: list[str]) -> int:
    """Run `python -m <command>` in `nproc_per_node` processes on this node; the worst exit code.

    Raises:
        ConfigError: this process is itself one of a launch's workers.
    """
    if "LOCAL_RANK" in os.environ:
        raise ConfigError(
            "--nproc-per-node inside a process that a launcher already started",
            where="--nproc-per-node",
            hint="use either torchrun / accelerate launch or tuneforge train --nproc-per-node, not both",
        )
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    try:
        run(parse_args(torchrun_arguments(nproc_per_node, rendezvous, command)))
    except ChildFailedError as failed:
        rank, failure = failed.get_first_failure()
        print(f"tuneforge: rank {rank} failed first (exit code {failure.exitcode}); its output is above", flush=True)
        return failure.exitcode if failure.exitcode > 0 else 1
    return 0


__all__ = ["Rendezvous", "expand_nodelist", "launch", "resolve_rendezvous", "scheduler_rendezvous", "torchrun_arguments"]
