"""Property-based: random malformed inputs are either accepted with a correct result or rejected with
exit status 2 and one line, never anything else."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from conftest import make_tiny, tiny_params, write_h5ad
from transdnn.cli import app

runner = CliRunner()
region = st.sampled_from(["hA", "hB", "hC", "hD", "other", "hZ"])
sample = st.sampled_from(["sample1", "sample2", "sample3", "sample1", "sample2", "s1", "sample", ""])
region_id = st.builds(lambda r, s, c: "_".join(p for p in (r, s, str(c)) if p), region, sample, st.integers(0, 3))


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(
    good=st.lists(
        st.builds(
            lambda r, s, c: f"{r}_sample{s}_{c}",
            st.sampled_from(["hA", "hB", "hC", "hD", "other"]),
            st.integers(1, 3),
            st.integers(0, 5),
        ),
        min_size=1,
        max_size=60,
    ),
    bad=st.lists(region_id, max_size=2),
    nan_at=st.one_of(st.none(), st.none(), st.integers(0, 10_000)),
    gene_pick=st.lists(st.integers(0, 40), min_size=0, max_size=12),
    dup_gene=st.sampled_from([False, False, True]),
)
def test_random_training_sets_are_accepted_correctly_or_rejected_with_exit_2(good, bad, nan_at, gene_pick, dup_gene):
    ids = good + bad
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tiny = make_tiny(root / "data")
        rng = np.random.default_rng(len(ids))
        X = rng.normal(size=(len(ids), len(tiny.gene_names))).astype(np.float32)
        if nan_at is not None:
            X.flat[nan_at % X.size] = np.nan
        var = list(tiny.gene_names)
        if dup_gene:
            var[1] = var[0]
        write_h5ad(tiny.train, X, ids, var)
        genes = [f"gene{i}" for i in gene_pick]  # gene40+ do not exist
        pd.DataFrame({"genes": genes}).to_csv(tiny.genes, index=False)
        params = tiny_params(root / "params.yaml", tiny, root / "runs")
        result = runner.invoke(app, ["validate", "cortex", "--params", str(params)])
        assert result.exit_code in (0, 2), result.output
        if result.exit_code == 2:
            lines = result.stderr.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.stderr
            return
        labelled = [i for i in ids if i.split("_")[0] != "other"]
        assert f"rows {len(labelled)}" in result.stdout
