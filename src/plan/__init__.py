"""The plan: a resolved spec as a graph of stage jobs (jobs.py)."""
