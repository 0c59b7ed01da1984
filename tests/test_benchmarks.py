"""The benchmark's own arithmetic and its ideal loop, on tiny inputs (no timing is asserted)."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def compare():
    spec = importlib.util.spec_from_file_location("compare", BENCH / "compare.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["compare"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    del sys.modules["compare"]


def _case(name: str, reference: float, wall: float, train_set: float, embed_set: float, reference_replicates: int = 10) -> dict:
    ours = {"wall": wall, "extra": {"train_data_set_s": train_set, "embed_data_set_s": embed_set}}
    return {
        "case": name,
        "replicates": 10,
        "reference_replicates": reference_replicates,
        "reference": {"wall": reference},
        "transdnn": {"fp32": ours},
    }


def test_workload_pays_startup_once_per_partition(compare):
    results = [_case("cortex 5k rows", 360.0, 100.0, 80.0, 2.0), _case("subcortex 2k rows", 36.0, 20.0, 9.0, 1.0)]
    hours = compare.workload_hours(results, data_sets=100)
    assert hours.loc["reference", "cortex"] == pytest.approx(10.0)
    assert hours.loc["transdnn fp32", "cortex"] == pytest.approx((18.0 + 100 * 82.0) / 3600)
    assert hours.loc["transdnn fp32", "subcortex"] == pytest.approx((10.0 + 100 * 10.0) / 3600)
    assert hours.loc["reference", "all 2,000 models"] == pytest.approx(11.0)


def test_workload_scales_a_reference_run_with_fewer_replicates(compare):
    """On a short GPU lease the reference trains 2 of the 10 replicates, one after another: the workload
    counts it five times over."""
    results = [_case("cortex 5k rows", 72.0, 100.0, 80.0, 2.0, 2), _case("subcortex 2k rows", 36.0, 20.0, 9.0, 1.0)]
    hours = compare.workload_hours(results, data_sets=100)
    assert hours.loc["reference", "cortex"] == pytest.approx(10.0)
    assert hours.loc["reference", "subcortex"] == pytest.approx(1.0)


RECORDED_RUN = Path(__file__).resolve().parents[1] / "docs" / "bench" / "cpu-2026-11-26-run4.json"


def _verdict(table, target: str, where: str) -> tuple[str, str]:
    row = table[(table["target"] == target) & (table["where"] == where)]
    assert len(row) == 1, (target, where)
    return row["measured"].iloc[0], row["met"].iloc[0]


def test_targets_judge_a_recorded_run(compare):
    """The full CPU run recorded in docs/performance.md, judged again: the verdicts its tables give."""
    table = compare.targets(json.loads(RECORDED_RUN.read_text()))
    assert _verdict(table, "speed-up over the reference", "cortex fp32") == ("2.48x", "no")
    assert _verdict(table, "speed-up over the reference", "subcortex fp32") == ("3.68x", "yes")
    assert _verdict(table, "train + embed over the ideal loop", "cortex fp32") == ("1.19x", "no")
    assert _verdict(table, "per-epoch work beyond the pass", "cortex fp32") == ("9.3%", "yes")
    assert _verdict(table, "per-epoch work beyond the pass", "subcortex fp32") == ("10.3%", "no")
    assert _verdict(table, "default outputs over the reference's bytes", "subcortex fp32") == ("13.0%", "no")
    assert _verdict(table, "loading 50k rows, s (anndata's read + 20 %)", "cortex") == ("0.47", "yes")
    assert _verdict(table, "split time for 10x the rows", "cortex") == ("1.8x", "yes")
    assert _verdict(table, "peak MB, 100170-row set (1.5 x selected fp32 + 1 GiB)", "cortex") == ("2301", "yes")
    assert len(table) == 2 * 2 * 4 + 4  # two sets x two precisions x four targets, then loading, growth, memory


def test_targets_judge_a_shortened_reference_per_replicate_epoch(compare):
    """A GPU lease runs 2 of the reference's 10 replicates: the speed-up is taken per replicate-epoch and
    its partial outputs are not weighed against transdnn's."""
    run = json.loads(RECORDED_RUN.read_text())
    cortex = run["cases"][0]
    cortex["reference_replicates"] = 2
    cortex["reference"]["wall"] /= 5
    cortex["reference"]["replicate_epochs"] //= 5
    table = compare.targets({"cases": [cortex]})
    assert _verdict(table, "speed-up over the reference per replicate-epoch", "cortex fp32") == ("2.48x", "no")
    assert "default outputs over the reference's bytes" not in set(table["target"])
    assert set(table["where"]) == {"cortex fp32", "cortex bf16"}


