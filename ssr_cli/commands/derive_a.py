"""`ssr derive-a`: the A matrix of a 2D basis (and its discretization Ā), summary, files, heatmap, checks.

All mathematics lives in ``ssr_cli.bases`` (its checks in ``ssr_cli.bases_verify``); this module parses options,
prints and writes files.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

# numpy, scipy (through bases) and rich tables load when the command runs, not for `ssr --help`.
from ssr_cli.commands.common import OptionalRecipeArg, SetOpt, console, fail
from ssr_cli.errors import UserError, UserValueError

if TYPE_CHECKING:
    import numpy as np

OUT_SUFFIXES = (".npy", ".pt", ".safetensors")


def _basis_cb(value: Optional[str]) -> Optional[str]:
    from ssr_cli import bases

    if value is None:
        return None
    try:
        return bases.check_basis(value)
    except UserError as exc:
        raise typer.BadParameter(str(exc)) from None


MAX_CHANNELS = 4096
"""Largest W·H derive-a accepts: A, Ā and the discretization's intermediates are dense (W·H)² float64 matrices
(about six at once), 128 MiB each at 4096 channels (64×64), so under 1 GiB; 200×200 would need about 72 GiB."""


def check_grid_size(w: int, h: int) -> None:
    n = w * h
    if n > MAX_CHANNELS:
        gib = 6 * 8 * n * n / 2**30
        raise UserValueError(f"a {w}x{h} grid has {n} channels: its dense {n}x{n} float64 matrices would need about "
                             f"{gib:.0f} GiB; derive-a accepts at most {MAX_CHANNELS} channels (e.g. 64x64)")


def _size_cb(value: Optional[str]) -> Optional[str]:
    from ssr_cli import bases

    if value is None:
        return None
    try:
        w, h = bases.parse_grid(value)
        check_grid_size(w, h)
    except UserError as exc:
        raise typer.BadParameter(str(exc)) from None
    return f"{w}x{h}"


def _disc_cb(value: Optional[str]) -> Optional[str]:
    from ssr_cli import bases

    if value is None:
        return None
    name = value.strip().lower()
    if name not in bases.DISCRETIZATIONS:
        raise typer.BadParameter(f"unknown discretization {value!r}: choose one of {', '.join(bases.DISCRETIZATIONS)}")
    return name


def _delta_cb(value: Optional[float]) -> Optional[float]:
    if value is not None and not (math.isfinite(value) and value > 0):
        raise typer.BadParameter(f"delta must be a positive number, got {value}")
    return value


def _out_cb(value: Optional[Path]) -> Optional[Path]:
    if value is not None and value.suffix.lower() not in OUT_SUFFIXES:
        raise typer.BadParameter(
            f"cannot tell the format of {str(value)!r}: use a file name ending in {', '.join(OUT_SUFFIXES)}"
        )
    return value


def derive_a(
    recipe: OptionalRecipeArg = None,
    basis: Annotated[Optional[str], typer.Option(
        "--basis", callback=_basis_cb, show_default=False,
        help="fourier, chebyshev, legendre or hermite (default: fourier, or the recipe's regularizer.basis)")] = None,
    size: Annotated[Optional[str], typer.Option(
        "--size", callback=_size_cb, show_default=False,
        help="Grid W×H of basis functions: '8' (8×8) or '8x4' (W=8, H=4); W·H = latent channels "
             "(default: 4x4, or the recipe's regularizer.grid)")] = None,
    raw: Annotated[bool, typer.Option("--raw", help="Keep the un-normalized matrix (default: scaled to max|A| = 1).")] = False,
    orthonormal: Annotated[bool, typer.Option(
        "--orthonormal", help="A for the orthonormal basis: the exact dynamics of orthonormal coefficients.")] = False,
    discretization: Annotated[Optional[str], typer.Option(
        "--discretization", callback=_disc_cb, show_default=False,
        help="euler (Ā = I + ΔA) or zoh (Ā = exp(ΔA)) (default: zoh, or regularizer.discretization, whose 'auto' is zoh)")] = None,
    delta: Annotated[Optional[float], typer.Option(
        "--delta", callback=_delta_cb, show_default=False,
        help="Discretization step Δ (default: 0.1, or regularizer.delta_init)")] = None,
    out: Annotated[Optional[Path], typer.Option(
        "--out", callback=_out_cb, show_default=False, dir_okay=False,
        help="Save A by extension: .npy (A only, float64), .pt or .safetensors (A, A_bar and metadata).")] = None,
    plot: Annotated[bool, typer.Option("--plot", help="Write a heatmap PNG of A (like the paper's Fig. 7).")] = False,
    plot_path: Annotated[Optional[Path], typer.Option(
        "--plot-path", show_default=False, dir_okay=False,
        help="Where the heatmap goes (implies --plot) (default: ./A_<basis>_<W>x<H>.png, with _orthonormal / _raw appended for those variants)")] = None,
    blur_gap: Annotated[Optional[float], typer.Option(
        "--blur-gap", callback=_delta_cb, show_default=False,
        help="Blur variance Δ_I (pixels²): set Δ so that Ā is the exact coefficient dynamics of this blur gap "
             "(needs --image-size).")] = None,
    image_size: Annotated[Optional[int], typer.Option(
        "--image-size", min=1, show_default=False, help="Training resolution (pixels per side) for --blur-gap.")] = None,
    verify: Annotated[bool, typer.Option(
        "--verify", help="Check the closed forms against quadrature and the dynamics on a real photograph.")] = False,
    set_: SetOpt = None,
) -> None:
    """Derive the state matrix A of a 2D basis (paper appendix A.4) and its discretization Ā.

    Example: ssr derive-a --basis legendre --size 8 --plot
    """
    import numpy as np

    from ssr_cli import bases

    reg = None
    if recipe is not None:
        from ssr_cli.commands.common import load_recipe

        reg = load_recipe(recipe, set_).regularizer
    elif set_:
        fail("--set needs a RECIPE argument (e.g. ssr derive-a recipes/flux.toml --set regularizer.basis=\"legendre\")")

    if basis is None and reg is not None and reg.basis == "random":
        fail("the recipe's regularizer.basis = 'random' is a seeded random A, not a basis to derive: pass --basis")
    basis = basis or (reg.basis if reg else "fourier")
    size = size or (reg.grid if reg and reg.grid else None)
    if size is None:
        if reg is not None:
            console.print("[yellow]note:[/] the recipe has no regularizer.grid; using 4x4 (16 latent channels). "
                          "Pass --size to choose.")
        size = "4x4"
    W, H = bases.parse_grid(size)
    try:
        check_grid_size(W, H)
    except UserError as exc:
        fail(str(exc))
    orthonormal = orthonormal or bool(reg and reg.orthonormal)
    discretization = discretization or (reg.discretization if reg else "zoh")
    if discretization == "auto":  # the recipe's "auto": what fine-tuning resolves it to for this basis
        from ssr_cli.dynamics import resolve_discretization

        discretization = resolve_discretization(discretization, basis)
    if blur_gap is not None:
        if image_size is None or delta is not None:
            fail("--blur-gap needs --image-size and replaces --delta (e.g. --blur-gap 4 --image-size 256)")
        delta = (blur_gap * (W / image_size) ** 2 if raw
                 else bases.delta_from_blur(basis, W, H, blur_gap, image_size))
        console.print(f"physical Δ for a blur gap of {blur_gap:g} px² at {image_size}²: [bold]{delta:.6g}[/]")
    delta = delta if delta is not None else (reg.delta_init if reg else 0.1)

    A_raw = bases.a_matrix(basis, W, H, normalize=False, orthonormal=orthonormal)
    A = A_raw if raw else bases.a_matrix(basis, W, H, normalize=True, orthonormal=orthonormal)
    A_bar = bases.discretize(A, delta, discretization)
    info = bases.describe(A, A_bar)
    scale = float(np.max(np.abs(A_raw)))
    normalization = "raw" if raw else "max_abs_1"

    _print_summary(basis, W, H, orthonormal, normalization, scale, discretization, delta, info)
    if blur_gap is not None:
        d = np.diag(A_bar)
        console.print(f"Ā diagonal (per-channel decay factor over the blur gap): {np.array2string(d, precision=5)}")

    if out is not None:
        meta = {
            "basis": basis, "size": f"{W}x{H}", "W": str(W), "H": str(H),
            "variant": "orthonormal" if orthonormal else "paper",
            "normalization": normalization, "raw_max_abs": repr(scale),
            "discretization": discretization, "delta": repr(float(delta)),
            "layout": "A[k, n]: row k, column n; channel n = w + W*h",
        }
        try:
            path = _save(out, A, A_bar, meta)
        except OSError as exc:
            fail(f"--out {out}: cannot write the file ({exc.strerror or exc})", code=1)
        console.print(f"saved {'A' if path.suffix.lower() == '.npy' else 'A and A_bar'} → [bold]{path}[/]")

    if plot or plot_path is not None:
        from ssr_cli.plots import plot_a_matrix

        suffix = ("_orthonormal" if orthonormal else "") + ("_raw" if raw else "")
        target = plot_path or Path(f"A_{basis}_{W}x{H}{suffix}.png")
        kind = "raw" if raw else "normalized, max|A| = 1"
        title = f"{basis.capitalize()} A{' (orthonormal)' if orthonormal else ''}, {W}x{H} grid, {kind}"
        try:
            written = plot_a_matrix(A, basis, W, H, target, title=title)
        except OSError as exc:
            fail(f"--plot-path {target}: cannot write the file ({exc.strerror or exc})", code=1)
        console.print(f"heatmap → [bold]{written}[/]")

    if verify:
        _run_verify(W, H)


def _print_summary(basis, W, H, orthonormal, normalization, scale, discretization, delta, info) -> None:
    from rich.panel import Panel
    from rich.table import Table

    from ssr_cli import bases

    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold cyan")
    table.add_column()
    table.add_row("basis", f"{basis} ({'orthonormal' if orthonormal else 'paper-literal'} A)")
    table.add_row("grid", f"W={W} × H={H} → {W * H} channels, n = w + W·h")
    table.add_row("normalization", "raw (un-normalized)" if normalization == "raw"
                  else f"max|A| = 1 (raw max|A| = {scale:.6g})")
    table.add_row("shape", f"{info['shape'][0]} × {info['shape'][1]}")
    table.add_row("nonzeros", f"{info['nonzeros']} of {info['entries']} ({100 * info['nonzeros'] / info['entries']:.1f}%)")
    table.add_row("structure", info["structure"])
    table.add_row("value range", f"[{info['min']:.6g}, {info['max']:.6g}]; smallest nonzero |A| {info['min_abs_nonzero']:.3g}")
    formula = "I + ΔA" if discretization == "euler" else "exp(ΔA)"
    table.add_row("Ā", f"{discretization}: {formula}, Δ = {delta:g}")
    table.add_row("ρ(Ā)", f"{info['A_bar_spectral_radius']:.6g}  (spectral radius)")
    table.add_row("‖Ā‖₂", f"{info['A_bar_norm2']:.6g}")
    groups = bases.frequency_groups(W, H)
    table.add_row("frequency order", " | ".join(" ".join(str(n) for n in g) for g in groups))
    table.add_row("", "(channels grouped by w+h, low → high; appendix A.6)")
    console.print(Panel(table, title="ssr derive-a", expand=False))


def _save(path: Path, A: np.ndarray, A_bar: np.ndarray, meta: dict[str, str]) -> Path:
    """Write atomically by extension; .npy holds A only."""
    import numpy as np

    from ssr_cli.engine.atomic import atomic_path

    suffix = path.suffix.lower()
    with atomic_path(path) as tmp:
        if suffix == ".npy":
            np.save(tmp, A.astype(np.float64))
        elif suffix == ".safetensors":
            from safetensors.numpy import save_file

            save_file({"A": np.ascontiguousarray(A), "A_bar": np.ascontiguousarray(A_bar)}, str(tmp), metadata=meta)
        else:
            import torch

            torch.save({"A": torch.from_numpy(A.copy()), "A_bar": torch.from_numpy(A_bar.copy()),
                        "meta": dict(meta)}, tmp)
    return path


def _run_verify(W: int, H: int) -> None:
    from rich.table import Table

    from ssr_cli import bases_verify

    console.print(f"\n[bold]verify (a)[/]: closed forms vs independent 2D Gauss quadrature, {W}x{H} grid")
    quad = bases_verify.verify_quadrature(W, H)
    t = Table()
    for col in ("basis", "variant", "max|A| (raw)", "max err / max|A|", "max rel err (nonzeros)", "quad on zeros / max|A|"):
        t.add_column(col, justify="right" if col.startswith(("max", "quad")) else "left")
    worst = 0.0
    for basis, variants in quad.items():
        for variant, r in variants.items():
            worst = max(worst, r["max_err_rel_to_max"], r["max_rel_err_nonzero"])
            t.add_row(basis, variant, f"{r['max_abs_A']:.6g}", f"{r['max_err_rel_to_max']:.2e}",
                      f"{r['max_rel_err_nonzero']:.2e}", f"{r['max_abs_on_zeros_rel']:.2e}")
    console.print(t)
    status = "[green]PASS[/]" if worst <= 1e-9 else "[red]FAIL[/]"
    console.print(f"largest relative error: {worst:.2e} (tolerance 1e-9) {status}")

    dyn = bases_verify.verify_dynamics(W, H)
    taus = dyn["taus_px2"]
    console.print(
        f"\n[bold]verify (b)[/]: dynamics. Δ = τ / {dyn['pixels_per_unit']}² physical units² "
        f"(one grid unit = {dyn['pixels_per_unit']} px)"
    )
    t = Table(title="in the span: exp(ΔA) vs the exact heat propagator, relative 2-norm error")
    t.add_column("basis")
    t.add_column("A variant")
    for tau in taus:
        t.add_column(f"τ={tau:g} px²", justify="right")
    for basis, r in dyn["in_span"].items():
        t.add_row(basis, "orthonormal", *[f"{x:.1e}" for x in r["orthonormal"]])
        t.add_row("", "paper-literal", *[f"{x:.1e}" for x in r["paper"]])
    console.print(t)

    h_px, w_px = dyn["image_px"]
    t = Table(title=f"photograph (skimage 'camera', grey, {w_px}×{h_px} px, mean-centred):\n"
                    "‖pred − true‖ / ‖true‖ of the blurred image's coefficients")
    t.add_column("basis / blur borders")
    t.add_column("prediction")
    for tau in taus:
        t.add_column(f"τ={tau:g} px²", justify="right")
    labels = {
        "orthonormal": "orthonormal A, Δ exact",
        "paper": "paper A raw, Δ exact",
        "paper_best_delta": "paper A max 1, best Δ",
        "best_delta": "  (that best Δ)",
        "no_change": "no change (baseline)",
    }
    borders = {"fourier_periodic": "fourier / periodic", "hermite_on_R": "hermite / zero-ext. ℝ"}
    for label, rows in dyn["photo"].items():
        name = borders.get(label, f"{label} / reflect")
        for key, text in labels.items():
            fmt = "{:.2g}" if key == "best_delta" else "{:.3g}"
            t.add_row(name if key == "orthonormal" else "", text, *[fmt.format(x) for x in rows[key]])
        t.add_section()
    console.print(t)
    console.print(
        "Reading: in the span the orthonormal A is exact (≈1e−15) and the paper-literal A is not (its basis is "
        "orthogonal, not orthonormal). On a photograph the truncated W×H system is exact only for Fourier with "
        "periodic borders; with reflect borders, and for the polynomial bases (whose A moves energy from "
        "degrees outside the grid into it), an error remains: compare each row with the no-change baseline."
    )
