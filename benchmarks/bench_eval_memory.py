"""Peak host memory of reading an ADM ``samples.npz`` for evaluation: whole array (before issue 16) vs streamed.

Writes a synthetic uint8 NHWC batch of ``--num`` images at ``--resolution`` (streamed, so writing is cheap in
memory), then reads it in a fresh child process per mode and reports the child's peak RSS:

* ``load-all``: ``np.load(path)["arr_0"]`` then batches of it (what ``ssr evaluate`` did before);
* ``stream``: :func:`ssr_cli.npz.iter_npz_batches` (what it does now).

Each batch goes through the same per-batch work: a uint8 NCHW tensor and its running mean (Inception's own
memory is the same in both modes and does not grow with the number of images, so it is left out unless
``--inception`` gives its weights, which makes the run CPU-heavy).

    python benchmarks/bench_eval_memory.py --num 2000 --resolution 256
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, resource, sys
import numpy as np, torch
sys.path.insert(0, {root!r})
from ssr_cli.npz import iter_npz_batches
path, mode, batch, inception = {path!r}, {mode!r}, {batch}, {inception!r}
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
extractor = None
if inception:
    from ssr_cli.metrics import InceptionFeatures
    extractor = InceptionFeatures(inception)
if mode == "load-all":
    with np.load(path) as f:
        arr = f["arr_0"]
    batches = (arr[i:i + batch] for i in range(0, len(arr), batch))
else:
    batches = iter_npz_batches(path, batch_size=batch)
total, n = 0.0, 0
for rows in batches:
    x = torch.from_numpy(rows).permute(0, 3, 1, 2)
    if extractor is not None:
        extractor(x)
    total += float(x.double().mean()) * x.shape[0]
    n += x.shape[0]
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({{"images": n, "mean": total / n, "peak_rss_mib": peak / 1024, "start_rss_mib": base / 1024}}))
"""


def write_samples(path: Path, num: int, resolution: int, seed: int = 0) -> Path:
    import numpy as np

    sys.path.insert(0, str(ROOT))
    from ssr_cli.npz import NpzWriter

    rng = np.random.default_rng(seed)
    with NpzWriter(path) as writer:
        writer.add_stream("arr_0", (num, resolution, resolution, 3), np.uint8)
        for start in range(0, num, 64):
            n = min(64, num - start)
            writer.write("arr_0", rng.integers(0, 256, (n, resolution, resolution, 3), dtype=np.uint8))
        writer.add("arr_1", np.arange(num, dtype=np.int64) % 10)
    return path


def measure(path: Path, mode: str, batch: int, inception: str | None) -> dict:
    code = CHILD.format(root=str(ROOT), path=str(path), mode=mode, batch=batch, inception=inception)
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num", type=int, default=2000)
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--inception", default=None, help="TF-Inception weights: also run the real feature extractor")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        path = write_samples(Path(tmp) / "samples.npz", args.num, args.resolution)
        size_mib = path.stat().st_size / 2**20
        print(f"samples.npz: {args.num} images of {args.resolution}², {size_mib:.1f} MiB; batch {args.batch}")
        results = {}
        for mode in ("load-all", "stream"):
            r = measure(path, mode, args.batch, args.inception)
            results[mode] = r
            print(f"{mode:>9}: peak RSS {r['peak_rss_mib']:.0f} MiB (process start {r['start_rss_mib']:.0f} MiB), "
                  f"{r['images']} images read")
        if results["load-all"]["mean"] != results["stream"]["mean"]:
            raise SystemExit("the two modes read different pixels")
        print(f"streaming saves {results['load-all']['peak_rss_mib'] - results['stream']['peak_rss_mib']:.0f} MiB "
              f"of {size_mib:.0f} MiB of images")
    return {"size_mib": size_mib, **results}


if __name__ == "__main__":
    main()
