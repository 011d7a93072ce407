"""CPU threads per process. torch's default (one per core, in every process) oversubscribes a machine that several
processes share, and on a tiny model its threads cost more than they save: the bundled example's search took 15.9 s
with the default and 1.4 s with one thread on a 2-core machine with other work. So hf-glue chooses, says what it
chose, and leaves the choice to the user when they make it (``--threads``, or ``OMP_NUM_THREADS``)."""

from __future__ import annotations

import os
from typing import Optional

#: experts below this many parameters search with one thread per process (a step is a few milliseconds of work)
SMALL_MODEL = 2_000_000


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity, e.g. a container's or taskset's share)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def choose_threads(requested: Optional[int], parameters: int, processes_here: int) -> tuple[Optional[int], str]:
    """(threads, why) for one process of ``processes_here`` on this machine searching experts of ``parameters``
    parameters; threads None: leave torch's setting (``OMP_NUM_THREADS`` was set by the user)."""
    if requested:
        return requested, "--threads"
    if os.environ.get("OMP_NUM_THREADS"):  # the user's, or the launcher's (torchrun and accelerate set it)
        return None, f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} in the environment; --threads N to change"
    if parameters < SMALL_MODEL:
        return 1, (f"experts of {parameters / 1e6:.2g}M parameters: more threads cost more than they save; "
                   "--threads N to change")
    cores = available_cores()
    share = max(1, cores // max(1, processes_here))
    return share, f"{cores} cores shared by {processes_here} process(es) on this machine; --threads N to change"


def apply_threads(requested: Optional[int], parameters: int, processes_here: int) -> str:
    """Set torch's intra-op threads as `choose_threads` says; returns the line for the run's log."""
    import torch

    threads, why = choose_threads(requested, parameters, processes_here)
    if threads is not None:
        torch.set_num_threads(threads)
    return f"CPU threads per process: {torch.get_num_threads()} ({why})"
