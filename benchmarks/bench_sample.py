"""Sampling throughput of our LightningDiT: what ``ssr sample`` runs per batch, without the decoder.

Per-image noise from its own seed, then ``steps`` Euler (or Heun) steps of the classifier-free-guided
velocity (one doubled batch per step when ``--cfg-scale`` ≠ 1). Weights are random (speed does not
depend on them). Reports images/s and network evaluations (NFE) per second.

    python benchmarks/bench_sample.py --model DiT-B/2 --batch 256 --steps 50 --cfg-scale 1.5 --compile --precision bf16
    python benchmarks/bench_sample.py --model DiT-S/2 --depth 4 --hidden-size 128 --heads 4 --input-size 8 \
        --batch 50 --steps 8 --no-compile --precision fp32 --device cpu
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ssr_cli.engine.runtime import peak_memory  # noqa: E402

from ssr_cli.models.dit import DIT_SIZES, build_dit  # noqa: E402
from ssr_cli.models.flow import cfg_velocity, initial_noise, sample_ode  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="DiT-B/2", choices=list(DIT_SIZES))
    p.add_argument("--depth", type=int, default=None, help="override the size's depth (small CPU models)")
    p.add_argument("--hidden-size", type=int, default=None)
    p.add_argument("--heads", type=int, default=None)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--input-size", type=int, default=32)
    p.add_argument("--channels", type=int, default=16)
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--steps", type=int, default=50, help="ODE steps per batch")
    p.add_argument("--sampler", choices=["euler", "heun"], default="euler")
    p.add_argument("--cfg-scale", type=float, default=1.0)
    p.add_argument("--batches", type=int, default=2, help="timed batches")
    p.add_argument("--warmup", type=int, default=1, help="untimed batches first (compilation happens here)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    torch.manual_seed(0)
    torch.set_float32_matmul_precision("high")
    overrides = {k: v for k, v in (("depth", args.depth), ("hidden_size", args.hidden_size),
                                   ("num_heads", args.heads)) if v is not None}
    model = build_dit(args.model, input_size=args.input_size, in_channels=args.channels,
                      num_classes=args.num_classes, **overrides).to(device).eval()
    net = torch.compile(model) if args.compile else model
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if args.precision == "bf16"
                else contextlib.nullcontext())
    shape = (args.channels, args.input_size, args.input_size)
    y = torch.randint(0, args.num_classes, (args.batch,), device=device)
    nfe_per_step = (2 if args.sampler == "heun" else 1) * (2 if args.cfg_scale != 1.0 else 1)

    def velocity(x, t):
        with autocast:
            v = cfg_velocity(net, x, t, y, args.cfg_scale, null_class=args.num_classes)
        return v.float()

    def batch(b: int) -> torch.Tensor:
        noise = initial_noise(list(range(b * args.batch, (b + 1) * args.batch)), shape, device)
        return sample_ode(velocity, noise, steps=args.steps, method=args.sampler)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    print(f"{args.model}{overrides or ''}: batch {args.batch}, {args.steps} {args.sampler} steps, cfg "
          f"{args.cfg_scale}, {args.precision}, compile={'on' if args.compile else 'off'}, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if cuda else ""))
    with torch.inference_mode():
        for b in range(args.warmup):
            batch(b)
        sync()
        t0 = time.perf_counter()
        for b in range(args.batches):
            batch(args.warmup + b)
        sync()
        elapsed = time.perf_counter() - t0
    img_per_s = args.batch * args.batches / elapsed
    peak = peak_memory(device)
    print(f"throughput: {img_per_s:.2f} img/s, {img_per_s * args.steps * nfe_per_step:.1f} image-NFE/s")
    print(f"peak memory: {peak}")


if __name__ == "__main__":
    main()
