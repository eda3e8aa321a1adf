"""SSR against reconstruction-only fine-tuning on the from-scratch quickstart recipe, over several seeds.

For each seed and arm (``ssr``: recipe.toml as it is; ``none``: ``regularizer.kind = "none"``, the same
pretraining, then reconstruction-only steps) it runs ``ssr finetune`` and ``ssr probe-channels`` and writes
``results/report.md`` and ``results/report.json`` from the runs' ``probe.json`` and ``eval``-free numbers.
Finished runs are skipped (the commands resume an interrupted one), so re-running continues where it stopped.

    python studies/quickstart_seeds/driver.py                 # seeds 0 1 2, both arms
    python studies/quickstart_seeds/driver.py --report        # only rewrite the report from finished runs
    python studies/quickstart_seeds/driver.py --seeds 0 --steps 2 --pretrain-steps 2   # toy size (CI)
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
RECIPE = HERE / "recipe.toml"  # the from-scratch quickstart its results were measured with
ARMS = {"ssr": [], "none": ['regularizer.kind="none"']}
COLUMNS = [("psnr_full", "PSNR, all 16 ch. (dB)"), ("psnr_half", "PSNR, 8 ch. kept (dB)"),
           ("blur_decay_spearman", "blur-decay ρ"), ("frequency_order_spearman", "frequency-order ρ"),
           ("dynamics_error", "Ā error"), ("dynamics_error_no_change", "no-change error")]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", type=Path, default=HERE / "runs")
    p.add_argument("--results", type=Path, default=HERE / "results")
    p.add_argument("--steps", type=int, default=None, help="override train.steps (toy runs)")
    p.add_argument("--pretrain-steps", type=int, default=None, help="override train.pretrain_steps (toy runs)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="one more recipe override for every run (toy runs), e.g. probe.score_images=8")
    p.add_argument("--report", action="store_true", help="only write the report from finished runs")
    return p.parse_args(argv)


def _sets(args, seed: int, arm: str) -> list[str]:
    sets = [f"run.seed={seed}", f'run.name="s{seed}-{arm}"', f'run.out_dir="{args.out}"', *ARMS[arm]]
    if args.steps is not None:
        sets.append(f"train.steps={args.steps}")
    if args.pretrain_steps is not None:
        sets.append(f"train.pretrain_steps={args.pretrain_steps}")
    return sets + list(args.sets)


def run_command(args: list[str]) -> None:
    """``ssr <args>`` in a child process from the repository root; raises CalledProcessError when it fails. (The
    tests swap in an in-process call of the same command line: a child process pays ~5 s of imports first.)"""
    subprocess.run([sys.executable, "-m", "ssr_cli", *args], check=True, cwd=ROOT)


def _ssr(command: str, sets: list[str]) -> float:
    args = [command, str(RECIPE)]
    for s in sets:
        args += ["--set", s]
    t0 = time.perf_counter()
    run_command(args)
    return time.perf_counter() - t0


def run_all(args) -> None:
    for seed in args.seeds:
        for arm in ARMS:
            run_dir = args.out / f"s{seed}-{arm}"
            done = run_dir / "probe" / "probe.json"
            if done.is_file():
                print(f"s{seed}-{arm}: finished, skipped")
                continue
            sets = _sets(args, seed, arm)
            timing_path, log = run_dir / "study_timing.json", run_dir / "finetune" / "metrics.jsonl"
            trained_before = log.stat().st_size if log.is_file() else -1
            timing = json.loads(timing_path.read_text()) if timing_path.is_file() else {}
            finetune_s = _ssr("finetune", sets)
            if (log.stat().st_size if log.is_file() else -1) != trained_before or "finetune_s" not in timing:
                timing["finetune_s"] = finetune_s  # it trained: its time (else the earlier training's is kept)
            timing["probe_s"] = _ssr("probe-channels", sets)
            timing_path.write_text(json.dumps(timing))


def _fmt(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def report(args) -> Path:
    rows, table = [], {}
    for seed in args.seeds:
        for arm in ARMS:
            path = args.out / f"s{seed}-{arm}" / "probe" / "probe.json"
            if not path.is_file():
                continue
            probe = json.loads(path.read_text())
            timing_path = path.parents[1] / "study_timing.json"
            timing = json.loads(timing_path.read_text()) if timing_path.is_file() else {}
            row = {"seed": seed, "arm": arm, **{k: probe[k] for k, _ in COLUMNS}, **timing}
            rows.append(row)
            table.setdefault(arm, []).append(row)
    args.results.mkdir(parents=True, exist_ok=True)
    overrides = _sets(args, 0, "ssr")[3:]  # the run-independent overrides (steps, --set), as every run had them
    (args.results / "report.json").write_text(json.dumps({"recipe": str(RECIPE.relative_to(ROOT)),
                                                          "overrides": overrides, "runs": rows}, indent=2))
    lines = ["# Quickstart: SSR against reconstruction-only fine-tuning", "",
             f"Generated by `python studies/quickstart_seeds/driver.py` from {len(rows)} runs of "
             f"`{RECIPE.relative_to(ROOT)}` (probe numbers over its `probe.score_images` built-in crops)"
             + (f" with {', '.join(f'`{o}`' for o in overrides)}" if overrides else "")
             + ". Mean ± sample std over seeds. A finished run is skipped whatever the overrides of the run "
             "that finished it.", "",
             "| seed | fine-tuning | " + " | ".join(name for _, name in COLUMNS) + " |",
             "| --- | --- | " + " | ".join("---" for _ in COLUMNS) + " |"]
    for r in rows:
        lines.append(f"| {r['seed']} | {r['arm']} | " + " | ".join(f"{r[k]:.3f}" for k, _ in COLUMNS) + " |")
    lines += ["", "| fine-tuning | seeds | " + " | ".join(name for _, name in COLUMNS) + " |",
              "| --- | --- | " + " | ".join("---" for _ in COLUMNS) + " |"]
    for arm, rs in table.items():
        lines.append(f"| {arm} | {len(rs)} | " + " | ".join(_fmt([r[k] for r in rs]) for k, _ in COLUMNS) + " |")
    # paired differences (same seed, so the same pretrained tokenizer): what SSR changes
    pairs = [(a, b) for a in table.get("ssr", []) for b in table.get("none", []) if a["seed"] == b["seed"]]
    if pairs:
        lines += ["", "Paired by seed (ssr − none): " + "; ".join(
            f"{name} {_fmt([a[k] - b[k] for a, b in pairs])}" for k, name in COLUMNS) + "."]
    times = [r.get("finetune_s") for r in rows if r.get("finetune_s")]
    if times:
        lines += ["", f"`ssr finetune` took {min(times):.0f}–{max(times):.0f} s per run on this machine."]
    path = args.results / "report.md"
    path.write_text("\n".join(lines) + "\n")
    print(path.read_text())
    return path


def main(argv=None) -> None:
    args = parse_args(argv)
    if not args.report:
        run_all(args)
    report(args)


if __name__ == "__main__":
    main()
