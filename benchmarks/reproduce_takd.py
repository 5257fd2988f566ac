"""Reproduce the TAKD paper's CIFAR tables (Mirzadeh et al. 2020) with an honest protocol.

    python benchmarks/reproduce_takd.py --slice cpu                      # plain CNN 10 -> 4 -> 2, CIFAR-10, 3 seeds
    python benchmarks/reproduce_takd.py --data-root cifar10=DIR --data-root cifar100=DIR   # everything, 150 epochs
    python benchmarks/reproduce_takd.py --tables table1 --families resnet --datasets cifar10 --seeds 0,1,2,3,4
    python benchmarks/reproduce_takd.py ... --resume                     # after any stop: same command plus --resume

For each family and dataset the teacher and every assistant are trained once (one run), then
every student (no KD, direct KD from the teacher, TAKD through each assistant) once per seed,
the students of a seed starting from the same weights and seeing the same batches. Each run is
an ordinary run folder of this toolkit (config.yaml, logs, checkpoints, predictions, report)
under --out; the tables land in --results (CSV and markdown).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pandas as pd  # noqa: E402
import yaml  # noqa: E402

from benchmarks.takd_tables import PUBLISHED_SOURCE, Comparison, paired_correct, published, summarise  # noqa: E402
from src.distillation.config import apply_override, from_dict  # noqa: E402
from src.utils.errors import UserError  # noqa: E402
from src.utils.runfolder import RunFolder  # noqa: E402
from src.utils.stats import mcnemar_exact, t_interval  # noqa: E402

# Declared before any run and used for every row: never chosen by looking at test accuracy.
# Both are points of the paper's own search grid (T in {1, 2, 5, 10, 15, 20}, lambda in [0.05, 1]).
TEMPERATURE, KD_WEIGHT = 5.0, 0.5
PAPER_EPOCHS = 150
FAMILIES = {
    # the paper's plain CNNs: a constant LR (0.01 as in the authors' code), no weight decay
    "plain": {"teacher": "plain_cnn10", "student": "plain_cnn2", "table1_assistant": "plain_cnn4",
              "assistants": ["plain_cnn4", "plain_cnn6", "plain_cnn8"],
              "train": {"lr": 0.01, "schedule": "constant", "weight_decay": 0.0}},
    # He et al.'s CIFAR ResNets: LR 0.1 divided by 10 at epochs 80 and 120 (of 150), weight decay 1e-4
    "resnet": {"teacher": "cifar_resnet110", "student": "cifar_resnet8", "table1_assistant": "cifar_resnet20",
               "assistants": ["cifar_resnet14", "cifar_resnet20", "cifar_resnet32", "cifar_resnet56"],
               "train": {"lr": 0.1, "schedule": "step", "milestones": [80, 120], "weight_decay": 1e-4}},
}
DATASETS = ("cifar10", "cifar100")
TABLES = ("table1", "assistants")
SLICES = {"cpu": {"families": ["plain"], "datasets": ["cifar10"], "tables": ["table1"], "seeds": [0, 1, 2],
                  "epochs": 15, "teacher_epochs": 8, "compile": "false",  # compiled is slower on a 2-core CPU
                  "data_root": {"cifar10": str(ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz")}}}

PROTOCOL = f"""Protocol (the same for every row, fixed before any run):
  - The paper's recipe where it states one: SGD with Nesterov momentum 0.9, batch 128, {PAPER_EPOCHS} epochs;
    ResNets: LR 0.1 divided by 10 at epochs 80 and 120, weight decay 1e-4; plain CNNs: a constant
    LR (0.01, the authors' code) and no weight decay. No warm-up, no gradient clipping, no label
    smoothing, no augmentation (the authors' code trains without it).
  - One temperature T = {TEMPERATURE:g} and KD weight lambda = {KD_WEIGHT:g} for every distilled model
    (loss (1 - lambda) CE + lambda T^2 KL), declared before any run.
  - Model selection on a validation split (10% of train, fixed split seed) carved from train; the
    test split is read once per model, on its best-validation checkpoint.
  - Teacher and assistants trained once; each student once per seed, the students of a seed
    from the same initial weights and batches. Per seed, exact McNemar tests on the test images
    (TAKD vs direct KD, direct KD vs no KD), Holm-corrected across every test of the report; over
    seeds, the mean difference with a Student-t 95% interval, and a verdict in words."""


def deviations(epochs: int, teacher_epochs: int, datasets, families) -> list:
    """Every way this protocol differs from the paper's, for the output."""
    out = [
        "model selection: the paper reports the best test accuracy over epochs and over its hyper-parameter "
        "search; here the checkpoint is chosen on a validation split, so 10% fewer training images are used",
        f"per-row tuning: the paper searches T and lambda per row (its NNI search); here T = {TEMPERATURE:g}, "
        f"lambda = {KD_WEIGHT:g} for every row",
        "KD term: the authors' code averages the KL over classes as well (KLDivLoss's 'mean'), which scales its "
        "KD term by 1/classes; here the KL is per sample (Hinton's T^2 scale)",
        "weight decay is not applied to biases and batch-norm parameters (the paper's SGD decays every parameter)",
    ]
    if epochs != PAPER_EPOCHS or teacher_epochs != PAPER_EPOCHS:
        out.append(f"epochs: {teacher_epochs} for the teacher, {epochs} for assistants and students (the paper: "
                   f"{PAPER_EPOCHS}); ResNet LR milestones scaled to the same fractions of the run")
    if "cifar100" in datasets and "plain" in families:
        out.append("plain CNNs on CIFAR-100 use the CIFAR-10 widths with a 100-way head")
    return out


# ------------------------------------------------------------------------------------------ configs
def milestones(family: str, epochs: int) -> list:
    ms = FAMILIES[family]["train"].get("milestones", [])
    scaled = sorted({max(1, round(m * epochs / PAPER_EPOCHS)) for m in ms})
    return [m for m in scaled if m < epochs] or ([max(1, epochs // 2)] if ms else [])


def base_config(name: str, family: str, dataset: str, epochs: int, data: dict, args) -> dict:
    fam = FAMILIES[family]["train"]
    train = {"epochs": epochs, "batch_size": 128, "optimizer": "sgd", "momentum": 0.9, "lr": fam["lr"],
             "role_lr": False, "weight_decay": fam["weight_decay"], "schedule": fam["schedule"],
             "warmup_epochs": 0.0, "grad_clip": 0.0, "label_smoothing": 0.0, "compile": args.compile,
             "device": args.device}
    if fam["schedule"] == "step":
        train.update(lr_milestones=milestones(family, epochs), lr_gamma=0.1)
    return {"name": name, "seed": 0, "deterministic": True,
            "data": {"source": data["source"], "root": data["root"], "image_size": 32, "val_fraction": 0.1,
                     "split_seed": 0, "augment": "none", "normalize": "cifar"},
            "train": train, "kd": {"temperature": TEMPERATURE, "alpha_start": KD_WEIGHT, "alpha_end": KD_WEIGHT},
            "stages": []}


def group_models(family: str, tables: list) -> tuple[str, list, str]:
    """Teacher, the assistants the selected tables need (in the paper's order), student."""
    fam = FAMILIES[family]
    assistants = fam["assistants"] if "assistants" in tables else [fam["table1_assistant"]]
    return fam["teacher"], assistants, fam["student"]


def ta_stage(model: str) -> str:
    return f"ta_{model}"


def student_stage(family: str, assistant: str) -> str:
    """The Table-1 assistant's student is `student` (the report's TAKD student); others name theirs."""
    return "student" if assistant == FAMILIES[family]["table1_assistant"] else f"student_via_{assistant}"


def teachers_config(family, dataset, tables, teacher_epochs, epochs, data, args) -> dict:
    teacher, assistants, _ = group_models(family, tables)
    cfg = base_config(f"takd-{family}-{dataset}-teachers", family, dataset, epochs, data, args)
    cfg["stages"] = [{"name": "teacher", "model": teacher, "role": "teacher", "epochs": teacher_epochs}]
    if FAMILIES[family]["train"]["schedule"] == "step" and teacher_epochs != epochs:
        raise UserError("ResNet milestones follow the run's epochs: use the same --epochs and --teacher-epochs "
                        "for the resnet family")
    cfg["stages"] += [{"name": ta_stage(a), "model": a, "role": "assistant", "teacher": "teacher"} for a in assistants]
    return cfg


def students_config(family, dataset, tables, epochs, teachers_dir: Path, data, args) -> dict:
    teacher, assistants, student = group_models(family, tables)
    cfg = base_config(f"takd-{family}-{dataset}-students", family, dataset, epochs, data, args)
    stream = {"model": student, "role": "student", "seed_stream": "student"}
    cfg["stages"] = (
        [{"name": "teacher", "model": teacher, "role": "teacher", "checkpoint": str(RunFolder(teachers_dir).stage("teacher").best)}]
        + [{"name": ta_stage(a), "model": a, "role": "assistant",
            "checkpoint": str(RunFolder(teachers_dir).stage(ta_stage(a)).best)} for a in assistants]
        + [{"name": "student_scratch", **stream}, {"name": "student_kd", "teacher": "teacher", **stream}]
        + [{"name": student_stage(family, a), "teacher": ta_stage(a), **stream} for a in assistants])
    return cfg


def finalise(raw: dict, overrides: list) -> dict:
    """Apply --set overrides and check the config as the trainer will."""
    for item in overrides:
        apply_override(raw, item)
    from_dict(raw)
    return raw


# ------------------------------------------------------------------------------------------ running
def run_done(run_dir: Path, stages: list, seeds=None) -> bool:
    dirs = [RunFolder(run_dir).seed_folder(s) for s in seeds] if seeds else [RunFolder(run_dir)]
    return all(d.stage(s["name"]).finished for d in dirs for s in stages)


def train(config_path: Path, run_dir: Path, seeds, verbose: bool) -> int:
    """One chain through the toolkit's own command line: a new run, or the interrupted one resumed."""
    started = RunFolder(run_dir).is_run
    cmd = [sys.executable, "-m", "cnn_distillation.train_cnn", "--no-progress"]
    cmd += ["--resume", str(run_dir)] if started else ["--config", str(config_path), "--output-dir", str(run_dir)]
    if seeds and not started:
        cmd += ["--seeds", ",".join(map(str, seeds))]
    if verbose:
        cmd.append("--verbose")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env)
    try:
        return proc.wait()
    except KeyboardInterrupt:  # the child got the same Ctrl-C: it saves and exits with its own code
        return proc.wait()


def plan_runs(args) -> list:
    """[(label, config dict, run folder, seeds or None)] in training order."""
    runs = []
    for dataset in args.datasets:
        data = data_for(dataset, args)
        for family in args.families:
            group = args.out / f"{family}-{dataset}"
            teachers = finalise(teachers_config(family, dataset, args.tables, args.teacher_epochs, args.epochs, data,
                                                args), args.overrides)
            students = finalise(students_config(family, dataset, args.tables, args.epochs, group / "teachers", data,
                                                args), args.overrides)
            runs.append((f"{family}-{dataset} teacher and assistants", teachers, group / "teachers", None))
            runs.append((f"{family}-{dataset} students, seeds {','.join(map(str, args.seeds))}", students,
                         group / "students", args.seeds))
    return runs


def data_for(dataset: str, args) -> dict:
    root = args.data_root.get(dataset)
    if args.data_source:
        return {"source": args.data_source, "root": root or "data"}
    if root:
        return {"source": "imagefolder", "root": root}
    return {"source": dataset, "root": str(ROOT / "data" / dataset)}  # torchvision's download (needs a network)


def write_configs(runs, args) -> None:
    """Each run's config under OUT/configs; on --resume it must equal the one the run started with."""
    folder = args.out / "configs"
    folder.mkdir(parents=True, exist_ok=True)
    for label, raw, run_dir, seeds in runs:
        path = folder / f"{run_dir.parent.name}-{run_dir.name}.yaml"
        text = yaml.safe_dump(raw, sort_keys=False)
        if path.exists() and path.read_text() != text:
            raise UserError(f"{path.name}: this command asks for other settings than the reproduction in {args.out} "
                            f"started with (epochs, seeds, data, --set); --resume continues it as it was: "
                            f"give the same options, or choose a new --out")
        if not path.exists():
            path.write_text(text)


# ------------------------------------------------------------------------------------------ results
def seed_dirs(students_dir: Path, seeds) -> list:
    folder = RunFolder(students_dir)
    return [(s, folder.seed_folder(s).path) for s in seeds if folder.seed_folder(s).finished]


def collect(args) -> tuple[pd.DataFrame, pd.DataFrame, list]:
    """Rows of the tables (ours next to the paper's) and the paired comparisons, from the run folders."""
    rows, comparisons, context = [], [], []
    for dataset in args.datasets:
        for family in args.families:
            group = args.out / f"{family}-{dataset}"
            teacher, assistants, student = group_models(family, args.tables)
            t1 = FAMILIES[family]["table1_assistant"]
            summary = RunFolder(group / "teachers").summary_csv
            if summary.exists():
                single = pd.read_csv(summary).set_index("stage")["test_accuracy"]
                context.append(f"{family}, {dataset}: teacher {teacher} {100 * single.get('teacher', float('nan')):.2f}%"
                               + "".join(f", assistant {a} {100 * single.get(ta_stage(a), float('nan')):.2f}%"
                                         for a in assistants) + " (trained once)")
            seeds = seed_dirs(group / "students", args.seeds)
            if not seeds:
                continue
            acc = {s: pd.read_csv(RunFolder(d).summary_csv).set_index("stage")["test_accuracy"] * 100 for s, d in seeds}
            preds = lambda d, stage: pd.read_csv(RunFolder(d).stage(stage).predictions)  # noqa: E731
            entries = [("NOKD", "student_scratch", None), ("BLKD", "student_kd", None)]
            entries += [("TAKD" if a == t1 else f"TAKD, assistant {a}", student_stage(family, a), a) for a in assistants]
            for table in args.tables:
                for row, stage, assistant in entries:
                    if table == "table1" and assistant not in (None, t1):
                        continue
                    values = [acc[s][stage] for s, _ in seeds if stage in acc[s]]
                    mean, lo, hi = t_interval(values) if values else (float("nan"),) * 3
                    rows.append({"table": table, "family": family, "dataset": dataset, "row": row, "stage": stage,
                                 "teacher": teacher, "assistant": assistant or "", "student": student,
                                 "published": published(table, family, dataset, "TAKD" if assistant else row, t1,
                                                        assistant),
                                 "source": PUBLISHED_SOURCE[table], "ours_mean": mean, "ours_lo": lo, "ours_hi": hi,
                                 "seeds": len(values), "per_seed": ";".join(f"{v:.2f}" for v in values),
                                 "epochs": args.epochs, "teacher_epochs": args.teacher_epochs})
            pairs = [("TAKD - BLKD" if a == t1 else f"TAKD(assistant {a}) - BLKD", student_stage(family, a), "student_kd",
                      a) for a in assistants if "assistants" in args.tables or a == t1]
            pairs.append(("BLKD - NOKD", "student_kd", "student_scratch", None))
            for name, a_stage, b_stage, assistant in pairs:
                diffs, ps = [], []
                for s, d in seeds:
                    ca, cb = paired_correct(preds(d, a_stage), preds(d, b_stage))
                    diffs.append(100 * (ca.mean() - cb.mean()))
                    ps.append(mcnemar_exact(ca, cb)["p_value"])
                pa = published("table1", family, dataset, "TAKD" if assistant else "BLKD", t1, assistant)
                pb = published("table1", family, dataset, "BLKD" if assistant else "NOKD", t1, None)
                gap = None if pa is None or pb is None else round(pa - pb, 2)
                comparisons.append((family, dataset, Comparison(name, diffs, ps, gap)))
    summaries = summarise([c for _, _, c in comparisons])
    tests = pd.DataFrame([{"family": f, "dataset": d, **s} for (f, d, _), s in zip(comparisons, summaries)])
    return pd.DataFrame(rows), tests, context


def _interval(mean, lo, hi) -> str:
    if pd.isna(mean):
        return "-"
    return f"{mean:.2f}" + (f" [{lo:.2f}, {hi:.2f}]" if pd.notna(lo) else " (one seed)")


def markdown(table: pd.DataFrame, tests: pd.DataFrame, context: list, args, wall_s: float) -> str:
    lines = ["# TAKD reproduction (Mirzadeh et al. 2020)", "", "```", PROTOCOL, "```", "",
             "Deviations from the paper:", *[f"- {d}" for d in deviations(args.epochs, args.teacher_epochs,
                                                                          args.datasets, args.families)], "",
             f"Seeds {','.join(map(str, args.seeds))}; teacher {args.teacher_epochs} epochs, assistants and students "
             f"{args.epochs}; wall time of this command {wall_s / 60:.1f} min.", ""]
    lines += [f"- {c}" for c in context] + [""]
    if not table.empty:
        lines += ["| table | family | dataset | row | paper (%) | ours: mean [95% t interval] (%) | per seed |",
                  "|---|---|---|---|---|---|---|"]
        for r in table.itertuples():
            paper = f"{r.published:.2f}" if pd.notna(r.published) else "not transcribed"
            lines.append(f"| {r.table} | {r.family} | {r.dataset} | {r.row} | {paper} | "
                         f"{_interval(r.ours_mean, r.ours_lo, r.ours_hi)} | {r.per_seed} |")
        lines.append("")
    if not tests.empty:
        lines += ["| family | dataset | comparison | paper (pp) | ours: mean [95% t] (pp) | per seed: diff, McNemar p "
                  "(Holm) | verdict |", "|---|---|---|---|---|---|---|"]
        for r in tests.itertuples():
            per = "; ".join(f"{d:+.2f}, p={p:.3g} ({ph:.3g})" for d, p, ph in zip(r.diffs, r.p, r.p_holm))
            gap = f"{r.paper_gap:+.2f}" if r.paper_gap is not None and pd.notna(r.paper_gap) else "-"
            lines.append(f"| {r.family} | {r.dataset} | {r.comparison} | {gap} | {_interval(r.mean, r.lo, r.hi)} | "
                         f"{per} | **{r.verdict}** ({r.significant_seeds}/{r.seeds} seeds significant after Holm) |")
        lines += ["", "Verdicts: " + "; ".join(sorted(set(tests["words"]))) + "."]
    return "\n".join(lines) + "\n"


def write_results(args, wall_s: float) -> Path:
    table, tests, context = collect(args)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.results, index=False, float_format="%.4f")
    if not tests.empty:
        flat = tests.assign(**{c: tests[c].map(lambda v: ";".join(f"{float(x):.4g}" for x in v))
                               for c in ("diffs", "p", "p_holm")})
        flat.to_csv(args.results.with_name(args.results.stem + "_tests.csv"), index=False, float_format="%.4g")
    md = args.results.with_suffix(".md")
    md.write_text(markdown(table, tests, context, args, wall_s))
    return md


# ------------------------------------------------------------------------------------------ command line
def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=PROTOCOL,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--slice", choices=sorted(SLICES), help="a preset part: cpu = plain CNN 10 -> 4 -> 2 on CIFAR-10 "
                   "(the JPEG tree in ../shared/data), 3 seeds, epochs that fit 45 minutes on a 2-core CPU")
    p.add_argument("--tables", default=None, help=f"comma-separated, of {', '.join(TABLES)} (default: both)")
    p.add_argument("--families", default=None, help="comma-separated, of plain, resnet (default: both)")
    p.add_argument("--datasets", default=None, help="comma-separated, of cifar10, cifar100 (default: both)")
    p.add_argument("--epochs", type=int, default=None, help=f"epochs of assistants and students (default {PAPER_EPOCHS})")
    p.add_argument("--teacher-epochs", type=int, default=None, help="epochs of the teacher (default: --epochs)")
    p.add_argument("--seeds", default=None, help="comma-separated student seeds (default 0,1,2)")
    p.add_argument("--data-root", action="append", default=[], metavar="[DATASET=]PATH",
                   help="an ImageFolder tree or its .tar.gz for a dataset (cifar10=PATH); without it torchvision "
                        "downloads CIFAR into data/ (needs a network)")
    p.add_argument("--data-source", default=None, help="override the data source for every dataset (tests: digits)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--compile", default=None, choices=("auto", "true", "false"),
                   help="torch.compile (default auto: kept where it measures faster and pays off)")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "takd_reproduction", help="where the run folders go")
    p.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results" / "takd_reproduction.csv",
                   help="the table (CSV; the markdown and the tests' CSV are written beside it)")
    p.add_argument("--resume", action="store_true", help="continue the reproduction in --out after any stop")
    p.add_argument("--report-only", action="store_true", help="rebuild the tables from the runs in --out, train nothing")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for every run (recorded in its config), e.g. --set data.max_train_samples=500")
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args(argv)
    preset = SLICES.get(args.slice, {})
    split = lambda v, default: [x.strip() for x in v.split(",") if x.strip()] if v else list(default)  # noqa: E731
    args.tables = split(args.tables, preset.get("tables", TABLES))
    args.families = split(args.families, preset.get("families", FAMILIES))
    args.datasets = split(args.datasets, preset.get("datasets", DATASETS))
    for given, valid, what in ((args.tables, TABLES, "table"), (args.families, FAMILIES, "family"),
                               (args.datasets, DATASETS, "dataset")):
        bad = [x for x in given if x not in valid]
        if bad or not given:
            raise UserError(f"unknown {what} {bad or given}; choose from {', '.join(valid)}")
    args.seeds = [int(s) for s in split(args.seeds, map(str, preset.get("seeds", [0, 1, 2])))]
    args.epochs = args.epochs or preset.get("epochs", PAPER_EPOCHS)
    args.compile = args.compile or preset.get("compile", "auto")
    args.teacher_epochs = args.teacher_epochs or preset.get("teacher_epochs", args.epochs)
    roots = dict(preset.get("data_root", {}))
    for item in args.data_root:
        name, _, path = item.rpartition("=")
        if not name and len(args.datasets) > 1:
            raise UserError(f"--data-root {item}: name the dataset (cifar10=PATH) when several are selected")
        roots[name or args.datasets[0]] = str(Path(path).expanduser().resolve())
    args.data_root = roots
    args.out, args.results = args.out.expanduser().resolve(), args.results.expanduser().resolve()
    return args


