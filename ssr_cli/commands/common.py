"""Options and helpers every recipe-driven command shares."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer


class _LazyConsole:
    """A rich ``Console`` made on first use: importing rich's console costs ~0.05 s of CPU, which ``ssr --help``
    should not pay (issue 14). Behaves as the Console it wraps (every attribute is forwarded)."""

    def __init__(self, **kwargs) -> None:
        self._kwargs, self._console = kwargs, None

    def __getattr__(self, name: str):
        if self._console is None:
            from rich.console import Console

            self._console = Console(**self._kwargs)
        return getattr(self._console, name)


console = _LazyConsole()
err_console = _LazyConsole(stderr=True)

RecipeArg = Annotated[
    Path,
    typer.Argument(help="TOML recipe (see recipes/).", show_default=False),
]
OptionalRecipeArg = Annotated[
    Optional[Path],
    typer.Argument(help="TOML recipe (see recipes/); optional.", show_default=False),
]
SetOpt = Annotated[
    Optional[list[str]],
    typer.Option(
        "--set",
        help="Override a recipe value, e.g. --set train.steps=100 (repeatable; values are TOML).",
        show_default=False,
    ),
]
DryRunOpt = Annotated[bool, typer.Option("--dry-run", help="Print the resolved recipe, build the models the run would build "
                                         "(without data or weights) and exit; fails (exit 2) where the run would.")]
DeviceOpt = Annotated[
    Optional[str],
    typer.Option("--device", help="cpu, cuda or auto (overrides run.device).", show_default=False),
]

WeightsOpt = Annotated[
    Optional[str],
    typer.Option("--weights", help="Use this tokenizer weights file instead of the run's fine-tuned one "
                 "(e.g. the pretrained weights, to compare).", show_default=False),
]


def fail(message: str, code: int = 2) -> None:
    """Print a one-line (or short) error and exit with ``code``. The line is never wrapped by rich (the
    terminal folds it for the eye; a log or ``grep error:`` keeps the whole message on its line)."""
    from rich.markup import escape

    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


RunRecipeArg = Annotated[
    Optional[Path],
    typer.Argument(help="TOML recipe (see recipes/); default: the run in the current directory (the folder itself "
                   "when it holds recipe.resolved.toml, else the newest runs/*/recipe.resolved.toml).",
                   show_default=False),
]


def current_run_recipe(recipe: Path | None, cwd: Path | None = None) -> Path:
    """The recipe to act on: ``recipe`` when given, else the run in ``cwd`` (the folder itself when it is a run
    folder, else the newest ``runs/*/recipe.resolved.toml`` by modification time); says which run it picked.
    None found exits 2 with what to pass instead."""
    if recipe is not None:
        return recipe
    here = Path.cwd() if cwd is None else cwd
    own = here / "recipe.resolved.toml"
    if own.is_file():
        found = own
    else:
        candidates = sorted((here / "runs").glob("*/recipe.resolved.toml"), key=lambda p: (p.stat().st_mtime, str(p)))
        if not candidates:
            fail(f"no run in {here} (no recipe.resolved.toml here or in runs/*/): pass a recipe, e.g. "
                 "recipes/quickstart.toml, or run from a folder holding runs/<name>/")
        found = candidates[-1]
    console.print(f"using run {found.parent} ({found.name})")
    return found


def load_recipe(recipe: Path | None, sets: list[str] | None, device: str | None = None):
    """Load and validate the recipe, applying --set and --device; bad input exits with code 2."""
    from ssr_cli.recipe import RecipeError, load

    overrides = list(sets or [])
    if device is not None:
        overrides.append(f'run.device="{device}"')
    try:
        return load(recipe, overrides)
    except RecipeError as exc:
        fail(str(exc))


def run_dry(cfg, stages: tuple[str, ...]) -> None:
    """``--dry-run``: print the resolved recipe, then build the models the run would build (see
    :func:`ssr_cli.stages.pipeline.check_builds`); a user error there (:class:`ssr_cli.errors.UserError`) exits 2 as the
    run would; any other exception is a bug and keeps its traceback."""
    from ssr_cli.errors import UserError
    from ssr_cli.stages.pipeline import check_builds

    print_recipe(cfg)
    try:
        built = check_builds(cfg, stages)
    except UserError as exc:
        fail(str(exc))
    console.print("dry run: built " + "; ".join(built))


def run_command(recipe: Path | None, sets: list[str] | None, device: str | None, dry_run: bool, stage,
                *, dry_stages: tuple[str, ...] | None = None, after=None, **options):
    """What every stage command does, in order: load the recipe, apply ``--set`` and ``--device`` (bad input:
    exit 2), then either ``--dry-run`` (print the resolved recipe, build what the stage would build, exit) or
    run ``ssr_cli.stages.<stage>.run(cfg, rt, **options)`` in a set-up run (:class:`start_run`: device,
    precision, DDP, run lock, resolved recipe; user errors become exit 2), then ``after(cfg, rt, result)`` (e.g.
    ``--compare``). ``stage`` is a module name of :mod:`ssr_cli.stages`, or a function of the recipe giving one.
    The stage module is imported only here, so ``ssr --help`` stays fast."""
    import importlib

    cfg = load_recipe(recipe, sets, device)
    module = importlib.import_module(f"ssr_cli.stages.{stage(cfg) if callable(stage) else stage}")
    if dry_run:
        run_dry(cfg, dry_stages or (module.NAME,))
        return None
    with start_run(cfg) as rt:
        result = module.run(cfg, rt, **options)
        if after is not None:
            after(cfg, rt, result)
    return result


def print_recipe(recipe) -> None:
    from rich.syntax import Syntax

    from ssr_cli.recipe import dump

    console.print(Syntax(dump(recipe), "toml", theme="ansi_dark", background_color="default"))


class start_run:
    """Context manager: set up device/precision/DDP, write the resolved recipe (rank 0), turn user errors
    (:class:`ssr_cli.errors.UserError`: missing files, bad values, unsupported options) into one clear line and
    exit code 2; any other exception is a bug and keeps its traceback."""

    def __init__(self, cfg) -> None:
        self.cfg = cfg
        self.rt = None
        self.lock = None

    def __enter__(self):
        from ssr_cli.engine.lock import RunLock, RunLocked
        from ssr_cli.engine.runtime import setup_runtime
        from ssr_cli.errors import UserError
        from ssr_cli.recipe import write_resolved

        try:
            self.rt = setup_runtime(self.cfg.run.device, self.cfg.run.precision, self.cfg.run.threads)
        except UserError as exc:  # e.g. run.device = "cuda" without a CUDA device
            fail(str(exc))
        if self.rt.is_main and self.rt.device.type == "cpu":
            import torch

            how = {0: "one per core of the CPU set", "auto": "auto: the cores free at start"}.get(
                self.cfg.run.threads, "run.threads")
            console.print(f"[dim]cpu: {torch.get_num_threads()} thread(s) ({how})[/]")
        if self.rt.is_main:  # one writer per run folder; the other ranks of this job share rank 0's lock
            try:
                self.lock = RunLock(self.cfg.run_dir()).acquire()
            except RunLocked as exc:
                self.rt.shutdown()
                fail(str(exc))
            if self.lock.note:
                err_console.print(f"[yellow]{self.lock.path}: {self.lock.note}")
            write_resolved(self.cfg, self.cfg.run_dir())
        return self.rt

    def __exit__(self, exc_type, exc, tb):
        if self.lock is not None:
            self.lock.release()
        if self.rt is not None:
            self.rt.shutdown()
        from ssr_cli.errors import UserError

        # User errors (UserError and what derives from it: RecipeError, WeightsError, UserValueError, …) become one
        # line and exit 2; anything else, a plain ValueError included, is a bug and keeps its traceback.
        if isinstance(exc, UserError):
            fail(str(exc))
        return False


CompareOpt = Annotated[
    Optional[list[Path]],
    typer.Option("--compare", help="Also run this on other recipes' runs (repeatable; --device applies, --set "
                 "does not) and show all side by side.", show_default=False),
]


def compared_results(cfg, first: dict, others: list[Path] | None, device: str | None, run) -> dict[str, dict]:
    """``{label: result}`` for the main run (``first``) and each recipe of ``--compare``, ``run(cfg)`` giving
    the result of one; labels are run names, or the recipe file's stem where names collide."""
    results = {cfg.run.name: first}
    for path in others or []:
        other = load_recipe(path, None, device)
        results[_run_label(results, other, path)] = run(other)
    return results


def _run_label(taken, cfg, path: Path) -> str:
    for label in (cfg.run.name, Path(path).stem, str(path)):
        if label not in taken:
            return label
    return f"{path} ({len(taken)})"
