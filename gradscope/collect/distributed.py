"""torch.distributed plumbing: who we are, one batched reduction per step, agreement and the verdict.

Everything here is a no-op in a single process. Under an initialised process group of several ranks,
DTensor (FSDP2) parameters are sharded: each rank measures its local shard and the figures are
reduced across ranks. Plain parameters (DDP) are replicated: their gradients are already averaged by
backward, so each rank's figures are global and are weighted 1/world before the shared reduction.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from datetime import timedelta
from typing import Optional, Tuple

import torch
import torch.distributed as dist

from ..errors import GradscopeError

TIMEOUT_ENV = "GRADSCOPE_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 120


@dataclasses.dataclass(frozen=True)
class Context:
    rank: int
    world: int


def context() -> Optional[Context]:
    """The process group this process belongs to, or None when it runs alone."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return None
    return Context(dist.get_rank(), dist.get_world_size())


def is_sharded(tensor: torch.Tensor) -> bool:
    """A DTensor with a Shard placement: each rank holds part of it."""
    placements = getattr(tensor, "placements", None)
    return placements is not None and any(type(p).__name__ in ("Shard", "_StridedShard") for p in placements)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a DTensor, or the tensor itself."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


class Gathered:
    """One step's collective in flight: every rank's packed vector (``sums``, then ``maxes``), gathered by
    one ``all_gather`` that nothing waits for until the step's figures are read (at the Monitor's flush).
    The training loop goes on while the ranks exchange them, as it does while DDP's own buckets reduce.
    """

    def __init__(self, sums: torch.Tensor, maxes: torch.Tensor, ctx: Context) -> None:
        packed = torch.cat([sums, maxes.to(sums.dtype)])
        self._n = sums.numel()
        self._gathered = [torch.empty_like(packed) for _ in range(ctx.world)]
        self._work = dist.all_gather(self._gathered, packed, async_op=True)
        self._result: Optional[Tuple[torch.Tensor, torch.Tensor]] = None

    def settled(self, wait_s: float) -> bool:
        """Whether the exchange ended well, waiting at most ``wait_s`` for it (for a rank that may have
        lost its peers: a collective still in flight may never end)."""
        if self._result is not None:
            return True
        try:
            if not self._work.wait(timedelta(seconds=max(wait_s, 0.001))):  # 0 would mean no limit
                return False
            self.result()
        except Exception:  # noqa: BLE001 - the exchange failed or timed out: the step is not whole
            return False
        return True

    def result(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """Wait for the exchange; then the first vector SUMmed over ranks and the MAX of the second."""
        if self._result is None:
            self._work.wait()
            stacked = torch.stack(self._gathered)
            self._result = stacked[:, :self._n].sum(dim=0), stacked[:, self._n:].amax(dim=0)
            self._gathered = []
        return self._result


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def init_from_env(device: str) -> bool:
    """Join the process group torchrun describes in the environment; True if this call created it."""
    if int(os.environ.get("WORLD_SIZE", "1")) < 2 or not dist.is_available() or dist.is_initialized():
        return False
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    timeout = timedelta(seconds=timeout_s())
    dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timeout)
    return True


