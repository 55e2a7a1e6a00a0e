"""Interrupts save. SIGTERM and SIGINT sent to a real `memlm train` process (finish the step,
save, say where, exit 143 / 130, resume bit-identical) are checked in tests/faults/test_faults.py
among the other faults; here: a second signal ends the process at once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_a_second_signal_ends_the_process_at_once():
    script = (
        "import os, signal\n"
        "from memlm.train.loop import StopSignals\n"
        "with StopSignals() as stops:\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    assert stops.received == signal.SIGTERM\n"
        "    print('first signal noted', flush=True)\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    print('still running after the second')\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=240,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == -signal.SIGTERM, proc.stdout + proc.stderr
    assert proc.stdout == "first signal noted\n"
    assert "SIGTERM received: finishing this step" in proc.stderr


def test_signals_keep_their_handlers_outside_training():
    from memlm.train.loop import StopSignals

    before = signal.getsignal(signal.SIGINT)
    with StopSignals():
        assert signal.getsignal(signal.SIGINT) is not before
    assert signal.getsignal(signal.SIGINT) is before
