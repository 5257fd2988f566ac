"""Run folders: their layout (runfolder.py), their locks (runlock.py), their removal (clean.py)."""