def agree(error: Optional[BaseException]) -> None:
    """Every rank says whether it failed; if any did, every rank raises naming the first that failed.

    This goes through the process group's key-value store, not a collective: a rank that failed may
    have left the others inside a collective of their own (DDP's first broadcast, say), which then
    times out into an error of its own; the store still gathers every rank's word, and the earliest
    failure is the one named.
    """
    ctx = context()
    if ctx is None:
        if error is not None:
            raise error
        return
    store = dist.distributed_c10d._get_default_store()
    mine = None if error is None else str(getattr(error, "problem", error)).splitlines()[0]
    keys = [f"gradscope/agree/{rank}" for rank in range(ctx.world)]
    store.set(keys[ctx.rank], json.dumps({"time": time.time(), "error": mine}))
    try:  # a rank stuck in a collective reports once that collective times out: wait longer than that
        store.wait(keys, timedelta(seconds=2 * timeout_s() + 10))
    except RuntimeError:  # DistStoreError: some rank never answered
        raise GradscopeError(f"ranks did not all report within {2 * timeout_s() + 10:g}s"
                             + (f" (this rank failed: {mine})" if mine else ""),
                             f"a rank may have died; raise ${TIMEOUT_ENV} if startup is slow") from error
    try:
        words = [json.loads(store.get(key)) for key in keys]
        # Rank 0 hosts the store: it must not leave (and take the store with it) before every rank has
        # read every word, or a slower rank's read fails with a connection error instead of this verdict.
        store.set(f"gradscope/agree/read/{ctx.rank}", "1")
        if ctx.rank == 0:
            store.wait([f"gradscope/agree/read/{rank}" for rank in range(ctx.world)],
                       timedelta(seconds=timeout_s()))
    except RuntimeError as exc:  # the store went away or a rank stopped reading: say so, no traceback
        raise GradscopeError("ranks could not exchange whether they failed: " + str(exc).splitlines()[0]
                             + (f" (this rank failed: {mine})" if mine else ""),
                             f"a rank may have died; raise ${TIMEOUT_ENV} if startup is slow") from error
    failed = sorted((word["time"], rank, word["error"]) for rank, word in enumerate(words) if word["error"])
    if failed:
        _, rank, message = failed[0]
        hint = getattr(error, "hint", "") if error is not None and rank == ctx.rank else "see rank's error"
        raise GradscopeError(f"rank {rank} failed: {message}", hint or "fix the error on that rank") from error


STOPPED_KEY = "gradscope/stopped/{rank}"


def post_stopped(ctx: Context, why: str) -> None:
    """Leave word in the process group's store that this rank's run stopped, and why, for rank 0's report
    to name. Best effort and bounded: the store may already be gone with a dead rank 0."""
    try:
        store = dist.distributed_c10d._get_default_store()
        store.set(STOPPED_KEY.format(rank=ctx.rank), json.dumps({"time": time.time(), "why": why}))
    except Exception:  # noqa: BLE001 - the run is already failing; its own error is the one to see
        pass


def stopped_peers(ctx: Context, wait_s: float = 2.0) -> list:
    """``(time, rank, why)`` for every other rank that left word that it stopped, waiting at most ``wait_s``
    for a rank whose failure is what broke this one's collective (its word is set before it exits)."""
    try:
        store = dist.distributed_c10d._get_default_store()
        keys = {rank: STOPPED_KEY.format(rank=rank) for rank in range(ctx.world) if rank != ctx.rank}
        deadline = time.monotonic() + wait_s
        while True:
            found = [(word["time"], rank, word["why"]) for rank, key in keys.items() if store.check([key])
                     for word in [json.loads(store.get(key))]]
            if found or time.monotonic() >= deadline:
                return found
            time.sleep(0.05)
    except Exception:  # noqa: BLE001 - the store is gone too: nothing more can be learnt
        return []


def timeout_s() -> float:
    return float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S))


def broadcast_int(value: int) -> int:
    """Rank 0's value on every rank (the exit code, so every rank exits alike)."""
    ctx = context()
    if ctx is None:
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return int(holder[0])


def leave(wait_for_others: bool) -> None:
    """Destroy the process group; after a clean run, first wait until every rank is done with it
    (tearing gloo down while a peer still talks to it can abort the process)."""
    global left_group
    if wait_for_others:
        dist.barrier()
    dist.destroy_process_group()
    left_group = True


# Set once this process has torn down a process group it created. Objects that still hold the group
# (FSDP2's state, a DeviceMesh) are then freed at interpreter shutdown, where Gloo's worker threads can
# abort the process ("terminate called without an active exception", exit -6) after a clean run; the
# console entry point therefore ends such a process with os._exit once its output is flushed.
left_group = False


def rank_prefix() -> str:
    ctx = context()
    return f"rank {ctx.rank}: " if ctx else ""
