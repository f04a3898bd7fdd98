"""Experiments for the distributed tests: the same model and global batch, alone, under DDP and FSDP2."""
import itertools

import torch
import torch.distributed as dist
from torch import nn

import gradscope

GLOBAL_BATCH, STEPS_BEFORE_FAILURE = 16, 2


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 1))


def _batches(rank: int, world: int):
    """Every rank draws the same global batch and keeps its slice of it."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 1, generator=g)
    per = GLOBAL_BATCH // world

    def batch():
        x = torch.randn(GLOBAL_BATCH, 8, generator=g)
        return x[rank * per:(rank + 1) * per], (x @ w)[rank * per:(rank + 1) * per]
    return batch


def _experiment(model: nn.Module, rank: int, world: int, loss_fn=None, lr: float = 0.05) -> gradscope.Experiment:
    loss_fn = loss_fn or (lambda m, b: nn.functional.mse_loss(m(b[0]), b[1]))
    return gradscope.Experiment(model, torch.optim.SGD(model.parameters(), lr=lr), _batches(rank, world),
                                loss_fn=loss_fn, name="mlp")


HOT_LR = 1.0  # unclipped training diverges within the profile: a finding calls for clipping, and trials run


def single_hot() -> gradscope.Experiment:
    return _experiment(_model(), 0, 1, lr=HOT_LR)


def ddp_hot() -> gradscope.Experiment:
    return _experiment(nn.parallel.DistributedDataParallel(_model()), dist.get_rank(), dist.get_world_size(),
                       lr=HOT_LR)


def fsdp_hot() -> gradscope.Experiment:
    model = fsdp().model
    return _experiment(model, dist.get_rank(), dist.get_world_size(), lr=HOT_LR)


def single() -> gradscope.Experiment:
    return _experiment(_model(), 0, 1)


def ddp() -> gradscope.Experiment:
    model = nn.parallel.DistributedDataParallel(_model())
    return _experiment(model, dist.get_rank(), dist.get_world_size())


def fsdp() -> gradscope.Experiment:
    from torch.distributed.fsdp import fully_shard
    model = _model()
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    return _experiment(model, dist.get_rank(), dist.get_world_size())


def fails_on_rank_1() -> gradscope.Experiment:
    if dist.get_rank() == 1:
        raise RuntimeError("rank one cannot build its model")
    return ddp()


def fails_on_rank_1_and_reads_slowly() -> gradscope.Experiment:
    """Rank 1 fails and then reads the other ranks' words a second late: rank 0, which hosts the store,
    must still be there to answer."""
    if dist.get_rank() == 1:
        import time
        c10d = dist.distributed_c10d
        store = c10d._get_default_store()

        class Slow:
            def __getattr__(self, name):
                return getattr(store, name)

            def get(self, key):
                time.sleep(1.0)
                return store.get(key)
        c10d._get_default_store = Slow
        raise RuntimeError("rank one cannot build its model")
    return single()


def raises_midway_on_rank_1() -> gradscope.Experiment:
    calls = itertools.count()

    def loss_fn(m, b):
        if dist.get_rank() == 1 and next(calls) == STEPS_BEFORE_FAILURE:
            raise RuntimeError("rank one ran out of memory (simulated)")
        return nn.functional.mse_loss(m(b[0]), b[1])
    return _experiment(nn.parallel.DistributedDataParallel(_model()), dist.get_rank(), dist.get_world_size(), loss_fn)


def ddp_hot_raises_in_trials() -> gradscope.Experiment:
    """The hot DDP run, whose loss raises on rank 1 once the trials have begun (past the profile's 6 steps and
    the first trial's start)."""
    calls = itertools.count()

    def loss_fn(m, b):
        if dist.get_rank() == 1 and next(calls) == 60:
            raise RuntimeError("rank one ran out of memory in a trial (simulated)")
        return nn.functional.mse_loss(m(b[0]), b[1])
    return _experiment(nn.parallel.DistributedDataParallel(_model()), dist.get_rank(), dist.get_world_size(),
                       loss_fn, lr=HOT_LR)


def ddp_hot_killed_in_trials() -> gradscope.Experiment:
    """The hot DDP run, whose rank 1 is killed (SIGKILL: no word, no exit handler) inside the trials."""
    import os
    import signal
    calls = itertools.count()

    def loss_fn(m, b):
        if dist.get_rank() == 1 and next(calls) == 60:
            os.kill(os.getpid(), signal.SIGKILL)
        return nn.functional.mse_loss(m(b[0]), b[1])
    return _experiment(nn.parallel.DistributedDataParallel(_model()), dist.get_rank(), dist.get_world_size(),
                       loss_fn, lr=HOT_LR)
