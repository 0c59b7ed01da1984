"""Data contract: good inputs load correctly; every bad input gives exit 2, one line naming the file
and the expectation, no traceback, and leaves no output behind."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from conftest import TinyData, make_tiny, tiny_params, write_h5ad
from transdnn.cli import app
from transdnn.data import load_partition_inputs, load_training_set, read_gene_list, region_means

runner = CliRunner()


def test_training_set_drops_other_rows_and_orders_genes_like_the_list(tiny: TinyData):
    genes = read_gene_list(tiny.genes)
    ts = load_training_set(tiny.train, genes)
    assert ts.X.shape == (6 * 4 * 12, 40)
    assert ts.regions == ["hA", "hB", "hC", "hD", "hE", "hF"]
    assert ts.n_samples == 24
    assert ts.genes == genes.genes
    # the gene list is reversed: column 0 of X is the data's last gene
    import anndata as ad

    raw = ad.read_h5ad(tiny.train)
    labelled = ~raw.obs["region_index"].str.startswith("other").to_numpy()
    assert np.allclose(ts.X[:, 0], raw.X[labelled, -1])


def test_sparse_input_gives_the_same_matrix(tmp_path: Path):
    dense = make_tiny(tmp_path / "d")
    sparse = make_tiny(tmp_path / "s", sparse=True)
    genes = read_gene_list(dense.genes)
    assert np.array_equal(load_training_set(dense.train, genes).X, load_training_set(sparse.train, genes).X)


@pytest.mark.parametrize("layout", ["contiguous float64", "compressed float32", "compressed float64"])
def test_every_dense_layout_and_chunking_gives_the_same_matrix(layout: str, tmp_path: Path):
    """A contiguous X (the tiny default) is mapped and gathered on all cores; a compressed one is read
    through one reused float32 buffer. Either converts float64 on the way in, and row chunks that split
    around dropped `other` rows stitch back to the same matrix."""
    import anndata as ad
    import h5py

    from transdnn.data import _select_genes

    tiny = make_tiny(tmp_path / "d")
    genes = read_gene_list(tiny.genes)
    expected = load_training_set(tiny.train, genes).X
    raw = ad.read_h5ad(tiny.train)
    raw.X = raw.X.astype(np.float64 if layout.endswith("float64") else np.float32)
    other = tmp_path / "other.h5ad"
    raw.write_h5ad(other, compression="gzip" if layout.startswith("compressed") else None)
    with h5py.File(other, "r") as f:
        assert (f["X"].id.get_offset() is None) == layout.startswith("compressed")
    rows = np.flatnonzero(~raw.obs["region_index"].str.startswith("other").to_numpy())
    for path in (tiny.train, other):
        assert np.array_equal(load_training_set(path, genes).X, expected)
        for chunk in (7, 10_000):
            assert np.array_equal(_select_genes(ad.read_h5ad(path, backed="r"), rows, genes, path, chunk=chunk), expected)


def test_transform_sets_are_averaged_per_region(tiny: TinyData):
    inputs = load_partition_inputs(tiny.human, tiny.mouse, tiny.genes, tiny.homology)
    import anndata as ad

    raw = ad.read_h5ad(tiny.human)
    first = raw.X[:3][:, ::-1].mean(axis=0)
    assert inputs.human.regions == ["hA", "hB", "hC", "hD", "hE", "hF"]
    assert np.allclose(inputs.human.means[0], first, atol=1e-6)


def test_region_means_average_interleaved_rows_per_code():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(60, 7)).astype(np.float32)
    codes = rng.permutation(np.repeat(np.arange(4), [5, 20, 1, 34]))
    expected = pd.DataFrame(X.astype(np.float64)).groupby(codes).mean().to_numpy()
    means = region_means(X, codes, 4)
    assert means.dtype == np.float32 and np.allclose(means, expected, atol=1e-6)


def _snapshot(root: Path) -> dict[str, float]:
    """Every output file and its mtime, and every folder. The job lock (`.transdnn.lock`), which names each
    job that holds it, is no output, so the mtime of the folder it is in is not compared."""
    if not root.exists():
        return {}
    return {str(p): p.stat().st_mtime if p.is_file() else 0.0 for p in root.rglob("*") if p.name != ".transdnn.lock"}


def _rewrite(path: Path, mutate: Callable[[pd.DataFrame, np.ndarray], tuple[pd.DataFrame, np.ndarray, list[str]]]) -> None:
    import anndata as ad

    a = ad.read_h5ad(path)
    obs, X, genes = mutate(a.obs.reset_index(drop=True), np.asarray(a.X).copy())
    write_h5ad(path, X, obs["region_index"].tolist(), genes)


def _genes(d: TinyData) -> list[str]:
    return d.gene_names


CASES: dict[str, tuple[Callable[[TinyData], Path], str]] = {
    "missing file": (lambda d: (d.train.unlink(), d.train)[1], "file not found"),
    "a folder in its place": (
        lambda d: (d.train.unlink(), d.train.mkdir(), d.train)[2],
        "a folder, not a file (expected an .h5ad file)",
    ),
    "not hdf5": (lambda d: (d.train.write_text("region_index,a\n"), d.train)[1], "not an HDF5 file"),
    "truncated h5ad": (lambda d: (d.train.write_bytes(d.train.read_bytes()[:3000]), d.train)[1], "expected"),
    "no region_index": (
        lambda d: (_rewrite_no_obs(d.train), d.train)[1],
        "obs['region_index'] missing",
    ),
    "no sampleK token": (
        lambda d: (
            _rewrite(
                d.train,
                lambda o, X: (o.assign(region_index=o.region_index.str.replace("_sample", "_s", regex=False)), X, _genes(d)),
            ),
            d.train,
        )[1],
        "sampleK",
    ),
    "all other": (
        lambda d: (
            _rewrite(d.train, lambda o, X: (o.assign(region_index="other_sample1_" + o.index.astype(str)), X, _genes(d))),
            d.train,
        )[1],
        "only 'other' rows",
    ),
    "genes absent": (
        lambda d: (pd.DataFrame({"genes": [*d.gene_names, "NOPE1", "NOPE2"]}).to_csv(d.genes, index=False), d.human)[1],
        "lacks 2 of 42 genes",
    ),
    "duplicated genes in data": (
        lambda d: (_rewrite(d.train, lambda o, X: (o, X, ["gene0", *d.gene_names[1:-1], "gene0"])), d.train)[1],
        "duplicated genes",
    ),
    "duplicated genes in list": (
        lambda d: (pd.DataFrame({"genes": [*d.gene_names, "gene3"]}).to_csv(d.genes, index=False), d.genes)[1],
        "duplicated genes",
    ),
    "nan values": (lambda d: (_rewrite(d.train, lambda o, X: (o, _poke(X, np.nan), _genes(d))), d.train)[1], "NaN or inf"),
    "inf values": (lambda d: (_rewrite(d.train, lambda o, X: (o, _poke(X, np.inf), _genes(d))), d.train)[1], "NaN or inf"),
    "empty gene list": (lambda d: (d.genes.write_text("genes\n"), d.genes)[1], "is empty"),
    "region with one sample": (
        lambda d: (
            _rewrite(
                d.train,
                lambda o, X: (
                    o.assign(region_index=o.region_index.str.replace(r"^hF_sample\d+", "hF_sample0", regex=True)),
                    X,
                    _genes(d),
                ),
            ),
            d.train,
        )[1],
        "fewer than 2 samples",
    ),
    "homology region absent from transform set": (
        lambda d: (pd.DataFrame({"human_region": ["hA", "hB"], "mouse_region": ["mA", "mZZ"]}).to_csv(d.homology), d.homology)[1],
        "'mZZ'",
    ),
    "mouse data passed as human": (
        lambda d: (d.human.write_bytes(d.mouse.read_bytes()), d.homology)[1],
        "expected the human transform set",
    ),
    "transform set without labelled rows": (
        lambda d: (
            _rewrite(d.human, lambda o, X: (o.assign(region_index="other_" + o.index.astype(str)), X, _genes(d))),
            d.human,
        )[1],
        "no labelled rows",
    ),
    "homolog absent from training": (
        lambda d: (
            _rewrite(d.train, lambda o, X: (o.assign(region_index=o.region_index.str.replace("hA_", "other_")), X, _genes(d))),
            d.homology,
        )[1],
        "human_region 'hA' absent from the regions of",
    ),
    "gene list missing": (lambda d: (d.genes.unlink(), d.genes)[1], "file not found (expected a CSV file)"),
    "gene list a folder": (
        lambda d: (d.genes.unlink(), d.genes.mkdir(), d.genes)[2],
        "a folder, not a file (expected a CSV file)",
    ),
    "gene list empty file": (lambda d: (d.genes.write_text(""), d.genes)[1], "not a readable CSV"),
    "gene list without its column": (lambda d: (d.genes.write_text("symbol\ngene0\n"), d.genes)[1], "column 'genes' missing"),
    "homology without its columns": (
        lambda d: (d.homology.write_text("human,mouse\nhA,mA\n"), d.homology)[1],
        "['human_region', 'mouse_region'] missing",
    ),
    "homology without pairs": (
        lambda d: (d.homology.write_text("human_region,mouse_region\n"), d.homology)[1],
        "no homologous pairs",
    ),
    "homology with an empty cell": (
        lambda d: (d.homology.write_text("human_region,mouse_region\nhA,mA\nhB,\n"), d.homology)[1],
        "empty cells",
    ),
    "homology with a repeated pair": (
        lambda d: (d.homology.write_text("human_region,mouse_region\nhA,mA\nhB,mB\nhA,mA\n"), d.homology)[1],
        "pairs listed more than once: 'hA/mA' (expected",
    ),
}


def _poke(X: np.ndarray, value: float) -> np.ndarray:
    X[3, 5] = value
    return X


def _rewrite_no_obs(path: Path) -> None:
    import anndata as ad

    a = ad.read_h5ad(path)
    a.obs = a.obs.drop(columns="region_index")
    a.write_h5ad(path)


def _run_bad(tmp_path: Path, args: list[str]) -> tuple[int, str]:
    out = tmp_path / "runs"
    before = _snapshot(out)
    result = runner.invoke(app, args)
    assert _snapshot(out) == before, "a rejected input must leave no output behind"
    assert result.stdout == "", "a rejected input prints its one error line and nothing else"
    return result.exit_code, result.stderr


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_exits_2_with_one_line(case: str, tmp_path: Path, tiny: TinyData, params: Path):
    breaker, expected = CASES[case]
    named = breaker(tiny)
    code, err = _run_bad(tmp_path, ["train", "cortex", "--params", str(params), "--no-track"])
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert named.name in lines[0]
    assert expected in lines[0]


@pytest.mark.parametrize(
    "case", ["training set missing", "duplicated genes in data", "region with one sample", "homolog absent from training"]
)
def test_a_bad_later_training_set_fails_before_the_first_trains(case: str, tmp_path: Path, tiny: TinyData, params: Path):
    """A 100-set job checks every set's ids, genes and regions up front: the 57th fails in seconds, not hours."""
    second = tiny.train.with_name("Integrated_dataset_1.h5ad")
    second.write_bytes(tiny.train.read_bytes())
    if case == "training set missing":
        second.unlink()
        expected = "file not found"
    else:
        breaker, expected = CASES[case]
        breaker(dataclasses.replace(tiny, train=second))
    raw = yaml.safe_load(params.read_text())
    raw["cortex"]["data"]["train"] = [tiny.train.name, second.name]
    params.write_text(yaml.safe_dump(raw))
    code, err = _run_bad(tmp_path, ["train", "cortex", "--params", str(params), "--no-track"])
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert str(second) in err and expected in err


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda p: p["cortex"]["train"].update(learning_rat=1.0), "cortex.train.learning_rat"),
        (lambda p: p["cortex"]["train"].update(max_epochs="many"), "cortex.train.max_epochs"),
        (lambda p: p["cortex"]["train"].update(replicates=-3), "cortex.train.replicates"),
        (lambda p: p.update(extra_section={}), "extra_section"),
        (lambda p: p["cortex"]["model"].update(hidden_units=[32, 0, 32]), "cortex.model.hidden_units"),
        (
            lambda p: p["cortex"]["data"].update(train=["a.h5ad", "b.h5ad", "sets/a.h5ad"]),
            "cortex.data.train': Value error, data set name(s) a listed twice",
        ),
    ],
    ids=["unknown key", "wrong type", "negative value", "unknown section", "zero-width layer", "one data set name twice"],
)
def test_bad_params_exit_2(edit, expected: str, tmp_path: Path, params: Path):
    raw = yaml.safe_load(params.read_text())
    edit(raw)
    params.write_text(yaml.safe_dump(raw))
    code, err = _run_bad(tmp_path, ["train", "cortex", "--params", str(params), "--no-track"])
    assert code == 2
    assert len(err.strip().splitlines()) == 1
    assert "params.yaml" in err and expected in err


