"""Several processes, one job: the process group torchrun sets up, and the few collective helpers
the jobs need (rank, barrier, broadcast, gather, a batch mean over all ranks, failure reports).

Launched without torchrun (no WORLD_SIZE > 1 in the environment) every helper is the one-process
identity, so the jobs run the same code either way. NCCL on CUDA, Gloo on CPU; object
collectives (run ids, gathered test maps) always go over a Gloo group so they never occupy GPU
memory.
"""

from __future__ import annotations

import atexit
import datetime
import os
import signal
import socket
import time
import traceback
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from aaclip_core import signals
from aaclip_core.errors import ConfigError, RankStopped

# A rank that waits longer than this in a collective gives up (its peer is gone or stuck): the
# job fails instead of hanging. Long enough for rank 0 to write a checkpoint or score a test set
# while the others wait at a barrier. AACLIP_DIST_TIMEOUT (seconds) overrides it.
DEFAULT_TIMEOUT_S = 1800
# How long rank 0 waits, once something failed, for the other ranks to say why.
REPORT_GRACE_S = 3.0
_PREFIX = "aaclip/"


@dataclass(frozen=True)
class Setting:
    """Where this process stands in the job (what `doctor` and the run's tags report)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str = "none"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched() -> bool:
    """True when torchrun (or an equivalent launcher) started several processes for this job."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _launch_setting() -> Setting:
    """Rank and world size as the launcher put them in the environment (before `setup`)."""
    env = os.environ
    if not launched():
        return Setting()
    return Setting(int(env.get("RANK", "0")), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", "0")), "pending")


# Known from the environment at import, so that `is_main()` is right even before `setup` (a job
# reads its inputs first); collectives only run once the process group exists.
_setting = _launch_setting()
_object_group: Any = None
_store: Any = None


def setting() -> Setting:
    return _setting


def is_main() -> bool:
    return _setting.is_main


def world_size() -> int:
    return _setting.world_size


def rank() -> int:
    return _setting.rank


def active() -> bool:
    return _setting.world_size > 1 and dist.is_initialized()


def _timeout() -> datetime.timedelta:
    raw = os.environ.get("AACLIP_DIST_TIMEOUT", str(DEFAULT_TIMEOUT_S))
    try:
        seconds = float(raw)
    except ValueError:
        raise ConfigError(f"AACLIP_DIST_TIMEOUT={raw!r} is not a number of seconds; unset it or give e.g. 1800.") from None
    return datetime.timedelta(seconds=seconds)


def setup(device: torch.device) -> torch.device:
    """Join the job's process group once per process; returns the device this rank computes on.

    On CUDA each rank takes the GPU of its LOCAL_RANK, so `runtime.device = "cuda"` (or "auto")
    means "this node's GPUs, one per process".
    """
    global _setting, _object_group, _store
    if not launched():
        return device
    if device.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local >= torch.cuda.device_count():
            raise ConfigError(
                f"LOCAL_RANK {local} but only {torch.cuda.device_count()} GPU(s) are visible: start at most "
                "that many processes per node (torchrun --nproc_per_node)."
            )
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if dist.is_initialized():
        return device
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = _timeout()
    dist.init_process_group(backend=backend, timeout=timeout)
    _object_group = dist.new_group(backend="gloo", timeout=timeout) if backend != "gloo" else dist.group.WORLD
    _store = dist.PrefixStore(_PREFIX, dist.distributed_c10d._get_default_store())
    _setting = Setting(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), backend)
    # Where this rank runs, so rank 0 can tell a rank still shutting down from one that died (failure_summary).
    _store.set(f"process/{_setting.rank}", f"{socket.gethostname()} {os.getpid()}")
    _install_sigterm()
    atexit.register(_shutdown)
    return device


def _shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def _install_sigterm() -> None:
    """torchrun stops the surviving ranks with SIGTERM when one dies: turn it into an exception so
    rank 0 can end its run FAILED (with the reason) instead of vanishing with the run RUNNING."""

    def handler(signum, frame):
        # Once only: a second signal must not interrupt the clean-up the first one started.
        signal.signal(signum, signal.SIG_IGN)
        signals.interrupt(RankStopped(f"rank {_setting.rank} received {signal.Signals(signum).name}"))

    signal.signal(signal.SIGTERM, handler)


# ------------------------------------------------------------------------------------- collectives


def barrier() -> None:
    if active():
        dist.barrier(group=_object_group)


def broadcast_object(obj: Any = None) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=_object_group)
    return box[0]


def gather_objects(obj: Any) -> list[Any] | None:
    """Every rank's ``obj`` in rank order on rank 0; None on the other ranks."""
    if not active():
        return [obj]
    out = [None] * _setting.world_size if is_main() else None
    dist.gather_object(obj, out, dst=0, group=_object_group)
    return out


