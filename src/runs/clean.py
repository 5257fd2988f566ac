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
import os
import shutil
import sys
from pathlib import Path

from .runfolder import RunFolder
from .runlock import LOCK_NAME, RunFolderBusy, acquire

OTHERS_WARN_MIB = 256  # the CUDA context of this process itself takes a few hundred MiB at most


def gpu_report() -> dict:
    """Per visible GPU: name, free / total MiB from the driver, and the processes holding memory."""
    import torch  # clean.sh lists and removes runs without torch; only this report needs it
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


REPO_ROOT = Path(__file__).resolve().parents[2]


def is_run_folder(path: Path) -> bool:
    """A folder this toolkit wrote a run into: config.yaml with env.json or config.digest.json, or
    seeds.json (a --seeds run), seen without following a symbolic link."""
    if path.is_symlink() or not path.is_dir():
        return False
    names = {p.name for p in path.iterdir()}
    return ((RunFolder.CONFIG in names and bool(names & {RunFolder.ENV, RunFolder.DIGEST})) or RunFolder.SEEDS in names
            or is_reproduction(path))


def is_reproduction(path: Path) -> bool:
    """The output of benchmarks/reproduce_takd.py (--out): its configs/ holds the teachers' or students'
    config of a family and dataset (e.g. plain-cifar10-students.yaml)."""
    configs = path / "configs"
    return configs.is_dir() and not configs.is_symlink() and any(
        p.name.endswith(("-teachers.yaml", "-students.yaml")) for p in configs.iterdir())


def removal_problem(path: Path) -> str | None:
    """Why `path` must not be deleted by --remove, or None when it is a run folder."""
    if path.is_symlink():
        return f"{path} is a symbolic link: links are never followed; remove the link itself by hand if you mean it"
    if not path.exists():
        return f"not found: {path}"
    resolved = path.resolve()
    if resolved in (Path("/"), Path.home().resolve(), Path.cwd().resolve()) or REPO_ROOT.is_relative_to(resolved):
        return f"{path} is the root, your home, the current folder or holds the project: never deleted"
    if not is_run_folder(path):
        return (f"{path} is not a run folder (it has no config.yaml with env.json, nor seeds.json, nor a "
                f"reproduction's configs/): only run folders are deleted")
    return None


def find_run_folders(root: Path) -> list:
    """Every run folder below `root` (a run folder's own sub-folders are not searched; links not followed)."""
    found, stack = [], [root]
    while stack:
        folder = stack.pop()
        for child in sorted(folder.iterdir()) if folder.is_dir() and not folder.is_symlink() else []:
            if is_run_folder(child):
                found.append(child)
            elif child.is_dir() and not child.is_symlink():
                stack.append(child)
    return sorted(found)


def _remove(targets: list, yes: bool) -> int:
    problems = [removal_problem(t) for t in targets]
    problems = [p for p in problems if p]
    if problems:
        print(f"error: {problems[0]}" + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else "")
              + "; nothing deleted", file=sys.stderr)
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
    try:
        locks = claim_all(targets)
    except RunFolderBusy as exc:
        print(f"error: {exc}; nothing deleted", file=sys.stderr)
        return 2
    try:
        for t in targets:
            shutil.rmtree(t)  # rmtree removes links inside the folder, never what they point to
    finally:
        for lock in locks:
            lock.release()
    print(f"Deleted {len(targets)} run folder(s).")
    return 0


def claim_all(targets: list) -> list:
    """The run lock of every target and of every run inside it (the seeds of a --seeds run, each
    seed of a reproduction), taken before anything is deleted: a folder a live process trains in
    is refused, naming that process, and nothing at all is deleted. Raises RunFolderBusy."""
    held = []
    try:
        for t in targets:
            folders = [t, *sorted({p.parent for p in t.rglob(LOCK_NAME)} - {t})]
            for folder in folders:
                held.append(acquire(folder, "deleting it"))
    except RunFolderBusy:
        for lock in held:
            lock.release()
        raise
    return held


def main(argv=None) -> int:
    p = argparse.ArgumentParser(allow_abbrev=False,
        prog="clean.sh",
        description="Between runs: report each GPU's free memory and the processes holding it (warning when "
                    "another process still holds memory: a new process cannot free it, stop that process), "
                    "reset peak-memory statistics, and optionally remove run folders.")
    p.add_argument("--runs", type=Path, default=None, help="the folder --remove-all searches (set by clean.sh: runs/)")
    p.add_argument("--remove", type=Path, action="append", default=[], metavar="RUN_DIR",
                   help="delete this run folder (repeatable); only folders holding a run (config.yaml with env.json, "
                        "or seeds.json) are deleted, never a file, a symbolic link or anything else; asks first "
                        "unless --yes")
    p.add_argument("--remove-all", action="store_true",
                   help="delete every run folder under runs/ (both chains, wherever the README's commands put them: "
                        "runs/cnn, runs/demo, runs/takd, ...); lists them and asks first unless --yes")
    p.add_argument("--data-cache", action="store_true",
                   help="also delete .data_cache/ in the project (image trees unpacked from a .tar.gz data root and "
                        "their decoded tensors: rebuilt on the next run that needs them); its size is always shown")
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
    cache = REPO_ROOT / ".data_cache"
    if cache.is_dir():
        size = sum(f.stat().st_size for f in cache.rglob("*") if f.is_file() and not f.is_symlink())
        print(f"Data cache {cache}: {size / 2**20:,.0f} MB" + ("" if args.data_cache else " (--data-cache deletes it)"))
    if args.data_cache and cache.is_dir():
        if not args.yes and not sys.stdin.isatty():
            print("error: not a terminal, pass --yes to confirm deletion", file=sys.stderr)
            return 2
        if args.yes or input(f"Delete {cache}? [y/N] ").strip().lower() in ("y", "yes"):
            shutil.rmtree(cache)
            print(f"Deleted {cache}.")
        else:
            print("Data cache kept.")
    targets = [Path(os.path.abspath(t.expanduser())) for t in args.remove]  # absolute, links not resolved
    if args.remove_all:
        if args.runs is None or not args.runs.is_dir():
            print(f"error: --remove-all: no runs folder at {args.runs}", file=sys.stderr)
            return 2
        targets += find_run_folders(args.runs)
    if targets:
        return _remove(targets, args.yes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
