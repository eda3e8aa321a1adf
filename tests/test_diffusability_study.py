"""The validation driver of `ssr diffusability` on its toy size (the full study is not run in tests)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]


def _study():
    spec = importlib.util.spec_from_file_location("dfz_study", ROOT / "studies" / "diffusability" / "study.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_toy_study_writes_a_report_and_resumes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    study = _study()
    out = tmp_path / "study"
    assert study.main(["--toy", "--out", str(out), "--seeds", "0", "1"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert set(report["truth"]) == {"klae-random", "noise-0.5", "noise-2", "permute", "mix"}
    assert report["ground_truth"] == "flow_loss_mean"  # no Inception weights in the toy recipe
    probe = report["proxies"]["flow_loss_mean"]
    assert len(probe["rho_per_seed"]) == 2 and all(-1 <= r <= 1 for r in probe["rho_per_seed"])
    assert len(probe["p_per_seed"]) == 2 and all(0 < p <= 1 for p in probe["p_per_seed"])
    assert report["proxies"]["ifid"]["verdict"] == "not computed"
    text = (out / "report.md").read_text()
    assert "agreement ρ" in text and (out / "report.png").is_file() and (out / "spaces.png").is_file()
    # The spatial permutation only moves positions: the per-channel statistics cannot see it.
    base = json.loads((out / "klae-random" / "seed0" / "diffusability.json").read_text())
    perm = json.loads((out / "permute" / "seed0" / "diffusability.json").read_text())
    assert perm["summary"]["effective_rank"] == pytest.approx(base["summary"]["effective_rank"], rel=1e-5)
    assert perm["proxies"]["stats"]["kurtosis_mean"] == pytest.approx(base["proxies"]["stats"]["kurtosis_mean"],
                                                                      rel=1e-5, abs=1e-6)
    # Running it again recomputes nothing: every part is kept as it was.
    parts = sorted(out.glob("*/*/parts/*.json"))
    stamps = [p.stat().st_mtime_ns for p in parts]
    assert study.main(["--toy", "--out", str(out), "--seeds", "0", "1"]) == 0
    assert [p.stat().st_mtime_ns for p in parts] == stamps


def test_spaces_option_selects_in_order_and_names_unknown_ones(tmp_path):
    study = _study()
    spaces = study.toy_spaces(tmp_path)
    picked = study.select_spaces(spaces, ["mix", "klae-random"])
    assert [s.name for s in picked] == ["mix", "klae-random"]
    with pytest.raises(SystemExit, match=r"unknown space\(s\) nope; known: klae-random, noise-0.5"):
        study.select_spaces(spaces, ["mix", "nope"])


def test_spearman_p_is_the_exact_permutation_p_value():
    study = _study()
    # closed forms: a perfect ranking of n values is matched by 2 of the n! orderings (itself and its reverse)
    assert study.spearman_p([1, 2, 3], [10, 20, 30]) == pytest.approx(2 / 6)
    assert study.spearman_p([1, 2, 3, 4, 5], [5, 4, 3, 2, 1]) == pytest.approx(2 / 120)
    # against scipy's own exact permutation test (two-sided = twice the smaller tail; the null is symmetric)
    import numpy as np
    from scipy.stats import permutation_test, spearmanr

    x, y = [0.3, 1.2, 0.7, 2.2, 1.9, 0.1], [1.0, 0.4, 2.5, 3.1, 1.7, 0.2]
    ref = permutation_test((x,), lambda a: spearmanr(a, y).statistic, permutation_type="pairings",
                           alternative="two-sided", n_resamples=np.inf).pvalue  # the 6! orderings of x
    assert study.spearman_p(x, y) == pytest.approx(ref)


def test_report_ranks_one_tokenizers_spaces_alone(tmp_path, monkeypatch):
    """Three KL-AE spaces whose proxy orders them exactly as the ground truth, and a TAEF2 space that the proxy
    puts last and the ground truth first: ρ over all four is 1 − 6·Σd²/(n(n²−1)) = 1 − 6·12/60 = −0.2, over the
    KL-AE spaces 1 with p = 2/3! (the identity and the reverse ordering reach |ρ| = 1)."""
    import ssr_cli.stages.diffusability as stage

    monkeypatch.setattr(stage, "plot_diffusability", lambda runs, path: path)
    study = _study()
    truth, proxy = {"a": 1.0, "b": 2.0, "c": 3.0, "t": 0.5}, {"a": 0.1, "b": 0.2, "c": 0.3, "t": 9.0}
    for name in truth:
        for sub, summary in (("gt", {"flow_fid": truth[name]}), ("seed0", {"flow_loss_mean": proxy[name]})):
            (tmp_path / name / sub).mkdir(parents=True)
            (tmp_path / name / sub / "diffusability.json").write_text(json.dumps({"summary": summary}))
    study.write_report(tmp_path, list(truth), [0], toy=True,
                       tokenizer_of={"a": "kl-ae", "b": "kl-ae", "c": "kl-ae", "t": "taef2"})
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["proxies"]["flow_loss_mean"]["rho_per_seed"] == [pytest.approx(-0.2)]
    within = report["within_one_tokenizer"]
    assert within["tokenizer"] == "kl-ae" and within["spaces"] == ["a", "b", "c"]
    assert within["proxies"]["flow_loss_mean"]["rho_per_seed"] == [pytest.approx(1.0)]
    assert within["proxies"]["flow_loss_mean"]["p_per_seed"] == [pytest.approx(2 / 6)]
    assert "Within one tokenizer: the 3 kl-ae spaces" in (tmp_path / "report.md").read_text()
