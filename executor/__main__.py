from executor.cli import run

run()
