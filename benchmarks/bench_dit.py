"""Training-step throughput of our LightningDiT on random latents.

One step = logit-normal t, rectified-flow loss with the cosine term, backward, gradient clipping and a
fused AdamW (0.9, 0.95) step: what ``ssr train-dit`` runs per step. The model and loss are compiled
together (``--compile``), as the engine does. Nothing inside the timed loop reads a value back to the
host; the device is synchronised only before and after it.

    python benchmarks/bench_dit.py --model DiT-B/2 --batch 256 --compile --precision bf16
    python benchmarks/bench_dit.py --model DiT-S/2 --batch 8 --steps 2 --warmup 1 --no-compile \
        --precision fp32 --device cpu
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

from ssr_cli.models.dit import DIT_SIZES, build_dit, flops_per_image  # noqa: E402
from ssr_cli.models.flow import flow_loss, sample_t_logit_normal  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="DiT-B/2", choices=list(DIT_SIZES))
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--input-size", type=int, default=32)
    p.add_argument("--channels", type=int, default=16)
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--steps", type=int, default=30, help="timed steps")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps first (compilation happens here)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--compile-mode", default=None, help="torch.compile mode, e.g. max-autotune-no-cudagraphs")
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--qk-norm", action="store_true")
    p.add_argument("--grad-clip", type=float, default=1.0, help="0 disables (train-dit default: 1.0)")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    torch.manual_seed(0)
    torch.set_float32_matmul_precision("high")  # TF32 for fp32 matmuls, as the engine sets up

    model = build_dit(args.model, input_size=args.input_size, in_channels=args.channels,
                      num_classes=args.num_classes, qk_norm=args.qk_norm).to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0, fused=True if cuda else None)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if args.precision == "bf16"
                else contextlib.nullcontext())

    def loss_fn(x1: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        t = sample_t_logit_normal(x1.shape[0], None, x1.device)
        return flow_loss(model, x1, y, t=t, cosine_weight=1.0)["loss"]

    if args.compile:
        loss_fn = torch.compile(loss_fn, mode=args.compile_mode)

    x1 = torch.randn(args.batch, args.channels, args.input_size, args.input_size, device=device)
    y = torch.randint(0, args.num_classes, (args.batch,), device=device)

    def step() -> torch.Tensor:
        with autocast:
            loss = loss_fn(x1, y)
        loss.backward()
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, args.grad_clip, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    n_params = sum(p.numel() for p in model.parameters())
    print(f"{args.model}: {n_params / 1e6:.2f}M parameters, batch {args.batch}, latents "
          f"{args.channels}x{args.input_size}x{args.input_size}, {args.precision}, "
          f"compile={'on' if args.compile else 'off'}, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if cuda else ""))

    t0 = time.perf_counter()
    for _ in range(args.warmup):
        step()
    sync()
    warm_s = time.perf_counter() - t0
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)

    losses = []
    t0 = time.perf_counter()
    for _ in range(args.steps):
        losses.append(step())
    sync()
    elapsed = time.perf_counter() - t0

    img_per_s = args.batch * args.steps / elapsed
    flops = flops_per_image(model)
    tflops = 3 * flops * img_per_s / 1e12  # forward + backward ≈ 3 × forward
    peak = peak_memory(device)
    last_loss = torch.stack(losses).float()[-1].item()
    print(f"warm-up: {args.warmup} steps in {warm_s:.1f} s")
    print(f"step time: {1000 * elapsed / args.steps:.1f} ms ({args.steps} steps)")
    print(f"throughput: {img_per_s:.1f} img/s")
    print(f"model FLOPs: {flops / 1e9:.2f} GFLOP forward per image; {tflops:.1f} TFLOP/s (3x forward)")
    print(f"peak memory: {peak}")
    print(f"last loss: {last_loss:.4f}")


if __name__ == "__main__":
    main()
