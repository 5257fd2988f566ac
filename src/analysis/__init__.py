"""Analysis: reads finished run folders; one statistics pipeline (report.py)."""
