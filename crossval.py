"""Block cross-validation: a fold's frames, the driver of `main.py --folds N` (each fold is a main.py run; the driver
is handed the function that trains one), the per-fold table of one recipe, and the length curve of wsd branches.

    python main.py --folds 3 ...   # every fold in turn, then CV_DIR/cv.md and cv.csv (`cross_validate`)
    python crossval.py CV_DIR      # the length curve of a wsd cross-validation folder -> CV_DIR/length.md, length.png
    python crossval.py LEVER_DIR --versus BASE_DIR   # a lever's branches paired with the base's -> LEVER_DIR/versus.md

A length curve (docs/length.md): each fold trains one constant-LR run (`--scheduler wsd --decay_epochs 0`, folder
foldK), and each length L is a branch decayed from one of its epoch checkpoints (`--branch foldK/epochNNN.pth
--max_epochs L --decay_epochs D`, folder foldK_eL): exactly the run of length L trained from scratch, at a fraction
of the cost. A row is each fold's held-out RMSE / SSIM at the branch's last evaluation; nothing is selected on the
held-out block. A lever (a flag changed, e.g. from a branch of the same constant run) is judged by its paired
difference from the base recipe of the same length on the same folds (`versus_table`).
"""
import csv
import json
import math
import os
import re
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from dataset import block_folds  # noqa: E402
from rundir import write_csv  # noqa: E402
from utils import UserError, atomic_write  # noqa: E402

FOLD_SPLITS = ("train", "val")  # the frames cut into blocks: train then val, in frame order


def check_fold_flags(args):
    """--folds N (2 or more) and --fold K (1..N, only with --folds), checked before any data is read."""
    if args.folds and (args.folds < 2 or args.fold is not None and not 1 <= args.fold <= args.folds):
        raise UserError(f"--folds must be 2 or more and --fold between 1 and --folds, got {args.folds} and {args.fold}")
    if args.fold is not None and not args.folds:
        raise UserError("--fold needs --folds N")


def fold_sets(frames, args):
    """(train set, held-out set) of fold --fold: its block of the frames held out, the rest but the guard trained on."""
    train_idx, held_idx = block_folds(len(frames), args.folds, args.guard)[args.fold - 1]
    return frames.subset(train_idx), frames.subset(held_idx)


def held_out_note(args, held):
    return f" (fold {args.fold}/{args.folds}: held-out frames {held.names[0]}..{held.names[-1]}, guard {args.guard})"


def write_fold_result(run, data, decay_from, log):
    """A fold's result is its last evaluation (nothing is selected on the held-out block): result.json."""
    args, last = run.args, run.history[-1]
    result = {"fold": args.fold, "folds": args.folds, "guard": args.guard,
              "held_out": [data.val.names[0], data.val.names[-1]], "n_train": len(data.train),
              "n_held_out": len(data.val), "epochs": last["epoch"], "train_minutes": last["train_minutes"],
              "rmse": last["val_rmse"], "ssim": last["val_ssim"], "scheduler": args.scheduler,
              "decay_from": decay_from, **{k: v for k, v in last.items() if k.startswith("val_")}}
    atomic_write(os.path.join(run.dir, "result.json"), lambda f: f.write(json.dumps(result, indent=1).encode()))
    log(f"fold {args.fold}/{args.folds} done: held-out RMSE {last['val_rmse']:.4f} SSIM {last['val_ssim']:.4f} "
        f"(last evaluation) -> {run.dir}/result.json")


def cross_validate(args, argv, train_fold):
    """Every fold of --folds in turn (a fold with a result.json is done; one with a last.pth is resumed), then the
    table: per-fold held-out RMSE/SSIM of each fold's last evaluation, their mean and standard deviation.
    train_fold(fold_argv): main.py's run of those arguments, its exit code."""
    if args.resume:
        raise UserError("--resume continues one fold (--resume RUN/foldK/last.pth); to continue a whole "
                        "cross-validation, run the same command again: finished folds are kept, a cut one resumes")
    cv_dir = os.path.join(args.ckpt_dir, args.ckpt_name or f"{args.model}_cv{args.folds}")
    results = []
    for k in range(1, args.folds + 1):
        fold_dir = os.path.join(cv_dir, f"fold{k}")
        if not os.path.exists(os.path.join(fold_dir, "result.json")):
            if os.path.exists(os.path.join(fold_dir, "last.pth")):
                print(f"fold {k}/{args.folds}: continuing {fold_dir}/last.pth")
                code = train_fold(["--resume", os.path.join(fold_dir, "last.pth")])
            else:
                print(f"fold {k}/{args.folds}: training in {fold_dir}")
                code = train_fold(argv + ["--fold", str(k), "--ckpt_dir", cv_dir, "--ckpt_name", f"fold{k}"])
            if code != 0 or not os.path.exists(os.path.join(fold_dir, "result.json")):
                print(f"cross-validation paused at fold {k}; run the same command again to continue")
                return code or 130
        with open(os.path.join(fold_dir, "result.json")) as f:
            results.append(json.load(f))
    table = cv_table(results)
    atomic_write(os.path.join(cv_dir, "cv.md"), lambda f: f.write(table.encode()))
    write_csv(os.path.join(cv_dir, "cv.csv"), results)
    print(table + f"\nwrote {cv_dir}/cv.md and cv.csv")
    return 0


