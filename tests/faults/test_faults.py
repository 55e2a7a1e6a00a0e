"""Faults at random moments of a real `memlm train` run: SIGTERM, SIGINT, SIGKILL, the disk
turned read-only, the disk full. After each the committed checkpoint is intact (its sha256
match), a signal saved the step it was in and said where, a disk fault was one line and exit 2;
resumed to the end, the run is bit-identical to one that never failed. bench/faults.py runs
the same with many more faults (MEMLM_FAULT_SEED picks other moments here)."""

from __future__ import annotations

import os
import random

import pytest

from .harness import SIGNALS, TinyRun, assert_same_run, finish, inject, mount_disk, reference, unmount

SEED = int(os.environ.get("MEMLM_FAULT_SEED", "15"))

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def spec(corpus, tokenizer_dir) -> TinyRun:
    return TinyRun(corpus, tokenizer_dir, steps=40)


@pytest.fixture(scope="module")
def uninterrupted(spec, tmp_path_factory):
    return reference(spec, tmp_path_factory.mktemp("reference") / "run")


@pytest.mark.slow
def test_signals_kills_and_disk_faults_at_random_moments(spec, uninterrupted, tmp_path):
    rng = random.Random(SEED)
    disk = mount_disk(tmp_path / "disk")  # None where mounting is not allowed: no disk faults then
    faults = ["SIGTERM", "SIGKILL", "read-only", "SIGINT", "full"]
    if disk is None:
        faults = [f for f in faults if f in SIGNALS]
    run = (disk.mount_point if disk else tmp_path) / "run"
    try:
        for i, fault in enumerate(faults):
            if inject(spec, run, fault, rng, tmp_path / f"life-{i}.log", disk).get("finished_first"):
                break  # no steps left to fault
        finish(spec, run, tmp_path / "last.log")
        assert_same_run(run, uninterrupted)
    finally:
        if disk is not None:
            unmount(disk)


def test_disk_faults_are_injected_here(tmp_path):
    disk = mount_disk(tmp_path / "disk")
    if disk is None:
        pytest.skip("cannot mount a tmpfs here (needs root): the run above had no disk faults")
    unmount(disk)
