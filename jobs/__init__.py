"""Runnable job definitions (YAML) for `wintok tokenize --job`."""
