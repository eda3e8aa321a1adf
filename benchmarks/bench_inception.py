"""Inception-v3 feature extraction throughput: what ``ssr evaluate`` runs on every image for FID/sFID/IS.

uint8 images of ``--resolution`` (resized to 299 inside, as torch-fidelity does) through the FID
Inception-v3 from a local weights file; reports images/s and peak memory.

    python benchmarks/bench_inception.py --weights ../shared/data/inception/pt_inception-2015-12-05-reconstructed-nofc.pth \
        --resolution 256 --batch 250 --batches 4
    python benchmarks/bench_inception.py --weights ../shared/data/inception/pt_inception-2015-12-05-reconstructed-nofc.pth \
        --resolution 32 --batch 50 --batches 2 --device cpu
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ssr_cli.engine.runtime import peak_memory  # noqa: E402

from ssr_cli.metrics import InceptionFeatures  # noqa: E402

DEFAULT_WEIGHTS = (Path(__file__).resolve().parents[2] / "shared" / "data" / "inception"
                   / "pt_inception-2015-12-05-reconstructed-nofc.pth")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS)
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--batch", type=int, default=250)
    p.add_argument("--batches", type=int, default=4, help="timed batches")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    extractor = InceptionFeatures(args.weights, device=device)
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.batch, 3, args.resolution, args.resolution), dtype=torch.uint8,
                           generator=gen)
    print(f"Inception-v3 features: batch {args.batch} at {args.resolution}², device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if cuda else ""))
    for _ in range(args.warmup):
        extractor(images)
    t0 = time.perf_counter()
    for _ in range(args.batches):
        extractor(images)  # returns numpy arrays: the device is synchronised by the copy back
    elapsed = time.perf_counter() - t0
    peak = peak_memory(device)
    print(f"throughput: {args.batch * args.batches / elapsed:.1f} img/s")
    print(f"peak memory: {peak}")


if __name__ == "__main__":
    main()
