"""The spec: a chain as data (config.py) and its expansion into seeds, paths and methods (sweep.py)."""
