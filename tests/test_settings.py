"""Typed settings: the list of training sets, with patterns that stand for the published 100 files."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from conftest import TinyData
from transdnn.cli import app
from transdnn.errors import InputError
from transdnn.settings import DataPaths, natural_key

runner = CliRunner()


def _data(folder: Path, *train: str) -> DataPaths:
    return DataPaths(train_dir=folder, train=list(train), human=folder, mouse=folder, genes=folder, homology=folder)


def _touch(folder: Path, *names: str) -> None:
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(b"")


def test_natural_key_orders_numbers_by_value():
    names = ["Integrated_dataset_10.h5ad", "Integrated_dataset_2.h5ad", "Integrated_dataset_1.h5ad", "a.h5ad"]
    assert sorted(names, key=natural_key) == [
        "Integrated_dataset_1.h5ad",
        "Integrated_dataset_2.h5ad",
        "Integrated_dataset_10.h5ad",
        "a.h5ad",
    ]


def test_a_pattern_stands_for_its_files_in_natural_order(tmp_path: Path):
    _touch(tmp_path, "Integrated_dataset_10.h5ad", "Integrated_dataset_2.h5ad", "Integrated_dataset_0.h5ad", "notes.txt")
    (tmp_path / "Integrated_dataset_3.h5ad").mkdir()  # a folder is not a data set
    names = [p.name for p in _data(tmp_path, "Integrated_dataset_*.h5ad").train_paths]
    assert names == ["Integrated_dataset_0.h5ad", "Integrated_dataset_2.h5ad", "Integrated_dataset_10.h5ad"]


def test_named_files_keep_their_order_and_a_pattern_adds_each_file_once(tmp_path: Path):
    _touch(tmp_path, "b.h5ad", "a.h5ad", "c.h5ad")
    paths = _data(tmp_path, "c.h5ad", "*.h5ad").train_paths
    assert [p.name for p in paths] == ["c.h5ad", "a.h5ad", "b.h5ad"]
    assert _data(tmp_path, "z.h5ad", "a.h5ad").train_paths == [tmp_path / "z.h5ad", tmp_path / "a.h5ad"]


def test_a_pattern_that_matches_nothing_names_the_folder_and_the_pattern(tmp_path: Path):
    _touch(tmp_path, "a.h5ad")
    with pytest.raises(InputError, match=r"no file matches data.train pattern 'Integrated_\*.h5ad'") as err:
        _ = _data(tmp_path, "a.h5ad", "Integrated_*.h5ad").train_paths
    assert str(err.value).startswith(str(tmp_path))


def test_a_pattern_that_reaches_a_second_file_of_one_name_is_refused(tmp_path: Path):
    _touch(tmp_path, "a.h5ad", "sets/a.h5ad")
    with pytest.raises(InputError, match=r"data set name\(s\) a twice"):
        _ = _data(tmp_path, "a.h5ad", "*/*.h5ad").train_paths


def test_validate_lists_the_sets_a_pattern_finds(params: Path, tiny: TinyData):
    for k in (10, 2):
        tiny.train.with_name(f"Integrated_dataset_{k}.h5ad").write_bytes(tiny.train.read_bytes())
    raw = yaml.safe_load(params.read_text())
    raw["cortex"]["data"]["train"] = ["Integrated_dataset_*.h5ad"]
    params.write_text(yaml.safe_dump(raw))
    result = runner.invoke(app, ["validate", "cortex", "--params", str(params)])
    assert result.exit_code == 0, result.stderr
    found = [line.split(":")[0] for line in result.stdout.splitlines() if "rows 288" in line]
    assert found == ["Integrated_dataset_0.h5ad", "Integrated_dataset_2.h5ad", "Integrated_dataset_10.h5ad"]


@pytest.mark.parametrize("command", ["validate", "train"])
def test_a_pattern_that_matches_nothing_exits_2_with_one_line(command: str, params: Path):
    raw = yaml.safe_load(params.read_text())
    raw["cortex"]["data"]["train"] = ["Integrated_*.h5ad.gz"]
    params.write_text(yaml.safe_dump(raw))
    result = runner.invoke(app, [command, "cortex", "--params", str(params), *(["--no-track"] if command == "train" else [])])
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [
        f"error: {raw['cortex']['data']['train_dir']}: no file matches data.train pattern 'Integrated_*.h5ad.gz' "
        "(expected .h5ad files there)"
    ]


@pytest.mark.parametrize(("section", "key"), [("cortex", "human"), ("subcortex", "train_dir"), ("cortex", None)])
def test_a_path_from_the_home_folder_is_refused_as_dvc_would_not_find_it(section: str, key: str | None, params: Path):
    """`dvc repro` reads the same paths as stage dependencies and takes `~` literally."""
    raw = yaml.safe_load(params.read_text())
    if key is None:
        raw[section]["out"] = "~/transdnn-runs"
        field = f"{section}.out"
    else:
        raw[section]["data"][key] = "~/TransBrain/files"
        field = f"{section}.data.{key}"
    params.write_text(yaml.safe_dump(raw))
    result = runner.invoke(app, ["validate", section, "--params", str(params)])
    assert result.exit_code == 2
    value = raw[section]["out"] if key is None else raw[section]["data"][key]
    assert result.stderr.strip() == (
        f"error: {params}: field '{field}': {value!r} starts with '~', which DVC does not expand "
        "(expected an absolute path, or one relative to params.yaml)"
    )


@pytest.mark.parametrize("where", ["a folder", "nothing"])
def test_a_params_path_that_is_no_file_is_one_line(where: str, tmp_path: Path):
    path = tmp_path / "params.yaml"
    if where == "a folder":
        path.mkdir()
    result = runner.invoke(app, ["validate", "cortex", "--params", str(path)])
    assert result.exit_code == 2
    expected = (
        "a folder, not a settings file (expected a params.yaml)"
        if where == "a folder"
        else "settings file not found (expected a params.yaml: run transdnn in the project's folder, or give --params PATH)"
    )
    assert result.stderr == f"error: {path}: {expected}\n"


def test_a_missing_default_params_file_is_named_with_its_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Run from a subfolder of the project, `params.yaml` alone would not say where it was looked for."""
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["validate", "cortex"])
    assert result.exit_code == 2 and result.stderr.startswith(f"error: {tmp_path / 'params.yaml'}: settings file not found")


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (
            lambda raw: raw["cortex"]["train"].update(batchsize=raw["cortex"]["train"].pop("batch_size")),
            "field 'cortex.train.batchsize': not a setting (expected one of replicates, max_epochs, batch_size, "
            "learning_rate, weight_decay, lr_step, lr_gamma, patience, valid_ratio, shuffle_labels, seed, device, "
            "precision, transform_scaling, state_every_s, extra_checkpoints, checkpoint_dtype; did you mean 'batch_size'?)",
        ),
        (
            lambda raw: raw["subcortex"]["data"].update(homolgy="x.csv"),
            "field 'subcortex.data.homolgy': not a setting (expected one of train_dir, train, human, mouse, genes, "
            "homology, test; did you mean 'homology'?)",
        ),
        (
            lambda raw: raw.update(trackin={}),
            "field 'trackin': not a setting (expected one of tracking, synth, promote, "
            "cortex, subcortex; did you mean 'tracking'?)",
        ),
        (
            lambda raw: raw["promote"].pop("criterion"),
            "field 'promote.criterion': missing (expected a value for it in params.yaml)",
        ),
    ],
    ids=["misspelt setting", "misspelt path", "misspelt section", "missing setting"],
)
def test_a_misspelt_or_missing_setting_is_named_with_what_was_meant(
    edit: Callable[[dict[str, Any]], object], expected: str, params: Path
):
    """A typo in params.yaml is the commonest mistake in it: the line names the unknown key and the one it
    is closest to, instead of the right key's 'Field required' and the whole section it was missing from."""
    raw = yaml.safe_load(params.read_text())
    edit(raw)
    params.write_text(yaml.safe_dump(raw, sort_keys=False))
    result = runner.invoke(app, ["validate", "cortex", "--params", str(params)])
    assert result.exit_code == 2
    assert result.stderr.strip() == f"error: {params}: {expected}"