def mean_std(xs):
    """Mean and sample standard deviation (0 for one value)."""
    mean = sum(xs) / len(xs)
    return mean, math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0


def cv_table(results):
    """Markdown: one row per fold, then mean and sample standard deviation over folds."""
    lines = ["| fold | held-out frames | train frames | epochs | train min | RMSE | SSIM |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['fold']} | {r['held_out'][0]}..{r['held_out'][1]} ({r['n_held_out']}) | {r['n_train']} | "
                     f"{r['epochs']} | {r['train_minutes']:.1f} | {r['rmse']:.3f} | {r['ssim']:.3f} |")
    rmse, ssim_ = mean_std([r["rmse"] for r in results]), mean_std([r["ssim"] for r in results])
    lines.append(f"| mean ± std | | | | | {rmse[0]:.3f} ± {rmse[1]:.3f} | {ssim_[0]:.3f} ± {ssim_[1]:.3f} |")
    return "\n".join(lines) + "\n"


def read_length_runs(cv_dir):
    """({length: {fold: result.json of the branch}}, {fold: [(epoch, val_rmse, val_ssim) of the constant run]})."""
    branches, constant = {}, {}
    for name in sorted(os.listdir(cv_dir)):
        folder = os.path.join(cv_dir, name)
        m = re.fullmatch(r"fold(\d+)(?:_e(\d+))?", name)
        if not m or not os.path.isdir(folder):
            continue
        fold = int(m.group(1))
        if m.group(2) and os.path.exists(os.path.join(folder, "result.json")):
            with open(os.path.join(folder, "result.json")) as f:
                branches.setdefault(int(m.group(2)), {})[fold] = json.load(f)
        elif not m.group(2) and os.path.exists(os.path.join(folder, "metrics.csv")):
            with open(os.path.join(folder, "metrics.csv")) as f:
                constant[fold] = [(int(r["epoch"]), float(r["val_rmse"]), float(r["val_ssim"]))
                                  for r in csv.DictReader(f) if r.get("val_rmse")]
    return branches, constant


def length_table(branches, constant):
    """Markdown: per length, each fold's held-out RMSE / SSIM after the decay, mean ± std over the folds present;
    then the constant runs' own evaluations (the averaged weights before any decay)."""
    folds = sorted({k for runs in branches.values() for k in runs} | set(constant))
    head = "| length (epochs) | decay from | " + " | ".join(f"fold {k} RMSE / SSIM" for k in folds)
    lines = [head + " | RMSE mean ± std | SSIM mean ± std |", "|---" * (len(folds) + 4) + "|"]
    for length in sorted(branches):
        runs = {k: (r["rmse"], r["ssim"]) for k, r in branches[length].items()}
        start = {r.get("decay_from") for r in branches[length].values()} - {None}
        lines.append(f"| {length} | {', '.join(f'{s:g}' for s in sorted(start)) or '?'} | "
                     + fold_cells(runs, folds) + " |")
    if constant:
        lines += ["", "The constant-LR runs' own evaluations (EMA weights, no decay):", "",
                  "| epoch | " + " | ".join(f"fold {k} RMSE / SSIM" for k in sorted(constant))
                  + " | RMSE mean ± std | SSIM mean ± std |", "|---" * (len(constant) + 3) + "|"]
        by_fold = {k: {e: (rmse, ssim_) for e, rmse, ssim_ in rows} for k, rows in constant.items()}
        for e in sorted({e for rows in constant.values() for e, _, _ in rows}):
            runs = {k: by_fold[k][e] for k in by_fold if e in by_fold[k]}
            lines.append(f"| {e} | " + fold_cells(runs, sorted(constant)) + " |")
    return "\n".join(lines) + "\n"


