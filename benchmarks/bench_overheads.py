"""Fixed costs every command or test pays, old against new, side by side in one process (issue 14):

- listing a tar data set's members (CIFAR-10's 50,000-image train tar): ``data.tar_file_members`` vs ``tarfile``;
- a training-curves figure of 17 panels (``plots.plot_training_curves``, drawn at the end of each training stage);
- a Fréchet distance from 2048-d covariances (``metrics.frechet_distance``; every ``ssr evaluate`` computes its
  sFID this way) between two sets of 150 samples (singular covariances) and of 3000 (full rank);
- the imports a command's process pays before any work: torch, torch._dynamo (imported by the first
  ``torch.optim`` optimizer and by torchvision), matplotlib.

The "old" rows run the same functions as they were at ``--before`` (a git revision), loaded from git history.

    python benchmarks/bench_overheads.py --before cf7ffc4 --threads 1
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CIFAR_TRAIN = ROOT.parent / "shared" / "data" / "cifar10" / "train_50000.tar"


def _module_at(revision: str, path: str, name: str):
    """The module ``path`` of this repository as it was at ``revision`` (its imports resolve to today's package)."""
    source = subprocess.run(["git", "show", f"{revision}:{path}"], cwd=ROOT, check=True, capture_output=True,
                            text=True).stdout
    file = Path(tempfile.mkdtemp()) / f"{name}.py"
    file.write_text(source)
    spec = importlib.util.spec_from_file_location(name, file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _best(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def _import_seconds(module: str) -> float:
    """Wall seconds to import ``module`` in a fresh interpreter, over the bare interpreter's start."""
    code = f"import time; t = time.perf_counter(); import {module}; print(time.perf_counter() - t)"
    return float(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--before", default="cf7ffc4", help="git revision of the old code")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--dim", type=int, default=2048, help="feature dimension of the Fréchet distances")
    p.add_argument("--no-imports", action="store_true", help="skip the fresh-interpreter import timings")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    from ssr_cli import plots
    from ssr_cli.data import _read_tar_file_members, _tar_file_members_slow
    from ssr_cli.metrics import generation

    old_plots = _module_at(args.before, "ssr_cli/plots.py", "old_plots")
    old_generation = _module_at(args.before, "ssr_cli/metrics/generation.py", "old_generation")
    rows: dict[str, tuple[float, float]] = {}

    if CIFAR_TRAIN.is_file():
        rows["tar listing, CIFAR-10 train (50,000 members)"] = (
            _best(lambda: _tar_file_members_slow(CIFAR_TRAIN), args.reps),
            _best(lambda: _read_tar_file_members(CIFAR_TRAIN), args.reps))  # uncached: a fresh process

    keys = ["abar_norm", "branch", "delta", "grad_norm", "kl", "loss", "lpips", "lr", "mae", "recon", "skipped_steps",
            "ssr_latent", "ssr_mae", "ssr_pixel", "unreadable_images", "eq", "se"]
    records = [{"step": s, **{k: float(np.exp(-s / 30) * (1 + j) + (0.01 if j % 2 else 0.0)) for j, k in enumerate(keys)}}
               for s in range(0, 100, 10)]
    out = Path(tempfile.mkdtemp())
    rows["training curves, 17 panels"] = (
        _best(lambda: old_plots.plot_training_curves(records, out / "old.png", title="finetune"), args.reps),
        _best(lambda: plots.plot_training_curves(records, out / "new.png", title="finetune"), args.reps))

    rng = np.random.default_rng(0)
    dim = args.dim
    scales = np.exp(rng.uniform(-5, 2, dim))
    fids = {}
    for n in (150, 3000):
        x = rng.standard_normal((n, dim)) * scales
        y = rng.standard_normal((n, dim)) + 0.1
        a, b = generation.gaussian_stats(x), generation.gaussian_stats(y)
        old_value, new_value = old_generation.frechet_distance(*a, *b), generation.frechet_distance(*a, *b)
        fids[n] = {"old": old_value, "new": new_value,  # the rows route is exact, and taken where n² ≤ D²
                   "rows (exact)": generation.frechet_distance_of_rows(x, y) if n <= dim else None}
        rows[f"Fréchet distance from covariances, D = {dim}, {n} vs {n} samples"] = (
            _best(lambda: old_generation.frechet_distance(*a, *b), 1),
            _best(lambda: generation.frechet_distance(*a, *b), 1))

    floor = {} if args.no_imports else {m: _import_seconds(m) for m in ("torch", "torch._dynamo", "matplotlib.pyplot")}

    print(f"| cost ({args.threads} thread(s); best of {args.reps}) | {args.before} (s) | this tree (s) | ratio |")
    print("| --- | --- | --- | --- |")
    for name, (old, new) in rows.items():
        print(f"| {name} | {old:.2f} | {new:.2f} | {old / new:.1f}× |")
    print("FID values (old / new / exact rows route):", json.dumps(fids))
    if floor:
        print("imports in a fresh interpreter (wall s; torch._dynamo includes torch):",
              ", ".join(f"{m} {s:.2f}" for m, s in floor.items()))
    return {"rows": rows, "fids": fids, "imports": floor}


if __name__ == "__main__":
    main()
