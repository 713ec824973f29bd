"""torch threads follow the cores a process may use, unless OMP_NUM_THREADS says otherwise."""

from __future__ import annotations

import os

import pytest
import torch

from tokenline.threads import usable_cores, use_usable_cores


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_threads_follow_the_affinity_mask_not_the_machine(monkeypatch, restore_threads):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})  # as under `taskset -c 0` or a 1-CPU container
    assert usable_cores() == 1
    assert use_usable_cores() == 1 and torch.get_num_threads() == 1


def test_omp_num_threads_wins(monkeypatch, restore_threads):
    torch.set_num_threads(1)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    assert use_usable_cores() == 1
