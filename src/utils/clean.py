"""Between runs: show what each GPU holds and who holds it, and remove run folders.

What this can and cannot do: GPU memory belongs to the process that allocated it, and a new
process cannot free another one's. So this reports, per GPU, the driver's free / total memory
(cudaMemGetInfo) and the processes holding memory, warns when some other process (a stale
training run, a notebook) still holds any, and resets this process's peak statistics. A
training run empties its own cache and resets its peak counters at every stage and epoch.

    bash cnn_distillation/clean.sh [--remove RUN_DIR ...] [--remove-all] [--yes]
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

OTHERS_WARN_MIB = 256  # the CUDA context of this process itself takes a few hundred MiB at most


def gpu_report() -> dict:
    """Per visible GPU: name, free / total MiB from the driver, and the processes holding memory."""
    import torch
    if not torch.cuda.is_available():
        return {"cuda": False, "devices": []}
    out = {"cuda": True, "devices": []}
    for i in range(torch.cuda.device_count()):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(i)
        free, total = torch.cuda.mem_get_info(i)
        try:
            processes = torch.cuda.list_gpu_processes(i)
        except Exception as exc:  # needs pynvml / amdsmi; the free figure still tells the story
            processes = f"(process list unavailable: {exc})"
        own = torch.cuda.memory_reserved(i)
        out["devices"].append({"index": i, "name": torch.cuda.get_device_name(i), "free_mib": free / 2**20,
                               "total_mib": total / 2**20, "others_mib": max(0.0, (total - free - own) / 2**20),
                               "processes": processes})
    return out


def _remove(targets: list, yes: bool) -> int:
    missing = [t for t in targets if not t.exists()]
    if missing:
        print(f"error: not found: {', '.join(map(str, missing))}", file=sys.stderr)
        return 2
    if not targets:
        print("Nothing to remove.")
        return 0
    print(f"About to delete {len(targets)} item(s):")
    for t in targets[:20]:
        print(f"  {t}")
    if len(targets) > 20:
        print(f"  ... and {len(targets) - 20} more")
    if not yes:
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="clean.sh",
        description="Between runs: report each GPU's free memory and the processes holding it (warning when "
                    "another process still holds memory: a new process cannot free it, stop that process), "
                    "reset peak-memory statistics, and optionally remove run folders.")
    p.add_argument("--runs", type=Path, default=None, help="this chain's runs folder (set by clean.sh)")
    p.add_argument("--remove", type=Path, action="append", default=[], metavar="RUN_DIR",
                   help="delete this run folder (repeatable); asks first unless --yes")
    p.add_argument("--remove-all", action="store_true", help="delete everything under the chain's runs folder")
    p.add_argument("--yes", action="store_true", help="do not ask before deleting")
    args = p.parse_args(argv)
    info = gpu_report()
    if not info["cuda"]:
        print("No CUDA device visible: no GPU memory to report.")
    warn = False
    for d in info["devices"]:
        print(f"GPU {d['index']} ({d['name']}): {d['free_mib']:.0f} of {d['total_mib']:.0f} MiB free; "
              f"peak statistics reset")
        if d["others_mib"] > OTHERS_WARN_MIB:
            warn = True
            print(f"  ⚠️  {d['others_mib']:.0f} MiB are held by other processes (this one cannot free them):")
            for line in str(d["processes"]).splitlines()[1:]:
                print(f"     {line}")
    if warn:
        print("  Stop those processes (or wait for them) before the next run to have the whole budget.")
    targets = [t.expanduser().resolve() for t in args.remove]
    if args.remove_all:
        if args.runs is None or not args.runs.is_dir():
            print(f"error: --remove-all: no runs folder at {args.runs}", file=sys.stderr)
            return 2
        targets += sorted(args.runs.iterdir())
    if targets:
        return _remove(targets, args.yes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
