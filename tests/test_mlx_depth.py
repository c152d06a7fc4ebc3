"""benchmarks/mlx_depth.py's arithmetic: a layer is the slope of the activations over the depths, and what a step
holds beside its layers is the 1-layer step's activations less that slope and the head's estimated terms."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from mlx_depth import CASES, depths, markdown, summary  # noqa: E402


def test_a_layer_is_the_slope_and_the_rest_is_beside():
    case = CASES[0]
    head, layer, beside = 40e6, 17e6, 3e6  # the 24-layer shape's fp32 figures, rounded
    rows = [dict(shape="m", layers=n, case=case, activations=head + beside + layer * n, head=head,
                 estimate=head + 9e6 + 16e6 * n) for n in (1, 12, 24)]
    (row,) = summary(rows)
    assert abs(row["layer"] - 17e6) < 1 and abs(row["layer_estimate"] - 16e6) < 1
    assert abs(row["beside"] - beside) < 1 and abs(row["beside_estimate"] - 9e6) < 1
    assert "| m | fp32 | 1,024 | 1, 12, 24 | 17.00 | 16.00 | -5.9% | 3.00 | 9.00 |" in markdown(rows, "cmd")
    assert summary(rows[:1]) == []  # one depth: no slope
    assert depths(24) == [1, 12, 24] and depths(3) == [1, 3] and depths(1) == [1]
