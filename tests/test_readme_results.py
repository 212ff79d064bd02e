"""README's results table is the study's (issue 25, item 6: "regenerate README's table from it").

The table is copied from docs/results/study/report.md when the study is rerun; this test fails
when one is updated without the other.
"""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STUDY = ROOT / "docs" / "results" / "study"


def _table(text: str, first_cells: tuple[str, ...]) -> list[dict[str, str]]:
    """The first markdown table whose header starts with ``first_cells``, as dicts."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and tuple(cells[: len(first_cells)]) == first_cells:
            rows = []
            for body in lines[i + 2 :]:
                if not body.startswith("|"):
                    break
                values = [c.strip() for c in body.strip().strip("|").split("|")]
                rows.append(dict(zip(cells, values, strict=True)))
            return rows
    raise AssertionError(f"no table starting {first_cells}")


def test_readme_table_equals_the_study_report() -> None:
    readme = _table((ROOT / "README.md").read_text(), ("row", "seeds", "lr"))
    report = _table((STUDY / "report.md").read_text(), ("row", "seeds", "rank"))
    assert [r["row"] for r in readme] == [r["row"] for r in report]
    for ours, theirs in zip(readme, report, strict=True):
        for column in ("seeds", "trainable params", "train loss (last 10% of steps)", "ppl@1024"):
            assert ours[column] == theirs[column], (ours["row"], column)


def test_readme_rates_are_the_ones_the_study_chose() -> None:
    table = _table((ROOT / "README.md").read_text(), ("row", "seeds", "lr"))
    readme = {r["row"]: r["lr"] for r in table}
    runs = json.loads((STUDY / "results.json").read_text())["runs"]
    chosen: dict[str, float] = {}
    for run in runs:
        lr = run.get("lr")
        if lr is not None and run.get("trainable_params"):
            chosen.setdefault(run["row"], lr)
            assert chosen[run["row"]] == lr, run["row"]
    assert chosen, "no run records a learning rate"
    for row, lr in chosen.items():
        assert float(readme[row]) == lr, row
