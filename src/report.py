"""The report over finished run folders, from the command line (src/analysis/report.py builds it):

    python -m src.report RUN_DIR [RUN_DIR ...] [--out DIR]
"""
import sys

from .analysis.report import main

if __name__ == "__main__":
    sys.exit(main())