def test_cuda_without_gpu_exits_2(tmp_path: Path, params: Path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    code, err = _run_bad(tmp_path, ["train", "cortex", "--params", str(params), "--no-track", "--device", "cuda"])
    assert code == 2 and "no CUDA GPU" in err


def test_negative_cli_override_exits_2(tmp_path: Path, params: Path):
    code, err = _run_bad(tmp_path, ["train", "cortex", "--params", str(params), "--no-track", "--replicates", "0"])
    assert code == 2 and "replicates" in err


def test_checkpoint_never_written_exits_2(tmp_path: Path, params: Path):
    code, err = _run_bad(tmp_path, ["embed", "cortex", "--params", str(params), "--no-track", "--checkpoint", "best_rank"])
    assert code == 2 and "best_rank" in err and "never written" in err


def _drop_scaler(ckpt: Path) -> Path:
    import torch

    tensors = torch.load(ckpt, weights_only=True)
    del tensors["scaler_mean"]
    torch.save(tensors, ckpt)
    return ckpt


def _bare_tensor(ckpt: Path) -> Path:
    import torch

    torch.save(torch.zeros(3), ckpt)
    return ckpt


DAMAGED_CHECKPOINTS: dict[str, tuple[Callable[[Path], Path], str]] = {
    "truncated": (lambda c: (c.write_bytes(c.read_bytes()[:200]), c)[1], "refused to load checkpoint"),
    "a bare tensor": (_bare_tensor, "is not a dict of tensors"),
    "without its scaler": (_drop_scaler, "lacks 'scaler_mean'"),
    "without its model description": (lambda c: ((c.parent / "model.json").unlink(), c.parent / "model.json")[1], "missing"),
}


@pytest.mark.parametrize("case", list(DAMAGED_CHECKPOINTS))
def test_damaged_checkpoint_exits_2_with_one_line(case: str, tmp_path: Path, params: Path):
    assert runner.invoke(app, ["train", "cortex", "--params", str(params), "--no-track", "--max-epochs", "1"]).exit_code == 0
    damage, expected = DAMAGED_CHECKPOINTS[case]
    named = damage(tmp_path / "runs" / "cortex" / "train" / "Integrated_dataset_0" / "checkpoints" / "best_valid.pt")
    code, err = _run_bad(tmp_path, ["embed", "cortex", "--params", str(params), "--no-track"])
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and str(named) in lines[0] and expected in lines[0], err


def _damaged_state(params: Path, write) -> None:
    from transdnn.checkpoints import RunLayout
    from transdnn.settings import load_settings

    part = load_settings(params).cortex
    RunLayout.for_training_file(part.out, part.data.train_paths[0]).state.write(write)


def test_damaged_resume_state_exits_2_before_any_write(tmp_path: Path, params: Path):
    _damaged_state(params, lambda fh: fh.write(b"PK\x03\x04 not a whole state"))
    code, err = _run_bad(tmp_path, ["train", "cortex", "--params", str(params), "--no-track", "--resume"])
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "state.0.pt" in err and "unusable resume state" in err


def test_resume_state_of_another_training_exits_2(tmp_path: Path, params: Path):
    import torch

    _damaged_state(params, lambda fh: torch.save({"model": {"weights.0": torch.zeros(3, 7, 5)}}, fh))
    code, err = _run_bad(tmp_path, ["train", "cortex", "--params", str(params), "--no-track", "--resume"])
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "resume state is for (replicates, genes, hidden) = (3, 7, 5)" in err


@pytest.mark.parametrize("command", [["validate"], ["train", "--no-track"]], ids=["validate", "train"])
@pytest.mark.parametrize(("key", "value", "given"), [("input_units", 4542, 40), ("output_units", 105, 6)])
def test_model_sizes_in_params_are_checked_against_the_data(
    command: list[str], key: str, value: int, given: int, tmp_path: Path, params: Path
):
    """`validate` refuses what `train` would: a size typed into params.yaml that the data contradict."""
    raw = yaml.safe_load(params.read_text())
    raw["cortex"]["model"][key] = value
    params.write_text(yaml.safe_dump(raw))
    args = [command[0], "cortex", "--params", str(params), *command[1:]]
    if command[0] == "train":
        code, err = _run_bad(tmp_path, args)
    else:  # validate has printed the shapes of the inputs it checked before
        result = runner.invoke(app, args)
        code, err = result.exit_code, result.stderr
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.strip().endswith(f"data give {key}={given} but params set model.{key}={value} (expected them to agree)")


def test_a_later_data_set_of_other_regions_than_output_units_stops_the_job_before_the_first_trains(
    tmp_path: Path, tiny: TinyData, params: Path
):
    """With model.output_units set, a set that lacks a region is refused with the job's other checks, not
    once the sets before it have trained."""
    import anndata as ad

    adata = ad.read_h5ad(tiny.train)
    fewer = tiny.train.with_name("Integrated_dataset_1.h5ad")
    adata[~adata.obs["region_index"].str.startswith("hF_")].copy().write_h5ad(fewer)
    raw = yaml.safe_load(params.read_text())
    raw["cortex"]["model"]["output_units"] = 6
    raw["cortex"]["data"]["train"] = [tiny.train.name, fewer.name]
    params.write_text(yaml.safe_dump(raw))
    code, err = _run_bad(tmp_path, ["train", "cortex", "--params", str(params), "--no-track"])
    assert code == 2 and err.strip() == (
        f"error: {fewer}: data give output_units=5 but params set model.output_units=6 (expected them to agree)"
    )


def test_params_file_missing_exits_2(tmp_path: Path):
    code, err = _run_bad(tmp_path, ["train", "cortex", "--params", str(tmp_path / "nope.yaml")])
    assert code == 2 and "nope.yaml" in err


@pytest.mark.parametrize(
    ("text", "expected"),
    [("cortex: [unclosed\n", "not valid YAML"), ("- just\n- a list\n", "expected a mapping of sections")],
    ids=["broken YAML", "not a mapping"],
)
def test_unreadable_params_exit_2(text: str, expected: str, tmp_path: Path):
    params = tmp_path / "params.yaml"
    params.write_text(text)
    code, err = _run_bad(tmp_path, ["train", "cortex", "--params", str(params)])
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and str(params) in lines[0] and expected in lines[0], err


def test_valid_inputs_pass_validate(params: Path, tiny: TinyData):
    result = runner.invoke(app, ["validate", "cortex", "--params", str(params)])
    assert result.exit_code == 0, result.stderr
    assert "rows 288" in result.stdout and "regions 6" in result.stdout


def test_tiny_params_are_the_project_params(params: Path, tiny: TinyData, tmp_path: Path):
    # guards the fixture: everything but the tiny overrides comes from the project's params.yaml
    raw = yaml.safe_load(params.read_text())
    assert (
        raw["cortex"]["train"]["patience"]
        == yaml.safe_load((Path(__file__).parents[1] / "params.yaml").read_text())["cortex"]["train"]["patience"]
    )
    assert tiny_params(tmp_path / "p2.yaml", tiny, tmp_path / "r").exists()


def test_duplicated_gene_outside_the_gene_list_is_harmless(tiny: TinyData):
    # found by the property test: a duplicate among unused genes must not break selection
    var = list(tiny.gene_names)
    var[1] = var[2] = "unused"
    _rewrite(tiny.train, lambda o, X: (o, X, var))
    pd.DataFrame({"genes": [g for g in tiny.gene_names if g not in ("gene1", "gene2")]}).to_csv(tiny.genes, index=False)
    ts = load_training_set(tiny.train, read_gene_list(tiny.genes))
    assert ts.X.shape[1] == 38


def test_a_file_with_a_user_block_gives_the_same_matrix(tmp_path: Path):
    """HDF5 files may start with a user block, which shifts every address: the mapped read must either
    account for it or fall back to reading X (it checks X's first row), never return shifted values."""
    import anndata as ad
    import h5py

    tiny = make_tiny(tmp_path / "d")
    genes = read_gene_list(tiny.genes)
    raw = ad.read_h5ad(tiny.train)
    blocked = tmp_path / "user-block.h5ad"
    with h5py.File(blocked, "w", userblock_size=4096) as f:
        ad.io.write_elem(f, "/", raw)
    with h5py.File(blocked, "r") as f:
        assert f.userblock_size == 4096 and f["X"].id.get_offset() is not None
    assert np.array_equal(load_training_set(blocked, genes).X, load_training_set(tiny.train, genes).X)
