"""The one line an error of ours quotes from a library's exception."""

from __future__ import annotations

import pytest

from transdnn.errors import first_line


@pytest.mark.parametrize(
    ("exc", "line"),
    [
        (OSError(), "OSError"),  # an empty message: its type, where `splitlines()[0]` raised IndexError
        (EOFError("\n\nRan out of input\ndetails"), "Ran out of input"),
        (ValueError("x" * 300), "x" * 160),
    ],
)
def test_first_line(exc: BaseException, line: str):
    assert first_line(exc) == line


def test_first_line_takes_a_longer_limit():
    assert first_line(RuntimeError("y" * 300), 200) == "y" * 200
