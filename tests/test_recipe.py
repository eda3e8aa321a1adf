"""Recipe schema: unknown keys, wrong types, cross-field conflicts, overrides, round trip, shipped recipes."""

from __future__ import annotations

import tomllib
import typing
from pathlib import Path

import pytest
from pydantic import BaseModel

from ssr_cli.recipe import Recipe, RecipeError, dump, from_dict, load, parse_override, write_resolved

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.toml"))


def _write(tmp_path, text: str) -> Path:
    p = tmp_path / "r.toml"
    p.write_text(text)
    return p


def test_unknown_key_names_key_and_file(tmp_path):
    p = _write(tmp_path, "[train]\nstepz = 10\n")
    with pytest.raises(RecipeError) as info:
        load(p)
    assert "train.stepz" in str(info.value) and str(p) in str(info.value) and "unknown key" in str(info.value)
    assert "did you mean 'steps'?" in str(info.value)


def test_renamed_regularizer_weights_say_their_new_names(tmp_path):
    with pytest.raises(RecipeError) as info:
        load(_write(tmp_path, "[regularizer]\nlambda_lpips = 0.0\nlambda_mae = 1.0\n"))
    text = str(info.value)
    assert "regularizer.lambda_lpips: renamed to regularizer.lambda_pred_lpips" in text
    assert "regularizer.lambda_mae: renamed to regularizer.lambda_pred_mae" in text
    cfg = load(_write(tmp_path, "[regularizer]\nlambda_pred_lpips = 0.0\n[loss]\nlambda_lpips = 0.2\n"))
    assert cfg.regularizer.lambda_pred_lpips == 0.0 and cfg.loss.lambda_lpips == 0.2


def test_unknown_section(tmp_path):
    with pytest.raises(RecipeError, match="trian") as info:
        load(_write(tmp_path, "[trian]\nsteps = 1\n"))
    assert "did you mean 'train'?" in str(info.value)


def test_cli_error_keeps_the_section_name(tmp_path):
    from typer.testing import CliRunner

    from ssr_cli.cli import app

    result = CliRunner().invoke(app, ["finetune", str(_write(tmp_path, "[regularizer]\nalpah = 0.5\n")), "--dry-run"])
    assert result.exit_code == 2
    assert "not a field of [regularizer]" in " ".join(result.output.split())


def test_wrong_type_names_key(tmp_path):
    with pytest.raises(RecipeError, match=r"train\.steps"):
        load(_write(tmp_path, '[train]\nsteps = "many"\n'))


def test_cross_field_conflicts_name_keys(tmp_path):
    with pytest.raises(RecipeError, match=r"regularizer\.delta_tau"):
        load(_write(tmp_path, "[regularizer]\ntau_max = 3.0\ndelta_tau = 4.0\n"))
    with pytest.raises(RecipeError, match=r"data\.path"):
        load(_write(tmp_path, '[data]\nsource = "tar"\n'))
    with pytest.raises(RecipeError, match=r"regularizer\.grid"):
        load(_write(tmp_path, '[regularizer]\ngrid = "4by4"\n'))


def test_overrides_parse_toml_values(tmp_path):
    p = _write(tmp_path, "[train]\nsteps = 10\n")
    r = load(p, ["train.steps=25", "regularizer.basis=legendre", "regularizer.mean_centering=false",
                 "sample.cfg_interval=[0.1, 0.9]"])
    assert r.train.steps == 25 and r.regularizer.basis == "legendre" and r.regularizer.mean_centering is False
    assert r.sample.cfg_interval == (0.1, 0.9)
    assert parse_override("run.name=abc") == (["run", "name"], "abc")
    with pytest.raises(RecipeError, match="section.key=value"):
        load(p, ["train.steps"])
    with pytest.raises(RecipeError, match=r"train\.nope"):
        load(p, ["train.nope=1"])


def test_dump_round_trip(tmp_path):
    r = load(None, ["train.steps=7", "tokenizer.overrides={z_channels = 8}", "regularizer.grid=\"4x2\""])
    again = load(_write(tmp_path, dump(r)))
    assert again == r


def test_missing_file_is_clear():
    with pytest.raises(RecipeError, match="not found"):
        load("no/such/recipe.toml")


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_every_shipped_recipe_validates(path):
    assert isinstance(load(path), Recipe)


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_resolved_recipe_round_trips_through_tomllib(path, tmp_path):
    """The resolved file of every shipped recipe parses with the standard library's TOML reader and validates
    to the same Recipe; with its defaults spelled out it is a fixed point of dump."""
    r = load(path)
    written = write_resolved(r, tmp_path / "run")
    assert written == tmp_path / "run" / "recipe.resolved.toml"
    parsed = tomllib.loads(written.read_text())
    assert from_dict(parsed) == r
    assert set(parsed) == set(Recipe.model_fields)
    assert dump(from_dict(parsed)) == written.read_text()


