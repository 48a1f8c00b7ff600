"""Data-parallel evaluation: the batches of each (benchmark, condition) group split over the processes of a launch.

Under ``accelerate launch --num_processes N -m selfcorrect evaluate ...`` (or ``torchrun``: ``RANK`` and
``WORLD_SIZE`` set) every process plans the same items and the same batches, and takes its share of the batches:
whole batches (a token-tree batch stays intact, so each item is scored exactly as one process scores it), dealt out
largest first to the process with the least token work so far. Each process appends its items to its own part file
(``<condition>.part-<rank>.jsonl`` beside ``<condition>.jsonl``) as they finish; when every process has ended the
group, process 0 folds the part files into ``<condition>.jsonl`` (atomically) and alone writes ``evaluation.json``,
the samples and ``metrics.csv``. The items already done are read from the results file and every part file, so a
rerun after a kill of any process, with any number of processes, scores only the rest.

The processes meet at barriers of their own process group over gloo (CPU, whatever the devices), with a timeout of
a day: a share of CoT sampling can take hours.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

BARRIER_TIMEOUT = datetime.timedelta(hours=24)


@dataclass(frozen=True)
class Shard:
    """This process's place in the launch: ``rank`` of ``world`` processes (0 of 1 when not launched)."""

    rank: int = 0
    world: int = 1

    @classmethod
    def from_env(cls) -> Shard:
        """The launch this process is part of, from ``RANK``/``WORLD_SIZE`` (torchrun, accelerate launch)."""
        world = int(os.environ.get("WORLD_SIZE", "1") or 1)
        return cls(int(os.environ.get("RANK", "0") or 0), world) if world > 1 else cls()

    @property
    def main(self) -> bool:
        return self.rank == 0

    def connect(self) -> None:
        """Join the launch's process group (once; nothing in one process). A vLLM engine built after this sits on
        this process's own device (vLLM's ``external_launcher`` over this world), not on every process's GPU 0."""
        if self.world == 1:
            return
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("gloo", timeout=BARRIER_TIMEOUT)

    def barrier(self) -> None:
        """Wait until every process of the launch reaches this point (nothing to wait for in one process)."""
        if self.world == 1:
            return
        import torch.distributed as dist

        self.connect()
        dist.barrier()

    def device(self, asked: str | None) -> str | None:
        """The device of this process: ``asked``, else its local GPU in a launch on GPUs (None: the default)."""
        if asked is not None or self.world == 1:
            return asked
        import torch

        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if torch.cuda.is_available() else "cpu"

    def take(self, costs: list[float]) -> set[int]:
        """The indices of the batches (of the given token work) this process scores: the largest first, each to the
        process with the least work so far (the lowest rank on a tie); the same on every process."""
        if self.world == 1:
            return set(range(len(costs)))
        load = [0.0] * self.world
        mine = set()
        for index in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
            rank = min(range(self.world), key=lambda r: (load[r], r))
            load[rank] += costs[index]
            if rank == self.rank:
                mine.add(index)
        return mine
