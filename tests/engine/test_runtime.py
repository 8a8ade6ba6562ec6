"""What a stage runs on: the thread plan (cores less other work and reader workers, ÷ processes), the allocator."""

from __future__ import annotations

import platform
import subprocess
import sys
import time
from pathlib import Path

import pytest

import engine.runtime as runtime
from engine.errors import UserError


@pytest.fixture
def four_cores(monkeypatch):
    monkeypatch.setattr(runtime, "available_cores", lambda: 4)


def test_threads_are_the_cores_shared_by_the_processes(four_cores):
    assert runtime.plan_threads().threads == 4
    assert runtime.plan_threads(processes=2).threads == 2
    assert runtime.plan_threads(processes=3).threads == 1
    assert runtime.plan_threads(processes=8).threads == 1  # never none
    plan = runtime.plan_threads(processes=2, busy=1)
    assert "4 core(s), less 1 busy with other work, ÷ 2 process(es)" in plan.describe() and plan.threads == 1


def test_threads_asked_for_win_and_nonsense_is_one_line(four_cores):
    plan = runtime.plan_threads(processes=4, requested=3)
    assert plan.threads == 3 and plan.describe() == "torch threads: 3 (--threads)"
    with pytest.raises(UserError, match="--threads must be at least 1"):
        runtime.plan_threads(requested=0)


def test_cores_busy_with_other_work_are_left_to_it(four_cores):
    assert runtime.plan_threads(busy=1).threads == 3
    assert runtime.plan_threads(processes=2, busy=2).threads == 1
    assert runtime.plan_threads(busy=4).threads == 1  # never none
    assert "less 1 busy with other work" in runtime.plan_threads(busy=1).describe()
    assert runtime.plan_threads(busy=3, requested=2).threads == 2  # the user chose


class FakeProcess:
    def __init__(self, percent: float):
        self.percent = percent

    def cpu_percent(self, interval):
        return self.percent


def test_the_load_read_is_other_processes_not_this_one(four_cores, monkeypatch):
    import psutil

    monkeypatch.setattr(runtime.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.setattr(psutil, "cpu_percent", lambda interval, percpu: [100.0, 95.0, 30.0, 1.0])
    monkeypatch.setattr(psutil, "Process", lambda: FakeProcess(100.0))  # one core's worth is ours
    assert runtime.busy_cores_elsewhere(0.0) == 1
    monkeypatch.setattr(psutil, "Process", lambda: FakeProcess(0.0))
    assert runtime.busy_cores_elsewhere(0.0) == 2
    assert runtime.thread_plan().threads == 2  # 4 cores less 2 busy
    assert runtime.thread_plan(requested=4).threads == 4


def test_a_process_spinning_on_a_core_is_seen_as_busy():
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)
        assert runtime.busy_cores_elsewhere(0.5) >= 1
    finally:
        spinner.kill()
        spinner.wait()


def test_the_cores_are_the_ones_this_process_may_use():
    import os

    assert runtime.available_cores() == len(os.sched_getaffinity(0))


# The same 64 MB tensor allocated and freed 20 times, as a training step does with its logits; the
# minor page faults of that loop, in a fresh interpreter, with and without reuse_freed_memory(), once
# per window asked for.
PAGE_FAULTS = """
import resource, sys
import torch
from engine.runtime import reuse_freed_memory
took = reuse_freed_memory() if sys.argv[1] == "reuse" else None
for _ in range(10):  # warm up: the first rounds grow the heap (and any arena) once
    torch.ones(16, 1024, 1024).sum()
windows = []
for _ in range(int(sys.argv[2])):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):
        torch.ones(16, 1024, 1024).sum()
    windows.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(took, *windows)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's allocator")
def test_freed_tensors_are_reused_without_page_faults():
    def faults(mode: str, windows: int) -> tuple[str, list[int]]:
        out = subprocess.run([sys.executable, "-c", PAGE_FAULTS, mode, str(windows)], capture_output=True,
                             text=True, check=True, cwd=Path(__file__).resolve().parents[2]).stdout.split()
        return out[0], [int(count) for count in out[1:]]

    # Three windows with the heap kept, and their median: once in a full CI-like run (and never in 300 runs
    # alone) one window re-faulted 3 × 64 MB of heap pages (exactly 3 × 16,384, no mmap header page), a
    # disturbance from outside the loop; a broken reuse_freed_memory() re-faults every window.
    took, reused = faults("reuse", 3)
    _, (plain,) = faults("plain", 1)
    assert took == "True"
    # Each fresh 64 MB mmap faults in 16k pages again; the kept heap faulted them in the warm-up.
    assert plain > 20 * 16_000 * 0.8
    assert sorted(reused)[1] < plain / 10, reused


def test_omp_num_threads_is_the_users_choice_and_threads_wins_over_it(four_cores, monkeypatch):
    monkeypatch.setattr(runtime, "busy_cores_elsewhere", lambda: 0)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    plan = runtime.thread_plan()
    assert plan.threads == 1 and plan.describe() == "torch threads: 1 (OMP_NUM_THREADS)"
    assert runtime.thread_plan(requested=3).threads == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "lots")  # not a number: ignored, as torch ignores it
    assert runtime.thread_plan().threads == 4
