"""Fine-tuning step throughput and peak memory, reconstruction branch and SSR branch measured apart.

One step is what ``ssr finetune`` runs: the tokenizer's loss through the regularizer (MAE + KL weight·KL,
+ LPIPS when ``--lpips-weights`` is given), backward, gradient clipping at 50, an AdamW step and the
EMA-target update. ``--branch recon`` forces the reconstruction branch (α = 0), ``--branch ssr`` the SSR
branch (α = 1: blur pair, encoder on both, decoder on the prediction, image + latent terms). Weights are
random (speed does not depend on them); frozen blocks as in the paper (first 2 encoder, last 2 decoder
stages).

    python benchmarks/bench_finetune.py --size flux --resolution 256 --batch 8 --precision bf16 --no-lpips
    python benchmarks/bench_finetune.py --size flux --resolution 256 --batch 32 --precision bf16 \
        --lpips-weights ../shared/data/lpips/alexnet-owt-7be5be79.features-only.pth --grad-checkpointing
    python benchmarks/bench_finetune.py --size tiny --resolution 32 --batch 4 --steps 2 --warmup 1 --device cpu
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ssr_cli.engine.ema import EMA  # noqa: E402
from ssr_cli.engine.runtime import generator_for  # noqa: E402
from ssr_cli.models.registry import build_tokenizer  # noqa: E402
from ssr_cli.regularizers import build_regularizer  # noqa: E402
from ssr_cli.stages.finetune import FinetuneTask  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--family", default="kl-ae")
    p.add_argument("--size", default="flux")
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=20, help="timed steps per branch")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation happens here)")
    p.add_argument("--branch", choices=["recon", "ssr", "both"], default="both")
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--lpips-weights", default=None, help="AlexNet features file; without it, no LPIPS term")
    p.add_argument("--grad-checkpointing", action="store_true", help="activation checkpointing of AE blocks")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p.parse_args(argv)


def build_task(args, alpha: float, device: torch.device):
    tok = build_tokenizer(args.family, args.size)
    if args.grad_checkpointing:
        tok.grad_checkpointing = True
    tok.frozen_blocks(2, 2)
    lpips_fn = None
    if args.lpips_weights:
        from ssr_cli.metrics import load_lpips

        net = load_lpips("alex", args.lpips_weights, device=device)
        lpips_fn = lambda x, y: net(x.float(), y.float()).flatten()  # noqa: E731

    reg = build_regularizer("ssr", latent_channels=tok.latent_channels, basis="fourier", alpha=alpha,
                            lambda_latent=0.25, lambda_image=1.0, lambda_mae_ssr=1.0,
                            lambda_lpips_ssr=0.1 if lpips_fn else 0.0, lambda_mae=1.0,
                            lambda_lpips=0.1 if lpips_fn else 0.0, kl_weight=1e-6, lpips_fn=lpips_fn)
    tok = tok.to(device)
    if args.channels_last and device.type == "cuda":
        tok = tok.to(memory_format=torch.channels_last)
    target = EMA(tok, 0.999)
    task = FinetuneTask(tok, reg, target).to(device).train()
    return task, target


def run_branch(args, name: str, alpha: float, device: torch.device) -> dict:
    cuda = device.type == "cuda"
    torch.manual_seed(0)
    task, target = build_task(args, alpha, device)
    params = [p for p in task.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.999), fused=True if cuda else None)
    runner = torch.compile(task) if args.compile else task
    images = torch.rand(args.batch, 3, args.resolution, args.resolution, device=device) * 2 - 1
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")

    def step(i: int) -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        with autocast:
            out = runner((images,), generator_for(0, "bench", i))
        out["loss"].float().backward()
        torch.nn.utils.clip_grad_norm_(params, 50.0)
        opt.step()
        target.update(task.tokenizer)
        return out["loss"].detach()

    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    for i in range(args.warmup):
        step(i)
    if cuda:
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for i in range(args.steps):
        loss = step(args.warmup + i)
    if cuda:
        torch.cuda.synchronize(device)
    dt = time.perf_counter() - t0
    if cuda:
        peak = torch.cuda.max_memory_allocated(device) / 2**30
        peak_label = "GPU peak allocated"
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        peak_label = "process max RSS"
    return {"branch": name, "img_per_s": args.batch * args.steps / dt, "step_ms": 1000 * dt / args.steps,
            "peak_gib": peak, "peak_label": peak_label, "loss": float(loss)}


def main(argv=None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    n_params = sum(p.numel() for p in build_tokenizer(args.family, args.size).parameters())
    print(f"{args.family}/{args.size}: {n_params / 1e6:.2f}M parameters, {args.resolution}², batch {args.batch}, "
          f"{args.precision}, LPIPS {'on' if args.lpips_weights else 'off'}, grad checkpointing "
          f"{'on' if args.grad_checkpointing else 'off'}, compile {'on' if args.compile else 'off'}, device {device}")
    branches = {"recon": 0.0, "ssr": 1.0}
    chosen = list(branches) if args.branch == "both" else [args.branch]
    for name in chosen:
        r = run_branch(args, name, branches[name], device)
        print(f"{name:>5} branch: {r['img_per_s']:8.3g} img/s  ({r['step_ms']:.1f} ms/step)  "
              f"{r['peak_label']} {r['peak_gib']:.2f} GiB  loss {r['loss']:.4f}")
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
