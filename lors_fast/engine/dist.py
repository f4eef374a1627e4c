"""torch.distributed helpers shared by the stages that run under ``torchrun`` (distill, eval, coreset).

A stage's entry point runs inside ``with group(device):`` (:func:`setup` joins a process group when
launched with WORLD_SIZE > 1: NCCL for CUDA devices, gloo otherwise, kept until the process exits); library
code asks :func:`rank_world` (``(0, 1)`` outside a process group). Only rank 0 writes files (:func:`is_main`).

:func:`agree` is how one rank's failure stops every rank with one message: each rank calls it once per
collective step with its own error (or None); if any rank failed, every rank gets the first failing
rank's message (``"rank r: ..."``) and raises it itself, so no rank is left waiting in a collective.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import torch

from lors_fast.core.device import resolve_device

__all__ = ["setup", "teardown", "group", "rank_world", "is_main", "barrier", "local_device", "all_reduce_", "agree",
           "gather_objects", "shard"]


def rank_world() -> tuple[int, int]:
    """(rank, world size) of the current process group; (0, 1) when none is initialised."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    """Whether this process is rank 0 (always true outside torchrun)."""
    return rank_world()[0] == 0


def setup(device: str | torch.device = "cpu") -> bool:
    """Join a process group when launched by torchrun with WORLD_SIZE > 1 and none exists yet.

    Backend: NCCL when ``device`` is CUDA, gloo otherwise. Returns True when this call created the group.
    The group then lives until the process exits (``atexit``): destroying and re-creating the default
    group in the same torchrun workers (eval, then coreset, in one script) can leave one rank waiting in
    the second rendezvous while the other has passed it, so a later stage reuses the group instead.
    """
    import atexit

    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available() or dist.is_initialized():
        return False
    cuda = resolve_device(device).type == "cuda"
    if cuda and "LOCAL_RANK" in os.environ:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if cuda else "gloo")
    atexit.register(_destroy)
    return True


def _destroy() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def teardown(created: bool, *, together: bool = True) -> None:
    """End of a stage: with ``together`` every rank leaves it at once (a barrier; skipped on the way out of
    an error, where another rank may never reach it). The group itself stays (see :func:`setup`)."""
    if together and rank_world()[1] > 1:
        barrier()


@contextmanager
def group(device: str | torch.device = "cpu"):
    """``with group(device):`` — :func:`setup` on entry, :func:`teardown` on exit (no barrier after an error)."""
    created = setup(device)
    try:
        yield
    except BaseException:
        teardown(created, together=False)
        raise
    teardown(created)


def local_device(device: str) -> torch.device:
    """``cuda`` (or ``auto`` on a CUDA machine) without an index under torchrun → this rank's GPU
    (``cuda:$LOCAL_RANK``)."""
    d = resolve_device(device)
    if d.type == "cuda" and d.index is None and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return d


def barrier() -> None:
    """Wait for every rank (a no-op outside a process group)."""
    import torch.distributed as dist

    if rank_world()[1] > 1:
        dist.barrier()


def all_reduce_(tensors: list[torch.Tensor], op: str = "sum") -> None:
    """In-place all-reduce (sum or max) of each tensor over the process group; a no-op in one process."""
    if rank_world()[1] == 1:
        return
    import torch.distributed as dist

    rop = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op]
    for t in tensors:
        dist.all_reduce(t, op=rop)


def agree(error: str | None, device: torch.device | str = "cpu") -> str | None:
    """Collective: None if no rank reports an error, else the lowest failing rank's ``"rank r: message"``
    (the same string on every rank)."""
    rank, world = rank_world()
    if world == 1:
        return error
    import torch.distributed as dist

    flag = torch.tensor([0 if error is None else 1], device=device)
    dist.all_reduce(flag)
    if int(flag) == 0:
        return None
    msgs: list = [None] * world
    dist.all_gather_object(msgs, error)
    r = next(i for i, m in enumerate(msgs) if m is not None)
    return f"rank {r}: {msgs[r]}"


def gather_objects(obj) -> list:
    """Every rank's ``obj``, in rank order, on every rank (``[obj]`` in one process)."""
    rank, world = rank_world()
    if world == 1:
        return [obj]
    import torch.distributed as dist

    out: list = [None] * world
    dist.all_gather_object(out, obj)
    return out


def shard(n: int) -> list[int]:
    """The indices of ``range(n)`` this rank handles: k with k % world == rank."""
    rank, world = rank_world()
    return list(range(rank, n, world))
