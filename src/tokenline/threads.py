"""How many CPU threads torch uses: the cores this process may run on, unless OMP_NUM_THREADS says otherwise."""

from __future__ import annotations

import os

import torch


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity mask; a container's or taskset's limit shows here)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def use_usable_cores() -> int:
    """Set torch's intra-op threads to usable_cores() unless OMP_NUM_THREADS is set; returns the count in use.

    torch's own default counts the machine's physical cores, which oversubscribes a process
    pinned to fewer of them (two threads on a busy 2-core machine ran 4-15x slower than one).
    """
    if not os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(usable_cores())
    return torch.get_num_threads()
