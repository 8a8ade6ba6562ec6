"""What a stage runs on: the thread plan (cores ÷ processes, less reader workers) and its hint."""

from __future__ import annotations

import pytest

import engine.runtime as runtime
from engine.errors import UserError


@pytest.fixture
def four_cores(monkeypatch):
    monkeypatch.setattr(runtime, "available_cores", lambda: 4)


def test_threads_are_the_cores_shared_by_the_processes_and_left_by_the_workers(four_cores):
    assert runtime.plan_threads().threads == 4
    assert runtime.plan_threads(processes=2).threads == 2
    assert runtime.plan_threads(processes=3).threads == 1
    assert runtime.plan_threads(workers=2).threads == 2  # select: the reader workers take cores too
    assert runtime.plan_threads(processes=8, workers=4).threads == 1  # never none
    plan = runtime.plan_threads(processes=2, workers=1)
    assert "4 core(s) ÷ 2 process(es), less 1 reader worker(s)" in plan.describe() and plan.threads == 1


def test_threads_asked_for_win_and_nonsense_is_one_line(four_cores):
    plan = runtime.plan_threads(processes=4, requested=3)
    assert plan.threads == 3 and plan.describe() == "torch threads: 3 (--threads)"
    with pytest.raises(UserError, match="--threads must be at least 1"):
        runtime.plan_threads(requested=0)


def test_a_busy_machine_is_pointed_at_threads_1(four_cores, monkeypatch):
    import psutil

    monkeypatch.setattr(psutil, "cpu_percent", lambda interval, percpu: [100.0, 95.0, 3.0, 1.0])
    assert "--threads 1" in runtime.busy_hint(runtime.plan_threads())
    assert runtime.busy_hint(runtime.plan_threads(requested=2)) is None  # the user chose
    monkeypatch.setattr(psutil, "cpu_percent", lambda interval, percpu: [5.0, 2.0, 3.0, 1.0])
    assert runtime.busy_hint(runtime.plan_threads()) is None


def test_the_cores_are_the_ones_this_process_may_use():
    import os

    assert runtime.available_cores() == len(os.sched_getaffinity(0))
