"""Several processes on existing engines: `torchrun` or `accelerate launch` start them and
torch.distributed joins them; this module only says which process this is and wraps the few
collectives the tool uses (no scheduler or RPC of its own).

Under a launcher every process runs the same command: each loads the model on its own device
(`cuda:LOCAL_RANK`, or the CPU), `analyze` shares the coalitions out (balanced by their cost; each
process keeps its own resumable record), healing trains with DDP through the Trainer, and
process 0 alone assembles, evaluates and writes what the user reads. Gloo serves CPUs, NCCL GPUs.
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from surgery.errors import SurgeryError

# Process 0 evaluates and exports while the others wait in a collective: allow for a long wait.
WAIT = timedelta(hours=12)


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1  # processes on this machine, which share its memory and disks

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def several(self) -> bool:
        return self.world > 1


def ranks() -> Ranks:
    """This process's place, from the launcher's environment (one process: rank 0 of 1)."""
    return Ranks(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0)),
                 int(os.environ.get("LOCAL_WORLD_SIZE", 1)))


def start(device: str | None = None) -> Ranks:
    """Join the launcher's process group (once); a single process has nothing to join. NCCL where the
    processes compute on GPUs (`device`: what --device resolved to; None: a GPU if there is one), else gloo."""
    here = ranks()
    if here.several:
        import torch
        import torch.distributed as dist

        if not dist.is_initialized():
            on_gpu = torch.cuda.is_available() and (device is None or str(device).startswith("cuda"))
            if on_gpu:  # NCCL's collectives use the current device: this process's own GPU
                if here.local_rank >= torch.cuda.device_count():
                    raise SurgeryError(f"process {here.local_rank} on this machine has no GPU of its own ({torch.cuda.device_count()} "
                                       "visible): start at most one process per GPU, or pass --device cpu")
                torch.cuda.set_device(here.local_rank)
            dist.init_process_group("nccl" if on_gpu else "gloo", timeout=WAIT)
            atexit.register(_leave)  # a process that exits with the group alive may abort in its threads' teardown
    return here


def _leave() -> None:
    """Leave the process group at exit, as PyTorch asks (a process that returns early, not the
    first, otherwise ended with SIGABRT now and then: 'terminate called without an active exception')."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def share(items: list[Any], cost: Callable[[Any], float]) -> list[Any]:
    """This process's part of `items`, in their order: with `cost(item)` an estimate of each item's
    time, items go longest first to the least loaded process (LPT), so the parts take about equal
    time. Every process computes the same parts from the same items."""
    here = ranks()
    if not here.several:
        return items
    loads, owner = [0.0] * here.world, {}
    for index in sorted(range(len(items)), key=lambda i: -cost(items[i])):  # a stable sort: equal costs keep their order
        rank = min(range(here.world), key=loads.__getitem__)
        owner[index] = rank
        loads[rank] += cost(items[index])
    return [item for index, item in enumerate(items) if owner[index] == here.rank]


def gather(value: Any) -> list[Any] | None:
    """Every process's `value`, in rank order, on process 0 (None elsewhere)."""
    here = ranks()
    if not here.several:
        return [value]
    import torch.distributed as dist

    found: list[Any] | None = [None] * here.world if here.main else None
    dist.gather_object(value, found, dst=0)
    return found


def broadcast(value: Any) -> Any:
    """Process 0's `value`, on every process."""
    if not ranks().several:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def from_main(compute: Callable[[], Any]) -> Any:
    """`compute()` run by process 0 alone, its result on every process. A SurgeryError it raises is
    raised on every process (one line each), so none is left waiting in a collective for it."""
    if not ranks().several:
        return compute()
    result, error = None, None
    if ranks().main:
        try:
            result = compute()
        except SurgeryError as failure:
            error = str(failure)
    result, error = broadcast((result, error))
    if error is not None:
        raise SurgeryError(error)
    return result
