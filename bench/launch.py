"""Run a command and write its peak resident memory (KiB) to a file: `python launch.py OUT CMD...`.

Why a launcher: on Linux a process's ru_maxrss starts from the high-water mark of the memory it
replaced at exec. Python's subprocess starts children with vfork + exec, so a child of a large
process (a benchmark that has loaded a model, a test runner) reports at least its PARENT's peak;
fork + exec reports at least the parent's resident set at the fork. This script is a small
interpreter (~10 MiB): the command it forks starts from that, so wait4's ru_maxrss is the
command's own peak (VmHWM) from start to exit, with its waited-for children (torchrun's ranks).

SIGINT and SIGTERM are passed on to the command; the exit status is the command's (128 + N when
it was killed by signal N).
"""

import os
import signal
import sys


def main() -> None:
    out, argv = sys.argv[1], sys.argv[2:]
    pid = os.fork()
    if pid == 0:
        try:
            os.execvp(argv[0], argv)
        finally:
            os._exit(127)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda number, frame: os.kill(pid, number))
    _, status, usage = os.wait4(pid, 0)
    with open(out, "w") as f:
        f.write(str(usage.ru_maxrss))
    code = os.waitstatus_to_exitcode(status)
    sys.exit(code if code >= 0 else 128 - code)


if __name__ == "__main__":
    main()
