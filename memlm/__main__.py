from memlm.cli import run

run()
