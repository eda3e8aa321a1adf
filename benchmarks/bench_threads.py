"""Thread count against a competing job: the tiny KL-AE training step (the quickstart's) with 1, 2, … threads,
alone and while another process keeps ``--competitor-threads`` threads busy with matmuls; ``--variants`` also
times bf16 autocast and channels-last memory layout of the same step.

Each setting runs in its own child process, interleaved (ABAB…) so that drift in the machine's load hits
every setting alike; the table gives steps/s per repetition and the median.

    python benchmarks/bench_threads.py --threads 1 2 --reps 2
    python benchmarks/bench_threads.py --threads 2 --competitor-threads 0 --variants fp32 bf16 channels_last
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
import contextlib, sys, time, torch
sys.path.insert(0, {root!r})
from ssr_cli.models.registry import build_tokenizer
torch.set_num_threads({threads})
torch.manual_seed(0)
tok = build_tokenizer("kl-ae", "tiny")
x = torch.rand(16, 3, 32, 32) * 2 - 1
if {variant!r} == "channels_last":
    tok = tok.to(memory_format=torch.channels_last)
    x = x.contiguous(memory_format=torch.channels_last)
opt = torch.optim.AdamW(tok.parameters(), 1e-3)
autocast = torch.autocast("cpu", dtype=torch.bfloat16) if {variant!r} == "bf16" else contextlib.nullcontext()
def step():
    with autocast:
        y = tok.decode(tok.encode(x).sample())
        loss = (y.float() - x).abs().mean()
    loss.backward()
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
    p.add_argument("--variants", nargs="+", default=["fp32"], choices=["fp32", "bf16", "channels_last"])
    return p.parse_args(argv)


def _rate(threads: int, steps: int, variant: str = "fp32") -> float:
    code = _STEP.format(root=str(ROOT), threads=threads, steps=steps, variant=variant)
    return float(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout)


def measure(threads: list[int], steps: int, reps: int, competitor: int,
            variants: tuple[str, ...] = ("fp32",)) -> dict[str, list[float]]:
    burner = None
    if competitor:
        burner = subprocess.Popen([sys.executable, "-c", _BURN.format(threads=competitor, seconds=36000)])
        time.sleep(1.0)
    try:
        settings = [(n, v) for n in threads for v in variants]
        rates: dict[str, list[float]] = {f"{n} thread(s), {v}": [] for n, v in settings}
        for _ in range(reps):
            for n, v in settings:
                rates[f"{n} thread(s), {v}"].append(_rate(n, steps, v))
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
        rates = measure(args.threads, args.steps, args.reps, competitor, tuple(args.variants))
        results[label] = rates
        for setting, rs in rates.items():
            print(f"{label:>24}: {setting}: {statistics.median(rs):6.2f} steps/s median  "
                  f"({', '.join(f'{r:.2f}' for r in rs)})")
    return results


if __name__ == "__main__":
    main()