def fold_cells(runs, folds):
    """Table cells: each fold's RMSE / SSIM ("—" where missing), then RMSE and SSIM mean ± std over the folds
    present ("(1 fold)" instead of a std when only one is)."""
    cells = [f"{runs[k][0]:.3f} / {runs[k][1]:.3f}" if k in runs else "—" for k in folds]
    for col in (0, 1):
        mean, std = mean_std([r[col] for r in runs.values()])
        cells.append(f"{mean:.3f} ± {std:.3f}" if len(runs) > 1 else f"{mean:.3f} (1 fold)")
    return " | ".join(cells)


def versus_table(branches, base_branches, name, base_name):
    """Markdown: per length that both have, each fold's lever RMSE / SSIM with its difference from the base's on the
    same fold, then the mean ± sample std of the paired differences and on how many folds the lever was better."""
    lengths = [n for n in sorted(branches) if set(branches[n]) & set(base_branches.get(n, {}))]
    if not lengths:
        raise UserError(f"{name} and {base_name} have no length and fold in common (foldK_eL/result.json)")
    folds = sorted({k for n in lengths for k in set(branches[n]) & set(base_branches[n])})
    lines = [f"{name} versus {base_name}: held-out RMSE / SSIM (difference from {base_name}, same fold and length)",
             "", "| length (epochs) | " + " | ".join(f"fold {k}" for k in folds)
             + " | RMSE difference mean ± std | SSIM difference mean ± std | folds better RMSE, SSIM |",
             "|---" * (len(folds) + 4) + "|"]
    for n in lengths:
        runs, base = branches[n], base_branches[n]
        paired = [k for k in folds if k in runs and k in base]
        diff = {k: (runs[k]["rmse"] - base[k]["rmse"], runs[k]["ssim"] - base[k]["ssim"]) for k in paired}
        d_rmse, d_ssim = [diff[k][0] for k in paired], [diff[k][1] for k in paired]
        cells = [f"{runs[k]['rmse']:.3f} / {runs[k]['ssim']:.3f} ({diff[k][0]:+.3f} / {diff[k][1]:+.3f})"
                 if k in diff else "—" for k in folds]
        (mr, sr), (ms, ss) = mean_std(d_rmse), mean_std(d_ssim)
        better = f"{sum(d < 0 for d in d_rmse)}, {sum(d > 0 for d in d_ssim)} of {len(paired)}"
        lines.append(f"| {n} | " + " | ".join(cells) + f" | {mr:+.3f} ± {sr:.3f} | {ms:+.3f} ± {ss:.3f} | {better} |")
    return "\n".join(lines) + "\n"


def plot_length_curve(branches, constant, path):
    """Held-out RMSE and SSIM against length: decayed branches (mean ± std over folds) and the constant runs."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    for ax, key, col in ((axes[0], "rmse", 1), (axes[1], "ssim", 2)):
        for k, rows in sorted(constant.items()):
            ax.plot([r[0] for r in rows], [r[col] for r in rows], ":", marker=".", label=f"fold {k}, constant LR")
        lengths = sorted(branches)
        if lengths:
            stats = [mean_std([r[key] for r in branches[n].values()]) for n in lengths]
            ax.errorbar(lengths, [m for m, _ in stats], yerr=[s for _, s in stats], fmt="-o", color="k", capsize=3,
                        label="after the decay (mean ± std over folds)")
        ax.set_xlabel("training length (epochs)")
        ax.set_ylabel(f"held-out {key.upper()}" + (" (m)" if key == "rmse" else ""))
        ax.grid(alpha=0.3)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=4, fontsize=8)  # clear of the curves
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    usage = ("usage: python crossval.py CV_DIR (a folder of foldK constant runs and foldK_eL branches) "
             "[--versus BASE_DIR (the same of the base recipe)]")
    if len(argv) not in (1, 3) or (len(argv) == 3 and argv[1] != "--versus"):
        print(usage, file=sys.stderr)
        return 2
    for folder in argv[::2]:
        if not os.path.isdir(folder):
            print(f"error: {folder}: folder not found", file=sys.stderr)
            return 2
    branches, constant = read_length_runs(argv[0])
    if not branches and not constant:
        print(f"error: {argv[0]}: no foldK/metrics.csv or foldK_eL/result.json here", file=sys.stderr)
        return 2
    if len(argv) == 3:
        try:
            table = versus_table(branches, read_length_runs(argv[2])[0], argv[0], argv[2])
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        atomic_write(os.path.join(argv[0], "versus.md"), lambda f: f.write(table.encode()))
        print(table + f"wrote {argv[0]}/versus.md")
        return 0
    table = length_table(branches, constant)
    atomic_write(os.path.join(argv[0], "length.md"), lambda f: f.write(table.encode()))
    plot_length_curve(branches, constant, os.path.join(argv[0], "length.png"))
    print(table + f"wrote {argv[0]}/length.md and length.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
