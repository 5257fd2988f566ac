"""Between runs (spec fix 11): empty the CUDA cache, reset peak-memory statistics, report how
much GPU memory is free, and optionally remove run folders after confirmation.

A new process cannot free memory that another process holds; what it can do is show it:
the free / total figures come from the driver (cudaMemGetInfo), so memory still held by a
stale training process shows up here. Harmless without a GPU.

    python -m src.utils.clean [--runs DIR] [--remove] [--yes]
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path


def clean_cuda() -> dict:
    import torch
    if not torch.cuda.is_available():
        return {"cuda": False}
    out = {"cuda": True, "devices": []}
    for i in range(torch.cuda.device_count()):
        with torch.cuda.device(i):
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            free, total = torch.cuda.mem_get_info()
            out["devices"].append({"index": i, "name": torch.cuda.get_device_name(i),
                                   "free_mib": free / 2**20, "total_mib": total / 2**20,
                                   "peak_after_reset_mib": torch.cuda.max_memory_allocated() / 2**20})
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], prog="clean.sh")
    p.add_argument("--runs", type=Path, default=None, help="run folder(s) parent to remove with --remove")
    p.add_argument("--remove", action="store_true", help="delete the run outputs under --runs (asks first)")
    p.add_argument("--yes", action="store_true", help="do not ask before deleting")
    args = p.parse_args(argv)
    info = clean_cuda()
    if not info["cuda"]:
        print("No CUDA device: nothing to clear (CUDA cache and peak statistics only exist on a GPU).")
    for d in info.get("devices", []):
        used = d["total_mib"] - d["free_mib"]
        print(f"GPU {d['index']} ({d['name']}): CUDA cache emptied, peak statistics reset "
              f"(peak now {d['peak_after_reset_mib']:.0f} MiB); {d['free_mib']:.0f} of {d['total_mib']:.0f} MiB free"
              + (f" — {used:.0f} MiB held by other processes" if used > 512 else ""))
    if args.remove:
        runs = args.runs
        if runs is None or not runs.is_dir():
            print(f"error: --remove needs an existing --runs folder (got {runs})", file=sys.stderr)
            return 2
        targets = sorted(p for p in runs.iterdir())
        if not targets:
            print(f"{runs} is already empty.")
            return 0
        print(f"About to delete {len(targets)} item(s) under {runs}:")
        for t in targets[:20]:
            print(f"  {t.name}")
        if not args.yes:
            if not sys.stdin.isatty():
                print("error: not a terminal, pass --yes to confirm deletion", file=sys.stderr)
                return 2
            if input("Delete them? [y/N] ").strip().lower() not in ("y", "yes"):
                print("Nothing deleted.")
                return 0
        for t in targets:
            shutil.rmtree(t) if t.is_dir() else t.unlink()
        print(f"Deleted {len(targets)} item(s).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
