"""Distributed state in one small validated object, read from the launcher's environment.

Understands torchrun (``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``) and SLURM
(``SLURM_PROCID``/``SLURM_NTASKS``/``SLURM_LOCALID``; the master is the job's first
node). With neither, the run is a single process. The backend is nccl when the process
owns a GPU, gloo otherwise (CPU training, tests).

    dist_env = DistEnv.from_environ()
    dist_env.init()          # torch.distributed process group (+ device selection)
    dist_env.all_sum([loss, n])   # the few collectives everyone uses (no-ops on one process)
    dist_env.any_rank(flag)
    dist_env.gather(obj)          # every rank's object, in rank order
    dist_env.barrier()
"""

from __future__ import annotations

import datetime
import hashlib
import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.distributed as dist

from claver_dist.errors import DistError


def _int_env(env: dict[str, str], key: str) -> int:
    try:
        return int(env[key])
    except ValueError:
        raise DistError(f"environment variable {key}={env[key]!r} is not an integer") from None


# --------------------------------------------------------------------------- collectives
# On the default process group; each is a no-op (the local value) without one or on one rank.


def _multi() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_sum(values: Sequence[float], device: torch.device | str = "cpu") -> list[float]:
    """Element-wise sum over ranks of a few floats (float64 on ``device``: nccl needs CUDA)."""
    t = torch.tensor(list(values), dtype=torch.float64, device=device)
    if _multi():
        dist.all_reduce(t)
    return t.tolist()


