"""`ssr --help` and every `ssr <command> --help` import nothing heavy (issue 14: ≤ 0.3 s of CPU on start-up). The
timing itself lives in benchmarks/bench_cli_startup.py; this asserts its cause, in a fresh interpreter."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

# What a --help must not import: the numerical stack, the plotting and image stack, the recipe's validation
# (pydantic, ~0.1 s) and rich's help/console machinery (typer.rich_utils pulls in markdown-it and pygments).
HEAVY = ("torch", "numpy", "scipy", "matplotlib", "PIL", "safetensors", "pydantic", "rich", "typer.rich_utils",
         "markdown_it", "pygments")

PROBE = textwrap.dedent("""
    import contextlib, io, json, sys
    import typer
    from ssr_cli.cli import app
    group = typer.main.get_command(app)
    names = sorted(group.commands)
    helps = {}
    for args in [["--help"]] + [[name, "--help"] for name in names]:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            try:
                group.main(args=args, prog_name="ssr", standalone_mode=False)
            except SystemExit:
                pass
        helps[" ".join(args)] = out.getvalue()
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in HEAVY or m in HEAVY)
    print(json.dumps({"names": names, "helps": helps, "loaded": loaded}))
""")


def test_help_of_every_command_imports_nothing_heavy():
    done = subprocess.run([sys.executable, "-c", f"HEAVY = {HEAVY!r}\n" + PROBE], capture_output=True, text=True,
                          check=True, timeout=120)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert {"finetune", "pipeline", "evaluate", "diffusability"} <= set(result["names"])
    for args, text in result["helps"].items():
        assert text.startswith("Usage: ssr"), (args, text[:200])
    assert "Commands:" in result["helps"]["--help"] and "pipeline" in result["helps"]["--help"]
    assert "--set" in result["helps"]["finetune --help"]
    assert result["loaded"] == [], f"--help imported {result['loaded']}"
