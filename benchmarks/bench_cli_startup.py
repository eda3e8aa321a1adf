"""CPU seconds (user + system) of ``ssr --help`` and ``ssr finetune --help``: best of N runs, for this checkout
and, optionally, other checkouts of the project side by side (e.g. an older commit in a git worktree).

    python benchmarks/bench_cli_startup.py --other /tmp/old --runs 5
    # the old checkout with the typer it was measured with (pip install --no-deps --target /tmp/typer029 typer==0.29.2)
    python benchmarks/bench_cli_startup.py --other /tmp/old --other-path /tmp/typer029 --runs 5
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = (["--help"], ["finetune", "--help"])


def cpu_seconds(args: list[str], checkout: Path | None, extra: list[Path] = ()) -> float:
    """CPU time of one child ``python`` run (``-m ssr_cli ARGS`` with the package of ``checkout``, then the
    folders ``extra`` ahead of site-packages)."""
    env = dict(os.environ)
    if checkout is not None:
        env["PYTHONPATH"] = os.pathsep.join(str(p) for p in (checkout, *extra))
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run([sys.executable, *args], env=env, cwd=checkout or ROOT, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--other", type=Path, nargs="*", default=[])
    p.add_argument("--other-path", type=Path, nargs="*", default=[],
                   help="folders put on the other checkouts' PYTHONPATH (e.g. the dependencies they were measured with)")
    p.add_argument("--runs", type=int, default=5)
    args = p.parse_args(argv)
    rows = {"bare python -c pass": [min(cpu_seconds(["-c", "pass"], None) for _ in range(args.runs))]}
    for checkout in [ROOT, *args.other]:
        extra = args.other_path if checkout != ROOT else []
        name = str(checkout) + (f" (+ {', '.join(map(str, extra))})" if extra else "")
        rows[name] = [min(cpu_seconds(["-m", "ssr_cli", *c], checkout, extra) for _ in range(args.runs))
                      for c in COMMANDS]
    print("| checkout | ssr --help (CPU s) | ssr finetune --help (CPU s) |\n| --- | --- | --- |")
    for name, values in rows.items():
        print(f"| {name} | " + " | ".join(f"{v:.2f}" for v in values) + (" | |" if len(values) == 1 else " |"))
    return rows


if __name__ == "__main__":
    main()
