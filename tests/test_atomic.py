"""The write paths every output goes through: temp-and-rename, and the alternating resume-state file."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from transdnn.atomic import AlternatingFile, check_output_folder, write_text
from transdnn.errors import OutputError


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


def test_a_file_in_the_way_is_one_line_naming_the_output(tmp_path: Path):
    (tmp_path / "runs").write_text("not a folder")
    target = tmp_path / "runs" / "cortex" / "a.json"
    with pytest.raises(OutputError) as err:
        write_text(target, "x\n")
    assert (
        str(err.value) == f"{target}: cannot write (Not a directory); expected a folder this user may write to, with free space"
    )
    with pytest.raises(OutputError, match=r"cannot hold outputs \(.*/runs is not a folder\)"):
        check_output_folder(target.parent)
    check_output_folder(tmp_path / "new" / "deeper")
    assert not (tmp_path / "new").exists(), "the check creates nothing"


def test_a_write_the_disk_refuses_leaves_the_old_file_and_no_temporary(tmp_path: Path):
    """A file-size limit makes the kernel refuse the write part-way, as a full disk does."""
    target = tmp_path / "metrics.json"
    write_text(target, "old\n")
    code = (
        "import resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))\n"
        "from transdnn.atomic import write_text\n"
        "from transdnn.errors import OutputError\n"
        "try:\n"
        f"    write_text({str(target)!r}, 'x' * 100_000)\n"
        "except OutputError as exc:\n"
        "    sys.exit(str(exc))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 1
    assert (
        done.stderr.strip()
        == f"{target}: cannot write (File too large); expected a folder this user may write to, with free space"
    )
    assert target.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]