def batch_means(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted means over the samples of the *global* batch, for ``values`` [n_local, K] and
    ``weights`` [n_local] (1 for a sample, 0 for a padding one).

    The sums travel through a differentiable all-reduce, so every rank holds the global means and
    the backward pass hands each rank the gradient of the global loss with respect to its own
    samples (summed over ranks: DDP's averaging then yields exactly the one-process gradient).
    The one-process path divides the same sums, so both compute the same numbers.
    """
    w = weights.to(values.dtype)
    packed = torch.cat([(values * w[:, None]).sum(0), w.sum().reshape(1)])
    if active():
        packed = _SumOverRanks.apply(packed)
    return packed[:-1] / packed[-1]


class _SumOverRanks(torch.autograd.Function):
    """All-reduce (sum) whose backward is the all-reduced gradient: the gradient of a loss that
    every rank computes from the summed value reaches every rank's contribution."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        out = tensor.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        out = grad.clone()
        dist.all_reduce(out)
        return out


def reduce_mean(value: float) -> float:
    """The mean of a per-rank number over all ranks (for metrics that each rank measures)."""
    if not active():
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, group=_object_group)
    return float(t) / _setting.world_size


# ----------------------------------------------------------------------------------- failure reports


def report_failure(exc: BaseException) -> None:
    """Leave why this rank fails where rank 0 can read it (the rendezvous store)."""
    # A caller's deliberate stop (a sweep's pruner) is decided by rank 0 for every rank: no failure to
    # explain, and its key, never removed, would answer for this rank when a later job of the same
    # process group (a torchrun sweep worker's next trial) fails.
    if _store is None or isinstance(exc, signals.Stopped):
        return
    kind = "stopped" if isinstance(exc, (RankStopped, KeyboardInterrupt)) else "failed"
    text = "".join(traceback.format_exception_only(type(exc), exc)).strip()
    try:
        _store.set(f"{kind}/{_setting.rank}", text[:2000])
    except Exception:  # the store may be gone already: nothing more to say
        pass


def _alive_here(rank_: int) -> bool:
    """Whether ``rank_``'s process runs on this host and is alive (unknown elsewhere: False)."""
    key = f"process/{rank_}"
    try:  # check first: get() would wait for a key that a rank dying early never wrote
        host, pid = _store.get(key).decode().split() if _store.check([key]) else ("", "0")
    except Exception:  # the store is gone
        return False
    return host == socket.gethostname() and process_alive(int(pid))


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` of this host is alive. A zombie is not: it has died and waits to be
    reaped, which for a rank whose launcher died too takes as long as PID 1 takes (seconds in a
    container, forever under one that reaps nothing)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:  # no /proc here: ask the kernel whether the process exists
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # exists, owned by someone else
            return True
        return True


def failure_summary(own: BaseException) -> str:
    """On rank 0 after a failure: which rank failed and why, in one paragraph ("" when the whole
    job was stopped from outside and no rank failed).

    Rank 0's own user error (an AaclipError) is its own. Anything else (a broken collective, the
    SIGTERM torchrun sends to the survivors) means another rank went first: a rank that raised
    says so in the store; one killed outright (SIGKILL, out of memory) cannot, so it is named as
    the rank that went silent while the others reported being stopped.
    """
    from aaclip_core.errors import AaclipError

    if isinstance(own, AaclipError) or _store is None:
        return f"rank 0 failed: {type(own).__name__}: {own}"
    deadline = time.monotonic() + REPORT_GRACE_S
    failed: dict[int, str] = {}
    stopped: set[int] = set()
    store_gone = False
    others = range(1, _setting.world_size)
    while len(failed) + len(stopped) < len(others) and time.monotonic() < deadline:
        for r in others:
            if r in failed or r in stopped:
                continue
            try:
                if _store.check([f"failed/{r}"]):
                    failed[r] = _store.get(f"failed/{r}").decode("utf-8", "replace")
                elif _store.check([f"stopped/{r}"]):
                    stopped.add(r)
            except Exception:  # the store went away with the job: report what is known
                deadline, store_gone = 0.0, True
                break
        time.sleep(0.1)
    if failed:
        return "; ".join(f"rank {r} failed: {msg}" for r, msg in sorted(failed.items()))
    silent = [r for r in others if r not in stopped]
    if silent and isinstance(own, RankStopped):
        # The store lives in the torchrun launcher: gone while rank 0 was being stopped, it is the launcher
        # itself that is going down (SIGTERM or Ctrl-C to torchrun), not a rank that died first. A silent rank
        # whose process still lives on this host is being stopped with the job (on a busy machine, or held in
        # a collective with rank 0, it reports later than the grace): only a dead one died first.
        if store_gone:
            return ""
        silent = [r for r in silent if not _alive_here(r)]
    if silent:
        return (
            f"rank {', '.join(map(str, silent))} ended without a report (killed by a signal such as SIGKILL, or "
            f"by the out-of-memory killer; torchrun's failure summary gives its exit code), and rank 0 saw "
            f"{type(own).__name__}: {own}"
        )
    if isinstance(own, RankStopped):
        return ""  # every rank was told to stop (scheduler, Ctrl-C on torchrun): no rank failed
    return f"rank 0 failed: {type(own).__name__}: {own}"
