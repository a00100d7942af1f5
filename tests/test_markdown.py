"""The one markdown table renderer."""

from __future__ import annotations

import pytest

from difftx_edge.markdown import markdown_table


def test_a_table_has_a_header_a_rule_and_one_line_per_row():
    assert markdown_table(["a", "b"], [[1, "x"], [2.5, None]]).splitlines() == [
        "| a | b |", "| --- | --- |", "| 1 | x |", "| 2.5 | None |"]


def test_columns_can_be_aligned():
    assert markdown_table(["name", "ms"], [], align="lr").splitlines()[1] == "| :-- | --: |"


@pytest.mark.parametrize("align", ["l", "lx", "lrr"])
def test_an_alignment_per_column_is_required(align):
    with pytest.raises(ValueError, match="one of l, r, c per column"):
        markdown_table(["name", "ms"], [], align=align)
