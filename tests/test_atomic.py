"""The write paths every output goes through: temp-and-rename, and the alternating resume-state file."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from transdnn.atomic import AlternatingFile, write_text


def test_write_text_replaces_whole_file_and_leaves_no_temporaries(tmp_path: Path):
    target = tmp_path / "out" / "a.json"
    write_text(target, "first\n")
    write_text(target, "x\n")
    assert target.read_text() == "x\n"
    assert [p.name for p in target.parent.iterdir()] == ["a.json"]


def test_alternating_file_reads_back_each_write_even_when_it_shrinks(tmp_path: Path):
    state = AlternatingFile(tmp_path / "state.pt")
    assert not state.exists() and state.current() is None
    written = []
    for n in (1000, 10, 500):  # in-place rewrites must drop the longer tail of an earlier write
        written.append(state.write(lambda fh, n=n: torch.save({"w": torch.arange(n)}, fh)))
        assert torch.equal(torch.load(state.current(), weights_only=True)["w"], torch.arange(n))
    assert written[0] == written[2] != written[1], "the two buffers alternate"
    state.remove()
    assert not list(tmp_path.iterdir())


def test_alternating_file_killed_mid_write_keeps_the_previous_state(tmp_path: Path):
    state = AlternatingFile(tmp_path / "state.pt")
    state.write(lambda fh: torch.save({"epoch": torch.tensor(3)}, fh))
    state.write(lambda fh: torch.save({"epoch": torch.tensor(4)}, fh))

    def dies_half_way(fh):
        fh.write(b"PK\x03\x04 half a zip")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        state.write(dies_half_way)
    assert int(torch.load(state.current(), weights_only=True)["epoch"]) == 4
    assert not list(tmp_path.glob("*.tmp"))
