"""The study drivers stay runnable: each on a toy size, checking that it writes its report and skips finished runs."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest

from ssr_cli.engine.lock import exclusive

ROOT = Path(__file__).resolve().parents[1]


def _load(path: Path):
    spec = importlib.util.spec_from_file_location(f"_study_{path.parent.name}_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve a module's annotations through sys.modules
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # four CLI runs
def test_quickstart_seed_driver_reports_and_skips_finished_runs(tmp_path, capsys, monkeypatch, ssr_in_process):
    driver = _load(ROOT / "studies" / "quickstart_seeds" / "driver.py")
    monkeypatch.setattr(driver, "run_command", ssr_in_process)
    argv = ["--seeds", "0", "--steps", "1", "--pretrain-steps", "2", "--out", str(tmp_path / "runs"),
            "--results", str(tmp_path / "results"), "--set", "probe.score_images=8"]
    driver.main(argv)
    report = json.loads((tmp_path / "results" / "report.json").read_text())
    assert sorted(r["arm"] for r in report["runs"]) == ["none", "ssr"]
    assert all(r["finetune_s"] > 0 for r in report["runs"])
    stamp = (tmp_path / "runs" / "s0-ssr" / "probe" / "probe.json").stat().st_mtime_ns
    capsys.readouterr()
    driver.main(argv)
    assert "s0-ssr: finished, skipped" in capsys.readouterr().out
    assert (tmp_path / "runs" / "s0-ssr" / "probe" / "probe.json").stat().st_mtime_ns == stamp


@pytest.mark.slow  # pretrain, reference, one whole chain (pipeline, Kodak, diffusability) at toy size
def test_cifar10_study_driver_runs_a_toy_chain_reports_and_then_does_nothing(tmp_path, capsys, monkeypatch,
                                                                            ssr_in_process):
    study = _load(ROOT / "studies" / "cifar10" / "study.py")
    monkeypatch.setattr(study, "run_command", ssr_in_process)
    results = tmp_path / "results"
    argv = ["--toy", "--only", "none", "--threads", "1", "--out", str(tmp_path / "runs"), "--results", str(results)]
    assert study.main(argv) == 0
    report = json.loads((results / "report.json").read_text())
    row = report["rows"]["none-s0"]
    # every measure of the chain was produced by its command: reconstruction, Kodak, generation, probe, proxies
    for key in ("psnr", "ssim", "kodak_psnr", "gfid", "psnr_half", "dyn_err", "flow_loss", "ifid", "hf"):
        assert row[key] is not None and row[key] == row[key], key
    assert 5.0 < row["psnr"] < 60.0 and row["gfid"] > 0
    assert "none-s0" not in report["pending"] and "ssr-s0" in report["pending"]
    assert "| recon only |" in (results / "report.md").read_text()
    stamp = (tmp_path / "runs" / "none-s0" / "eval.json").stat().st_mtime_ns
    capsys.readouterr()
    assert study.main(argv) == 0
    out = capsys.readouterr().out
    assert "none-s0: finished, skipped" in out and "nothing to do" in out
    assert (tmp_path / "runs" / "none-s0" / "eval.json").stat().st_mtime_ns == stamp

    # a fresh checkout: the run folders are gone, only the committed results (jsons, the pretrained copy) remain.
    # The pretraining is not redone (the committed bytes are used), and the finished run is not redone either.
    kept = results / "shared" / "pretrain_tokenizer.safetensors"
    assert kept.is_file() and "pretrain" in json.loads((results / "runs" / "pretrain" / "steps.json").read_text())
    shutil.rmtree(tmp_path / "runs")
    assert study.main(argv) == 0
    out = capsys.readouterr().out
    assert "pretrain: the committed copy" in out and "$ ssr finetune" not in out
    assert "none-s0: finished in an earlier session" in out and "$ ssr pipeline" not in out
    # nor is the FID reference remade: no run still to do measures gFID
    assert "--make-ref" not in out and not (tmp_path / "runs" / "ref_test.npz").exists()
    assert (tmp_path / "runs" / "pretrain" / "tokenizer.safetensors").read_bytes() == kept.read_bytes()
    assert not (tmp_path / "runs" / "none-s0").exists()
    # a changed arm (another seed's overrides are a different run) is not mistaken for the finished one
    assert [f"{a.name}-s{s}" for a, s in study.plan(["none"], False, [1])] == ["none-s1"]


def test_drivers_run_commands_in_child_processes(tmp_path, monkeypatch, capfd):
    """The drivers' own ``run_command`` (which the chain tests above swap for an in-process call) starts
    ``python -m ssr_cli`` from the repository root, and a failing command raises CalledProcessError."""
    import subprocess

    monkeypatch.chdir(tmp_path)  # the child runs from the repository root whatever the caller's folder
    for path in (ROOT / "studies" / "cifar10" / "study.py", ROOT / "studies" / "quickstart_seeds" / "driver.py"):
        driver = _load(path)
        driver.run_command(["evaluate", "--help"])
        assert "Usage" in capfd.readouterr().out
        with pytest.raises(subprocess.CalledProcessError):
            driver.run_command(["evaluate", "recipes/no_such_recipe.toml"])


def test_study_step_lock_is_exclusive_between_holders(tmp_path):
    lock = tmp_path / ".pretrain.lock"
    with exclusive(lock, blocking=False) as first:
        with exclusive(lock, blocking=False) as second:
            assert first is True and second is False
    with exclusive(lock, blocking=False) as again:
        assert again is True


def test_cifar10_study_driver_skips_a_run_another_driver_holds(tmp_path, capsys, monkeypatch):
    study = _load(ROOT / "studies" / "cifar10" / "study.py")
    out = tmp_path / "runs"
    ran = []
    monkeypatch.setattr(study.Study, "shared", lambda self, need_reference=True: (out / "p.safetensors", out / "ref.npz"))
    monkeypatch.setattr(study.Study, "run", lambda self, arm, seed, p, r: ran.append(f"{arm.name}-s{seed}") or True)
    monkeypatch.setattr(study.Study, "finished", lambda self, spec: False)
    monkeypatch.setattr(study, "sha256", lambda path: "0" * 64)
    with exclusive(out / ".none-s0.lock", blocking=False) as held:  # "the other driver" holds none-s0
        assert held
        failed = study.run_study(study.Study(out=out, results=tmp_path / "results"), ["main"], False, [0])
    assert failed == [] and "none-s0: another driver is running it" in capsys.readouterr().out
    assert ran == ["ssr-s0", "eq_vae-s0", "scale-s0", "pretrained-s0"]


def test_diffusability_report_ranks_proxies_against_the_cifar10_gfid(tmp_path):
    """The fine-tune section of the validation report: a proxy that orders the runs as their gFID does gets
    ρ = +1, one that orders them backwards −1 (the sign follows whether lower is better), runs without a gFID are
    left out, and fewer than three runs give no section."""
    study = _load(ROOT / "studies" / "diffusability" / "study.py")
    gfids = {"a-s0": 100.0, "b-s0": 105.0, "c-s0": 111.0, "d-s0": 120.0}
    for i, (name, fid) in enumerate(gfids.items()):
        run = tmp_path / name
        run.mkdir()
        # flow loss grows with gFID (lower is better: agrees), effective rank grows too (higher is better: disagrees)
        summary = {"flow_loss_mean": 0.5 + i, "effective_rank": 3.0 + i, "ifid": None}
        (run / "diffusability.json").write_text(json.dumps({"summary": summary}))
        (run / "eval.json").write_text(json.dumps({"generation": {"fid": fid}}))
    no_gen = tmp_path / "e-s0"
    no_gen.mkdir()
    (no_gen / "diffusability.json").write_text(json.dumps({"summary": {"flow_loss_mean": 9.0}}))
    (no_gen / "eval.json").write_text(json.dumps({"generation": None}))
    result = study.finetune_agreement(tmp_path)
    assert sorted(result["runs"]) == sorted(gfids)
    assert result["proxies"]["flow_loss_mean"]["rho"] == pytest.approx(1.0)
    # exact two-sided p over the 4! orders: only the identity and the reversal reach |ρ| = 1
    assert result["proxies"]["flow_loss_mean"]["p"] == pytest.approx(2 / 24)
    assert result["proxies"]["effective_rank"]["rho"] == pytest.approx(-1.0)
    assert result["proxies"]["ifid"]["runs"] == 0
    for name in ("c-s0", "d-s0"):
        shutil.rmtree(tmp_path / name)
    assert study.finetune_agreement(tmp_path) is None


def test_cifar10_report_calls_a_difference_only_when_its_t_interval_excludes_zero():
    """The verdicts use a two-sided 95 % Student-t interval over the seeds. With 2 seeds (1 degree of freedom) the
    t distribution is the Cauchy one, whose 0.975 quantile is tan(0.475 π) ≈ 12.706: two consistent seeds whose
    mean is 8.5 standard errors from zero are not yet a result; with 3 seeds the quantile is 4.303."""
    import math

    study = _load(ROOT / "studies" / "cifar10" / "study.py")
    diffs = [1.0, 3.0]  # mean 2, sample std √2, standard error 1
    lo, hi = study._t_interval(diffs)
    q = math.tan(0.475 * math.pi)
    assert lo == pytest.approx(2.0 - q, rel=1e-9) and hi == pytest.approx(2.0 + q, rel=1e-9)
    assert "includes 0" in study._verdict("x", diffs, lower=True)
    tight = [1.0, 1.1]  # mean 1.05, standard error 0.05: 1.05 ± 0.635 excludes zero
    assert "worse, the interval excludes 0" in study._verdict("x", tight, lower=True)
    assert "better, the interval excludes 0" in study._verdict("x", tight, lower=False)
    assert "same sign in 2 of 2" in study._verdict("x", tight, lower=True)
    three = [1.0, 2.0, 3.0]  # mean 2, standard error 1/√3, quantile 4.3027 (tables)
    lo3, hi3 = study._t_interval(three)
    assert hi3 - 2.0 == pytest.approx(4.302653 / math.sqrt(3), rel=1e-6)
    assert "one seed" in study._verdict("x", [0.5], lower=True)
    assert all(math.isnan(v) for v in study._t_interval([0.5]))


def test_cifar10_report_draws_the_gfid_figure_from_the_rows(tmp_path):
    study = _load(ROOT / "studies" / "cifar10" / "study.py")
    assert study.plot_gfid({}, tmp_path / "g.png") is None  # no gFID yet: no figure
    rows = {("none", 0): {"gfid": 110.0}, ("none", 1): {"gfid": 109.0}, ("ssr", 0): {"gfid": 111.0},
            ("ssr", 1): {"gfid": 112.0}, ("eq_vae", 0): {"gfid": 101.0}}
    path = study.plot_gfid(rows, tmp_path / "g.png")
    assert path == tmp_path / "g.png" and path.stat().st_size > 5000
    assert [f.name for f in tmp_path.iterdir()] == ["g.png"]  # written atomically: no temporary file left