def test_targets_judge_a_gpu_run_on_the_gpu_speed_up(compare):
    """On a GPU the wall-time budget of the CPU does not apply: each further data set (train + embed) is
    judged per replicate-epoch against 50x; loading, growth and memory still are judged."""
    run = json.loads(RECORDED_RUN.read_text())
    run["machine"]["gpu"] = "NVIDIA H100 80GB HBM3"
    cortex, subcortex = run["cases"][:2]
    for case in (cortex, subcortex):
        case["reference_replicates"], case["reference"]["wall"], case["reference"]["replicate_epochs"] = 1, 40.0, 50
        case["transdnn"] = {"fp32": case["transdnn"]["fp32"]}
    cortex["transdnn"]["fp32"]["extra"] |= {"train_data_set_s": 5.0, "embed_data_set_s": 2.5}  # 15 ms: 53.3x
    subcortex["transdnn"]["fp32"]["extra"] |= {"train_data_set_s": 5.0, "embed_data_set_s": 3.5}  # 17 ms: 47.1x
    table = compare.targets(run)
    name = "speed-up per replicate-epoch, each further data set"
    assert _verdict(table, name, "cortex fp32") == ("53.3x", "yes")
    assert _verdict(table, name, "subcortex fp32") == ("47.1x", "no")
    assert "train + embed over the ideal loop" not in set(table["target"])
    assert "loading 50k rows, s (anndata's read + 20 %)" in set(table["target"])


def test_ideal_loop_prints_its_wall_time():
    args = "--rows 64 --genes 16 --classes 4 --replicates 2 --epochs 2 --batch 8 --steps 3 --hidden 8"
    out = subprocess.run(
        [sys.executable, str(BENCH / "ideal_loop.py"), *args.split()], capture_output=True, text=True, check=True
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["wall"] > 0 and result["device"] in ("cpu", "cuda")


def test_load_timers_read_the_file_in_a_fresh_process(compare, tiny):
    """Both loaders of the loading comparison run, each in its own process, and report a duration; a
    missing file fails loudly instead of timing an error."""
    for which in ("anndata", "transdnn"):
        assert compare._load_seconds(which, tiny.train, tiny.genes) > 0
        with pytest.raises(subprocess.CalledProcessError):
            compare._load_seconds(which, tiny.train.with_name("missing.h5ad"), tiny.genes)


@pytest.mark.slow
def test_memory_check_trains_one_epoch_of_its_set(compare, tmp_path, monkeypatch):
    """The 100k-row memory check runs last in a full benchmark: it builds its set (here ~630 rows),
    trains one epoch in its own process and reports the peak beside the issue's limit."""
    monkeypatch.setattr(compare, "CACHE", tmp_path)
    result = compare.memory_100k(rows_target=630)
    assert result["rows"] == 630
    assert result["selected_mb"] == pytest.approx(630 * 4542 * 4 / 2**20)
    assert result["limit_mb"] == pytest.approx(1.5 * result["selected_mb"] + 1024)
    assert result["peak_mb"] > 0


def test_epoch_parts_compares_two_checkouts_in_turns(params):
    """With --against, fresh processes of both checkouts alternate; each reports the per-epoch work
    beyond the training pass from transdnn's own accounting."""
    args = f"cortex --params {params} --epochs 2 --against {BENCH.parent / 'src'} --rounds 2"
    out = subprocess.run(
        [sys.executable, str(BENCH / "epoch_parts.py"), *args.split()],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    runs = [json.loads(line.split(" ", 1)[1]) for line in out if line.startswith(("this {", "against {"))]
    assert [line.split(" ", 1)[0] for line in out[:4]] == ["against", "this", "against", "this"]
    for seconds in runs:
        assert seconds["epochs"] == 2 and seconds["train_pass"] > 0
        beyond = seconds["validation"] + seconds["homology_rank"] + seconds["bookkeeping"]
        assert seconds["beyond_share"] == pytest.approx(beyond / seconds["train_pass"])
    assert out[-1].startswith("against  per-epoch work beyond the pass: ") and out[-1].count("%") == 2


def test_int8_bytes_are_those_of_the_checkpoint_int8_would_write(compare, params, tmp_path):
    """The benchmark's int8 bytes row: the chosen checkpoint re-encoded as `train --checkpoint-dtype int8`
    writes it, and shared with the reference's bytes as the default's are."""
    from conftest import train_cortex
    from transdnn.checkpoints import RunLayout

    train_cortex(params, "--no-track")
    layout = RunLayout(tmp_path / "runs" / "cortex", "Integrated_dataset_0")
    float16 = layout.checkpoint("best_valid").stat().st_size
    growth = compare.int8_growth(layout, "best_valid", tmp_path / "int8")
    train_cortex(params, "--no-track", "--checkpoint-dtype", "int8")
    assert growth < 0 and float16 + growth == layout.checkpoint("best_valid").stat().st_size
    case = _case("cortex 5k rows", 360.0, 100.0, 80.0, 2.0)
    case["reference"].update(out_bytes=1000, replicate_epochs=500)
    case["transdnn"]["fp32"].update(out_bytes=130, replicate_epochs=500)
    case["transdnn"]["fp32"]["extra"].update(train_s=90.0, per_epoch_overhead=0.1, int8_out_bytes=70)
    case["ideal"] = {"fp32": {"wall": 80.0}}
    x = compare.ratios_of(case, "fp32")
    assert x["bytes_share"] == pytest.approx(0.13) and x["int8_bytes_share"] == pytest.approx(0.07)
    del case["transdnn"]["fp32"]["extra"]["int8_out_bytes"]  # a run recorded before the row existed
    assert compare.ratios_of(case, "fp32")["int8_bytes_share"] is None
