"""How close each CPU loop of the studies runs to this machine's fp32 matmul peak (issue 14).

A ceiling first: the GFLOP/s of a large float32 matmul (``--gemm`` square), the best the BLAS/oneDNN kernels
reach on these cores. Then each loop the studies spend their CPU hours in, with its FLOPs counted by PyTorch's
own ``FlopCounterMode`` over one forward (+ backward) pass, timed over ``--steps`` steps after ``--warmup``:

* ``ae``: the tiny KL-AE training step (encode, sample, decode, L1, AdamW), batch ``--ae-batch`` at 32².
* ``dit``: the flow-probe / generation DiT step of the CIFAR-10 studies (LightningDiT-S/2, depth 6, width 192,
  3 heads, 16×8×8 latents, 10 classes), batch ``--dit-batch``; ``--compile`` adds a ``torch.compile`` run.
* ``inception``: the FID Inception-v3 forward on 32² uint8 images (resized to 299² inside), NCHW and
  channels-last; needs ``--inception`` (the shared data's weights file).

A loop at a large fraction of the ceiling cannot be made much faster by settings (threads, layout, compile):
only less work would. Run it on quiet cores; ``--threads`` sets torch's thread count (default 1).

    python benchmarks/bench_cpu_roofline.py --threads 1
    python benchmarks/bench_cpu_roofline.py --only dit --compile
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ssr_cli.models.dit import build_dit  # noqa: E402
from ssr_cli.models.registry import build_tokenizer  # noqa: E402

DEFAULT_INCEPTION = ROOT.parent / "shared" / "data" / "inception" / "pt_inception-2015-12-05-reconstructed-nofc.pth"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--only", nargs="+", choices=["ae", "dit", "inception"], default=["ae", "dit", "inception"])
    p.add_argument("--gemm", type=int, default=1024, help="side of the square matmul that gives the ceiling")
    p.add_argument("--ae-batch", type=int, default=32)
    p.add_argument("--dit-batch", type=int, default=64)
    p.add_argument("--inception-batch", type=int, default=50)
    p.add_argument("--inception-steps", type=int, default=2, help="timed Inception batches (after one warm-up)")
    p.add_argument("--inception", type=Path, default=DEFAULT_INCEPTION, help="FID Inception weights")
    p.add_argument("--steps", type=int, default=5, help="timed steps per loop")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--compile", action="store_true", help="also time the DiT step under torch.compile")
    return p.parse_args(argv)


def timed(step, steps: int, warmup: int) -> tuple[float, float]:
    """(seconds per step, seconds of the warm-up)."""
    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - t0) / steps, warm


def flops_of(fn) -> float:
    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def gemm_ceiling(n: int, steps: int) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    per, _ = timed(lambda: a @ b, max(steps, 10), 3)
    return 2 * n ** 3 / per / 1e9


def ae_loop(batch: int):
    torch.manual_seed(0)
    tok = build_tokenizer("kl-ae", "tiny")
    x = torch.rand(batch, 3, 32, 32) * 2 - 1
    opt = torch.optim.AdamW(tok.parameters(), 1e-3)

    def fwd_bwd():
        y = tok.decode(tok.encode(x).sample())
        (y - x).abs().mean().backward()

    def step():
        fwd_bwd()
        opt.step()
        opt.zero_grad(set_to_none=True)

    flops = flops_of(fwd_bwd)
    opt.zero_grad(set_to_none=True)
    return f"tiny KL-AE train step, batch {batch} at 32²", step, flops, None


def dit_loop(batch: int, compiled: bool):
    torch.manual_seed(0)
    model = build_dit("DiT-S/2", input_size=8, in_channels=16, num_classes=10, depth=6, hidden_size=192,
                      num_heads=3)
    opt = torch.optim.AdamW(model.parameters(), 5e-4)
    x, t, y = torch.randn(batch, 16, 8, 8), torch.rand(batch), torch.randint(0, 10, (batch,))
    fwd = torch.compile(model) if compiled else model

    def fwd_bwd(net=model):
        (net(x, t, y) - x).pow(2).mean().backward()

    def step():
        fwd_bwd(fwd)
        opt.step()
        opt.zero_grad(set_to_none=True)

    flops = flops_of(fwd_bwd)
    opt.zero_grad(set_to_none=True)
    name = f"DiT-S/2 d6 w192 train step, batch {batch}, 16×8×8" + (" (torch.compile)" if compiled else "")
    return name, step, flops, None


def inception_loop(weights: Path, batch: int, channels_last: bool, steps: int):
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    model = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                        feature_extractor_weights_path=str(weights)).eval()
    x = torch.randint(0, 256, (batch, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)

    @torch.inference_mode()
    def step():
        model(x)

    flops = flops_of(step)
    layout = "channels-last" if channels_last else "NCHW"
    # seconds per batch: ``steps`` timed batches after one warm-up instead of the loops' defaults
    return f"Inception-v3 forward, {batch} images 32²→299², {layout}", step, flops, (steps, 1)


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    ceiling = gemm_ceiling(args.gemm, args.steps)
    print(f"torch {torch.__version__}, {args.threads} thread(s); ceiling: {args.gemm}² fp32 matmul "
          f"{ceiling:.1f} GFLOP/s")
    loops = []
    if "ae" in args.only:
        loops.append(ae_loop(args.ae_batch))
    if "dit" in args.only:
        loops.append(dit_loop(args.dit_batch, compiled=False))
        if args.compile:
            loops.append(dit_loop(args.dit_batch, compiled=True))
    if "inception" in args.only:
        if not args.inception.is_file():
            raise SystemExit(f"Inception weights not found at {args.inception}: pass --inception PATH "
                             "(../shared/data/inception/pt_inception-2015-12-05-reconstructed-nofc.pth)")
        loops += [inception_loop(args.inception, args.inception_batch, cl, args.inception_steps)
                  for cl in (False, True)]
    print("| loop | GFLOP / step | s / step | GFLOP/s | of the ceiling | warm-up s |")
    print("| --- | --- | --- | --- | --- | --- |")
    rows = []
    for name, step, flops, timing in loops:
        per, warm = timed(step, *(timing or (args.steps, args.warmup)))
        rate = flops / per / 1e9
        rows.append({"loop": name, "gflop": flops / 1e9, "seconds": per, "gflops": rate, "share": rate / ceiling})
        print(f"| {name} | {flops / 1e9:.2f} | {per:.3f} | {rate:.1f} | {100 * rate / ceiling:.0f} % | {warm:.1f} |",
              flush=True)
    return {"ceiling_gflops": ceiling, "rows": rows}


if __name__ == "__main__":
    main()
