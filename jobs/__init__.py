"""Runnable job definitions (YAML) for `wintok tokenize --job`, and their submission to a Ray
cluster through Ray Jobs (`wintok submit`, jobs/submit.py)."""
