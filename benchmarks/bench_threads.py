"""Thread count against a competing job: the tiny KL-AE training step (the quickstart's) with 1, 2, … threads,
alone and while another process keeps ``--competitor-threads`` threads busy with matmuls.

Each setting runs in its own child process, interleaved (ABAB…) so that drift in the machine's load hits
every setting alike; the table gives steps/s per repetition and the median.

    python benchmarks/bench_threads.py --threads 1 2 --reps 2
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_STEP = r"""
import sys, time, torch
sys.path.insert(0, {root!r})
from ssr_cli.models.registry import build_tokenizer
torch.set_num_threads({threads})
torch.manual_seed(0)
tok = build_tokenizer("kl-ae", "tiny")
opt = torch.optim.AdamW(tok.parameters(), 1e-3)
x = torch.rand(16, 3, 32, 32) * 2 - 1
def step():
    y = tok.decode(tok.encode(x).sample())
    (y - x).abs().mean().backward()
    opt.step()
    opt.zero_grad()
for _ in range(3):
    step()
t = time.perf_counter()
for _ in range({steps}):
    step()
print({steps} / (time.perf_counter() - t))
"""

_BURN = r"""
import time, torch
torch.set_num_threads({threads})
a = torch.randn(256, 256)
t = time.time()
while time.time() - t < {seconds}:
    a = torch.tanh(a @ a * 0.01)
"""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--competitor-threads", type=int, default=2, help="0: no competing job")
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--reps", type=int, default=2)
    return p.parse_args(argv)


def _rate(threads: int, steps: int) -> float:
    code = _STEP.format(root=str(ROOT), threads=threads, steps=steps)
    return float(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout)


def measure(threads: list[int], steps: int, reps: int, competitor: int) -> dict[int, list[float]]:
    burner = None
    if competitor:
        burner = subprocess.Popen([sys.executable, "-c", _BURN.format(threads=competitor, seconds=36000)])
        time.sleep(1.0)
    try:
        rates: dict[int, list[float]] = {n: [] for n in threads}
        for _ in range(reps):
            for n in threads:
                rates[n].append(_rate(n, steps))
        return rates
    finally:
        if burner is not None:
            burner.kill()
            burner.wait()


def main(argv=None) -> dict:
    args = parse_args(argv)
    results = {}
    for label, competitor in (("alone", 0), (f"beside a {args.competitor_threads}-thread job", args.competitor_threads)):
        if label != "alone" and not args.competitor_threads:
            continue
        rates = measure(args.threads, args.steps, args.reps, competitor)
        results[label] = rates
        for n, rs in rates.items():
            print(f"{label:>24}: {n} thread(s): {statistics.median(rs):6.2f} steps/s median  "
                  f"({', '.join(f'{r:.2f}' for r in rs)})")
    return results


if __name__ == "__main__":
    main()
