"""The tools around the three services: launcher, monitor, watcher, recorder, plot, benchmark.

Run each from the repository's top folder as ``python -m tools.<name> --help``.
"""