def test_grad_clip_zero_turns_clipping_off(tmp_path):
    from torch import nn

    from ssr_cli.engine.optim import ParamGroup
    from ssr_cli.engine.runtime import setup_runtime
    from ssr_cli.stages.common import train_spec

    model = nn.Linear(2, 2)
    rt = setup_runtime("cpu", "fp32")
    specs = []
    for clip in ("0", "2.5"):
        cfg = load(_write(tmp_path, f"[train]\ngrad_clip = {clip}\n"))
        specs.append(train_spec(cfg, rt, name="t", model=model, param_groups=[ParamGroup("all", list(model.parameters()))],
                                dataset=None, run_dir=tmp_path))
    assert specs[0].grad_clip is None and specs[1].grad_clip == 2.5
    with pytest.raises(RecipeError, match="train.grad_clip"):
        load(_write(tmp_path, "[train]\ngrad_clip = -1\n"))


def test_train_and_dit_share_one_optimisation_section(tmp_path):
    """[train] and [dit] are one type (OptimConfig) with their own defaults, and the engine gets both through one
    function: a key set in either reaches the TrainSpec field of the same name."""
    from ssr_cli.recipe import DiTConfig, OptimConfig, TrainConfig
    from ssr_cli.stages.common import optimisation

    assert issubclass(TrainConfig, OptimConfig) and issubclass(DiTConfig, OptimConfig)
    shared = set(OptimConfig.model_fields)
    assert shared <= set(TrainConfig.model_fields) and shared <= set(DiTConfig.model_fields)
    text = "\n".join(f"[{s}]\nsteps = 7\nlr = 0.003\nbetas = [0.8, 0.9]\nweight_decay = 0.01\ngrad_clip = 0\n"
                     f"ckpt_every_steps = 3\nkeep_last = 2\nlog_every_steps = 4\nmax_nonfinite_steps = 5\n"
                     for s in ("train", "dit"))
    cfg = load(_write(tmp_path, text))
    expected = {"steps": 7, "lr": 0.003, "betas": (0.8, 0.9), "weight_decay": 0.01, "grad_clip": None,
                "ckpt_every": 3, "keep_last": 2, "log_every": 4, "max_nonfinite_steps": 5}
    assert optimisation(cfg.train) == expected and optimisation(cfg.dit) == expected
    # the defaults stay each section's own (LightningDiT's for the DiT)
    defaults = load(_write(tmp_path, ""))
    assert (defaults.dit.lr, defaults.dit.betas, defaults.dit.grad_clip) == (2e-4, (0.9, 0.95), 1.0)
    assert (defaults.train.lr, defaults.train.betas, defaults.train.grad_clip) == (1e-5, (0.9, 0.999), 50.0)


def test_grad_checkpointing_on_a_tokenizer_without_it_is_a_user_error(tmp_path):
    from ssr_cli.errors import UserError
    from ssr_cli.stages.common import build_tokenizer

    cfg = load(_write(tmp_path, '[tokenizer]\nfamily = "taesd"\nsize = "taesd"\ngrad_checkpointing = true\n'))
    with pytest.raises(UserError, match="grad_checkpointing"):
        build_tokenizer(cfg, weights=None)


def _models_in(annotation) -> list[type[BaseModel]]:
    """The pydantic models an annotation names, through unions, containers and Annotated."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]


def test_every_recipe_field_has_a_description():
    """Issue 12: a docstring on every field (turned into its description by use_attribute_docstrings), in every
    section reachable from Recipe, nested models included; a new field without one fails here."""
    seen: set[type[BaseModel]] = set()
    todo: list[type[BaseModel]] = [Recipe]
    missing = []
    while todo:
        model = todo.pop()
        if model in seen:
            continue
        seen.add(model)
        for name, field in model.model_fields.items():
            if not (field.description or "").strip():
                missing.append(f"{model.__name__}.{name}")
            todo.extend(_models_in(field.annotation))
    assert {field.annotation for field in Recipe.model_fields.values()} <= seen  # the walk reached every section
    assert not missing, f"fields without a docstring (add one under the field): {', '.join(missing)}"
