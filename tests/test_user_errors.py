"""One user-error type (issue 12): :class:`ssr_cli.errors.UserError` and what derives from it (RecipeError,
WeightsError, UserValueError, UserFileNotFoundError, …) is what the CLI turns into one line and exit code 2; any
other exception, a plain ValueError / FileNotFoundError / KeyError included, is a bug and keeps its traceback."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from ssr_cli.cli import app
from ssr_cli.errors import UserError, UserFileNotFoundError, UserRuntimeError, UserValueError

QUICK = str(Path(__file__).resolve().parents[1] / "recipes" / "quickstart.toml")
ENV = {"COLUMNS": "400", "NO_COLOR": "1"}  # wide enough that rich does not wrap the one error line

pytestmark = pytest.mark.usefixtures("one_thread")


def _invoke(*args) -> object:
    return CliRunner().invoke(app, [str(a) for a in args], env=ENV)


def _in(tmp_path: Path) -> tuple[str, str]:
    return "--set", f'run.out_dir="{tmp_path}"'


def one_error_line(result) -> str:
    """Exit 2, exactly one ``error: …`` line on stderr that nothing continues, no traceback (a note such as "no
    fine-tuned tokenizer …; using tokenizer.weights" may come before it)."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr
    assert not any(line.startswith((" ", "\t")) for line in lines), result.stderr
    return errors[0]


def test_the_siblings_keep_their_builtin_type():
    for cls, builtin in ((UserValueError, ValueError), (UserFileNotFoundError, FileNotFoundError),
                         (UserRuntimeError, RuntimeError)):
        assert issubclass(cls, UserError) and issubclass(cls, builtin)
    with pytest.raises(ValueError, match="grid 8x8 has 64 basis functions"):  # callers catching the builtin
        from ssr_cli.bases import grid_for_channels

        grid_for_channels(16, "8x8")


# ------------------------------------------------------------------ user errors: one line, exit 2


def test_missing_tokenizer_weights_file_is_one_line(tmp_path):
    missing = tmp_path / "nope.safetensors"
    line = one_error_line(_invoke("encode-latents", QUICK, *_in(tmp_path), "--set", f'tokenizer.weights="{missing}"'))
    assert "weights file not found" in line and "nope.safetensors" in line


def test_grid_that_does_not_fit_the_channels_is_one_line(tmp_path):
    line = one_error_line(_invoke("finetune", QUICK, *_in(tmp_path), "--set", 'regularizer.grid="8x8"'))
    assert "regularizer.grid = '8x8' has W·H = 64 basis functions" in line and "16 channels" in line


def test_missing_reference_file_is_one_line(tmp_path, monkeypatch):
    import ssr_cli.stages.evaluate as evaluate

    samples = tmp_path / "samples.npz"
    np.savez(samples, arr_0=np.zeros((2, 16, 16, 3), dtype=np.uint8))
    # No Inception weights are needed to find that the reference is missing: a stand-in extractor.
    monkeypatch.setattr(evaluate, "load_inception", lambda cfg, device: (object(), None))
    line = one_error_line(_invoke("evaluate", QUICK, *_in(tmp_path), "--gfid", "--samples", samples,
                                  "--set", "eval.reconstruction=false",
                                  "--set", f'eval.reference="{tmp_path / "ref.npz"}"'))
    assert "reference file not found" in line and "ref.npz" in line


def test_batch_size_the_ranks_do_not_divide_is_one_line(tmp_path):
    line = one_error_line(_invoke("finetune", QUICK, *_in(tmp_path), "--set", "train.batch_size=3",
                                  "--set", "train.grad_accum=2"))
    assert "train.batch_size (3) must be divisible by ranks × train.grad_accum (2)" in line


def test_a_message_ending_in_a_quote_keeps_it(tmp_path, monkeypatch):
    import ssr_cli.stages.train_dit as train_dit

    monkeypatch.setattr(train_dit, "run", lambda cfg, rt: (_ for _ in ()).throw(
        UserValueError("regularizer.kind must be one of ssr, none, got 'foo'")))
    assert one_error_line(_invoke("train-dit", QUICK, *_in(tmp_path))).endswith("got 'foo'")


# ------------------------------------------------------------------ internal errors keep their traceback


@pytest.mark.parametrize("exc", [ValueError("internal"), FileNotFoundError("internal"), KeyError("internal"),
                                 RuntimeError("internal")], ids=lambda e: type(e).__name__)
def test_an_internal_error_in_a_stage_is_not_exit_2(tmp_path, monkeypatch, exc):
    import ssr_cli.stages.train_dit as train_dit

    def broken(cfg, rt):
        raise exc

    monkeypatch.setattr(train_dit, "run", broken)
    result = _invoke("train-dit", QUICK, *_in(tmp_path))
    assert result.exit_code != 2, result.output
    assert result.exception is exc  # raised as it is, for its traceback
    assert "error: internal" not in result.output
    assert not (tmp_path / "quickstart" / ".lock").exists()  # the run lock is still released


@pytest.mark.parametrize("command", ["evaluate", "finetune", "pipeline"])
def test_an_internal_error_in_a_dry_run_is_not_exit_2(monkeypatch, command):
    import ssr_cli.stages.pipeline as pipeline

    def broken(cfg, stages=()):
        raise ValueError("internal")

    monkeypatch.setattr(pipeline, "check_builds", broken)
    result = _invoke(command, QUICK, "--dry-run")
    assert result.exit_code != 2, result.output
    assert isinstance(result.exception, ValueError) and str(result.exception) == "internal"


def test_a_user_error_in_a_dry_run_is_still_exit_2(monkeypatch):
    import ssr_cli.stages.pipeline as pipeline

    def refused(cfg, stages=()):
        raise UserFileNotFoundError("weights file not found: x.safetensors")

    monkeypatch.setattr(pipeline, "check_builds", refused)
    for command in ("evaluate", "finetune"):
        assert one_error_line(_invoke(command, QUICK, "--dry-run")).endswith("weights file not found: x.safetensors")


def test_a_reference_file_with_wrong_statistics_is_a_user_error(tmp_path):
    from ssr_cli.metrics import load_reference
    from ssr_cli.metrics.reference import REFERENCE_FORMAT

    np.savez(tmp_path / "shapes.npz", mu=np.zeros(3), sigma=np.eye(2))
    with pytest.raises(UserValueError, match=r"shapes\.npz: `mu` float64 \(3,\) and `sigma` float64 \(2, 2\)"):
        load_reference(tmp_path / "shapes.npz")
    np.savez(tmp_path / "ssr.npz", format=np.array(REFERENCE_FORMAT), mu=np.zeros(2), sigma=np.eye(2))
    with pytest.raises(UserValueError, match="an ssr reference without num_images, pool"):  # was a KeyError
        load_reference(tmp_path / "ssr.npz")


def test_a_damaged_latent_manifest_or_dit_config_is_one_line(tmp_path):
    """Files a run wrote itself, damaged (e.g. a disk filled up): a user error naming the file and the fix."""
    from ssr_cli.recipe import load

    cfg = load(QUICK, [f'run.out_dir="{tmp_path}"'])
    (cfg.run_dir() / "latents").mkdir(parents=True)
    (cfg.run_dir() / "latents" / "manifest.json").write_text('{"latent_shape": [16, 8')
    line = one_error_line(_invoke("train-dit", QUICK, *_in(tmp_path)))
    assert "manifest.json is not valid JSON" in line and "encode-latents" in line
    (cfg.run_dir() / "dit").mkdir()
    (cfg.run_dir() / "dit" / "dit_config.json").write_text("{")
    line = one_error_line(_invoke("sample", QUICK, *_in(tmp_path)))
    assert "dit_config.json is not valid JSON" in line and "train-dit" in line
