"""Throughput harness: the model's limit, decode alone, this pipeline, and two peers, on one corpus.

Not a test: a tool anyone can run (`python -m benchmarks --help`). One run builds (or reuses) a
corpus of real JPEGs in webdataset tars under benchmarks/_work/ (`corpus`), runs each section
(`sections/`) in its own child process while sampling its memory and GPU (`harness`), and writes
results.json, a markdown table and a plot (`report`). `python -m benchmarks report RESULTS.json`
redraws the table and the plot from a results file. See benchmarks/RESULTS.md.

This module imports nothing heavy: tests import `benchmarks.corpus` for its picture generator.
"""

SECTIONS = ("limit", "decode", "inproc", "pipeline", "naive", "raydata", "scaling")


def log(msg: str) -> None:
    """A timestamped progress line on stderr."""
    import sys
    import time

    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)