def any_rank(flag: bool, device: torch.device | str = "cpu") -> bool:
    """True on every rank when ``flag`` is true on at least one: all ranks take the same branch."""
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    if _multi():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def barrier() -> None:
    if _multi():
        dist.barrier()


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order, on every rank."""
    if not _multi():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


# --------------------------------------------------------------------------- environment


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _first_slurm_host(nodelist: str) -> str:
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             check=True, timeout=30).stdout.split()
        return out[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        # "n[1-2],m3" -> "n1" without scontrol
        head = nodelist.split(",")[0]
        if "[" in head:
            prefix, rng = head.split("[", 1)
            return prefix + rng.split("-")[0].split(",")[0].rstrip("]")
        return head


def _slurm_tasks_on_node(env: dict[str, str]) -> int:
    """Tasks of this step on this node: SLURM_STEP_TASKS_PER_NODE is e.g. "2(x3),1" (node i's
    count at position i); SLURM_NTASKS_PER_NODE exists only when --ntasks-per-node was given."""
    spec = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or \
        env.get("SLURM_NTASKS_PER_NODE", "1")
    counts: list[int] = []
    for part in spec.split(","):
        n, _, repeat = part.partition("(x")
        counts += [int(n)] * int(repeat.rstrip(")") or 1)
    node = int(env.get("SLURM_NODEID", "0"))
    return counts[min(node, len(counts) - 1)]


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    device_type: str = "cpu"   # "cuda" or "cpu"
    source: str = "single"      # torchrun | slurm | single

    @property
    def backend(self) -> str:
        return "nccl" if self.device_type == "cuda" else "gloo"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def device(self) -> torch.device:
        return torch.device("cuda", self.local_rank) if self.device_type == "cuda" else torch.device("cpu")

    @classmethod
    def from_environ(cls, env: dict[str, str] | None = None, device: str = "auto") -> "DistEnv":
        env = dict(os.environ if env is None else env)
        if "RANK" in env and "WORLD_SIZE" in env:
            source = "torchrun"
            rank, world = _int_env(env, "RANK"), _int_env(env, "WORLD_SIZE")
            local = _int_env(env, "LOCAL_RANK") if "LOCAL_RANK" in env else rank
            local_world = _int_env(env, "LOCAL_WORLD_SIZE") if "LOCAL_WORLD_SIZE" in env else world
            addr = env.get("MASTER_ADDR", "127.0.0.1")
            port = _int_env(env, "MASTER_PORT") if "MASTER_PORT" in env else 29500
        elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env and "SLURM_STEP_ID" in env:
            source = "slurm"
            rank, world = _int_env(env, "SLURM_PROCID"), _int_env(env, "SLURM_NTASKS")
            local = _int_env(env, "SLURM_LOCALID")
            try:
                local_world = _slurm_tasks_on_node(env)
            except ValueError:
                raise DistError(f"cannot read tasks per node from SLURM_STEP_TASKS_PER_NODE="
                                f"{env.get('SLURM_STEP_TASKS_PER_NODE')!r}") from None
            addr = env.get("MASTER_ADDR") or _first_slurm_host(env.get("SLURM_JOB_NODELIST", "127.0.0.1"))
            # a port derived from the job id: every task computes the same one. 15000-29999
            # stays below Linux's ephemeral range (32768-60999), where an outgoing connection
            # on the master node could already hold it.
            port = _int_env(env, "MASTER_PORT") if "MASTER_PORT" in env else 15000 + int(env.get("SLURM_JOB_ID", "0")) % 15000
        else:
            source, rank, world, local, local_world = "single", 0, 1, 0, 1
            addr, port = "127.0.0.1", free_port()
        if world < 1 or not 0 <= rank < world:
            raise DistError(f"rank {rank} is outside world size {world} (from {source} environment)")
        if not 0 <= local < max(local_world, 1) and source != "single":
            raise DistError(f"local rank {local} is outside {local_world} processes per node ({source})")
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cuda":
            if not torch.cuda.is_available():
                raise DistError("train.device=cuda but no CUDA GPU is visible")
            if local >= torch.cuda.device_count():
                raise DistError(f"local rank {local} has no GPU: {torch.cuda.device_count()} visible on this node")
        return cls(rank, world, local, local_world, addr, port, device, source)

    def init(self, timeout_s: float = 1800) -> None:
        """Create the default process group (idempotent); sets the CUDA device first."""
        if dist.is_initialized():
            # DeepSpeed reads LOCAL_RANK from the environment on every engine it builds; a
            # process that already has its group (tests, notebooks) may have lost the variable.
            os.environ.setdefault("LOCAL_RANK", str(self.local_rank))
            return
        if self.device_type == "cuda":
            torch.cuda.set_device(self.local_rank)
        # DeepSpeed JIT-builds a C++ op under ~/.cache/torch_extensions while it initialises;
        # two Python environments sharing that folder rebuild it over each other, and every
        # rank waits on the build's lock file (forever, if a killed build left it behind).
        # One folder per environment avoids both.
        os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "torch_extensions" /
                                                          hashlib.sha1(sys.prefix.encode()).hexdigest()[:12]))
        os.environ.update(RANK=str(self.rank), WORLD_SIZE=str(self.world_size), LOCAL_RANK=str(self.local_rank),
                          MASTER_ADDR=self.master_addr, MASTER_PORT=str(self.master_port))
        timeout = datetime.timedelta(seconds=timeout_s)
        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            # Under torch's elastic agent every restart attempt meets in the agent's one store,
            # and torch adds no per-attempt prefix: a restarted rank then reads the previous
            # attempt's gloo/NCCL addresses and waits on a dead peer (seen with gloo: "Connection
            # refused" until the timeout). The attempt number keeps the attempts apart; it must
            # be the same on every node (TORCHELASTIC_RESTART_COUNT is not: a node restarted for
            # another node's failure keeps its count), so our launchers number the starts.
            attempt = os.environ.get("CLAVER_ATTEMPT") or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
            store = dist.TCPStore(self.master_addr, self.master_port, self.world_size, is_master=False,
                                  timeout=timeout)
            dist.init_process_group(self.backend, store=dist.PrefixStore(f"claver/attempt_{attempt}", store),
                                    rank=self.rank, world_size=self.world_size, timeout=timeout)
        else:
            dist.init_process_group(self.backend, rank=self.rank, world_size=self.world_size, timeout=timeout)

    def all_sum(self, values: Sequence[float]) -> list[float]:
        return all_sum(values, self.device)

    def any_rank(self, flag: bool) -> bool:
        return any_rank(flag, self.device)

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` summed over ranks, in place on its device (no host synchronisation)."""
        if _multi():
            dist.all_reduce(t)
        return t

    def barrier(self) -> None:
        barrier()

    def gather(self, obj: Any) -> list[Any]:
        return gather_objects(obj)
