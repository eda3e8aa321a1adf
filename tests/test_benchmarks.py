"""The benchmark scripts stay runnable: a tiny CPU run of each prints its figures (not timed here)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"

pytestmark = pytest.mark.usefixtures("one_thread")


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_finetune_reports_both_branches(capsys):
    _load("bench_finetune").main(["--size", "tiny", "--resolution", "32", "--batch", "2", "--steps", "1",
                                  "--warmup", "1", "--device", "cpu", "--precision", "fp32"])
    out = capsys.readouterr().out
    rates = re.findall(r"(recon|ssr) branch:\s+([0-9.e+-]+) img/s", out)
    assert [b for b, _ in rates] == ["recon", "ssr"] and all(float(r) > 0 for _, r in rates)
    assert out.count("GiB") == 2


def test_bench_dit_reports_throughput_flops_and_memory(capsys):
    _load("bench_dit").main(["--model", "DiT-S/2", "--batch", "2", "--input-size", "8", "--steps", "1",
                             "--warmup", "1", "--no-compile", "--precision", "fp32", "--device", "cpu"])
    out = capsys.readouterr().out
    assert re.search(r"throughput: [0-9.]+ img/s", out)
    assert re.search(r"[0-9.]+ GFLOP forward per image", out) and "GiB" in out


def test_bench_sample_reports_throughput(capsys):
    _load("bench_sample").main(["--model", "DiT-S/2", "--depth", "2", "--hidden-size", "64", "--heads", "2",
                                "--input-size", "8", "--batch", "2", "--steps", "2", "--cfg-scale", "1.5",
                                "--batches", "1", "--no-compile", "--precision", "fp32", "--device", "cpu"])
    out = capsys.readouterr().out
    rate = re.search(r"throughput: ([0-9.]+) img/s, ([0-9.]+) image-NFE/s", out)
    # CFG doubles the batch: 2 steps x 2 evaluations per image
    assert rate and abs(float(rate.group(2)) / float(rate.group(1)) - 4.0) < 0.05


def test_bench_inception_reports_throughput(capsys, shared_data):
    weights = shared_data / "inception" / "pt_inception-2015-12-05-reconstructed-nofc.pth"
    _load("bench_inception").main(["--weights", str(weights), "--resolution", "16", "--batch", "1",
                                   "--batches", "1", "--warmup", "0", "--device", "cpu"])
    out = capsys.readouterr().out
    assert re.search(r"throughput: [0-9.]+ img/s", out) and "GiB" in out


@pytest.mark.slow  # two child processes that each import torch (~12 s on the 2-core machine)
def test_bench_eval_memory_reads_the_same_pixels_both_ways(capsys):
    result = _load("bench_eval_memory").main(["--num", "40", "--resolution", "32", "--batch", "8"])
    assert result["load-all"]["images"] == result["stream"]["images"] == 40
    assert "peak RSS" in capsys.readouterr().out


@pytest.mark.slow  # child processes that each import torch
def test_bench_threads_measures_each_setting_alone_and_beside_a_competitor(capsys):
    results = _load("bench_threads").main(["--threads", "1", "--steps", "1", "--reps", "1",
                                           "--competitor-threads", "1"])
    assert set(results) == {"alone", "beside a 1-thread job"}
    assert all(r["1 thread(s), fp32"][0] > 0 for r in results.values())


def test_bench_cpu_roofline_counts_the_dit_step_as_three_forwards(capsys):
    """The roofline's FLOPs of a DiT training step (PyTorch's counter over forward + backward) are three times the
    forward FLOPs of ``flops_per_image`` (every matmul, attention included); each loop's share of the ceiling is
    its rate over the ceiling's, and the printed table has a row per loop."""
    from ssr_cli.models.dit import build_dit, flops_per_image

    result = _load("bench_cpu_roofline").main(["--only", "ae", "dit", "--ae-batch", "2", "--dit-batch", "2",
                                               "--steps", "1", "--warmup", "0", "--gemm", "64"])
    out = capsys.readouterr().out
    assert [r["loop"].split()[0] for r in result["rows"]] == ["tiny", "DiT-S/2"]
    assert len(re.findall(r"^\| (tiny|DiT-S/2) .* % \|", out, re.M)) == 2
    model = build_dit("DiT-S/2", input_size=8, in_channels=16, num_classes=10, depth=6, hidden_size=192, num_heads=3)
    assert result["rows"][1]["gflop"] == pytest.approx(3 * 2 * flops_per_image(model) / 1e9, rel=0.02)
    for row in result["rows"]:
        assert row["share"] == pytest.approx(row["gflops"] / result["ceiling_gflops"], rel=1e-9)
        assert row["gflops"] == pytest.approx(row["gflop"] / row["seconds"], rel=1e-9)


@pytest.mark.slow  # the old and new curves figures and the CIFAR-10 train tar listed twice: ~10 s
def test_bench_overheads_compares_old_and_new_and_the_fids_agree(capsys):
    """Old (from git history) against new on the same inputs: the curves and tar listing run both ways, and the
    new covariance-route FID equals the exact rows route where that applies (the old one need not)."""
    import subprocess

    known = subprocess.run(["git", "cat-file", "-e", "cf7ffc4^{commit}"], cwd=BENCH.parent, capture_output=True)
    if known.returncode != 0:
        pytest.skip("needs the git history (commit cf7ffc4) for the old code")
    result = _load("bench_overheads").main(["--dim", "256", "--reps", "1", "--no-imports"])
    assert "training curves, 17 panels" in result["rows"]
    assert all(old > 0 and new > 0 for old, new in result["rows"].values())
    exact = result["fids"][150]["rows (exact)"]
    assert result["fids"][150]["new"] == pytest.approx(exact, rel=1e-10)
    assert "| this tree (s) |" in capsys.readouterr().out