def main(argv=None) -> int:
    try:
        args = parse_args(argv)
        runs = plan_runs(args)
        if not args.report_only:
            if args.out.exists() and any(args.out.iterdir()) and not args.resume:
                raise UserError(f"{args.out} holds a reproduction already: add --resume to continue it, or choose "
                                f"another --out")
            write_configs(runs, args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(PROTOCOL, flush=True)
    t0 = time.perf_counter()
    timings_path = args.out / "timings.json"
    timings = json.loads(timings_path.read_text()) if timings_path.exists() else {}
    for i, (label, raw, run_dir, seeds) in enumerate([] if args.report_only else runs):
        if run_done(run_dir, raw["stages"], seeds):
            print(f"[{i + 1}/{len(runs)}] {label}: finished earlier", flush=True)
            continue
        print(f"\n[{i + 1}/{len(runs)}] {label} -> {run_dir}", flush=True)
        t_run = time.perf_counter()
        code = train(args.out / "configs" / f"{run_dir.parent.name}-{run_dir.name}.yaml", run_dir, seeds, args.verbose)
        timings[label] = round(timings.get(label, 0.0) + time.perf_counter() - t_run, 1)
        timings_path.write_text(json.dumps(timings, indent=2))
        if code != 0:
            print(f"stopped ({label}, exit {code}); continue with the same command plus --resume", file=sys.stderr)
            return code
    wall = sum(timings.values()) if timings else time.perf_counter() - t0
    md = write_results(args, wall)
    print(f"\n{md.read_text()}\nTables: {args.results} and {md}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
