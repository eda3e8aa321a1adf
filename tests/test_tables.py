"""The one result-table helper: label columns left, value columns right, rows as given."""

from __future__ import annotations

from rich.console import Console

from ssr_cli.engine.progress import print_result_table


def test_result_table_layout_and_rows():
    table = print_result_table("t", ["set", "metric"], ["run a", "run b"],
                               iter([("x", "PSNR", "1.5", "22.25"), ("x", "SSIM", "0.9", "0.95")]))
    assert [c.header for c in table.columns] == ["set", "metric", "run a", "run b"]
    assert [c.justify for c in table.columns] == ["left", "left", "right", "right"]
    assert table.row_count == 2 and table.title == "t"
    out = Console(width=80, record=True, file=open("/dev/null", "w"))  # noqa: SIM115 - closed with the console
    out.print(table)
    lines = out.export_text().splitlines()
    header = next(line for line in lines if "run a" in line)
    row = next(line for line in lines if "PSNR" in line)
    # right-justified: a value ends where its column's header ends; a label starts where its header starts
    assert row.index("1.5") + len("1.5") == header.index("run a") + len("run a")
    assert row.index("22.25") + len("22.25") == header.index("run b") + len("run b")
    assert row.index("PSNR") == header.index("metric")
