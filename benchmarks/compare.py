"""Side-by-side benchmark: the published DNN stage vs transdnn vs the ideal batched loop, in one run.

    python benchmarks/compare.py            # full: 10 replicates x 50 epochs on the default sets
    python benchmarks/compare.py --quick    # smoke: 2 replicates x 3 epochs
    python benchmarks/compare.py --only early-stopping --precisions fp32 --skip-100k     # one case
    python benchmarks/compare.py --only cortex-5k,subcortex-2k --reference-replicates 2  # a GPU lease

Prints wall time, ms per replicate-epoch, peak memory, bytes written and the homology rank of each,
then the ratios (speed-up over the reference, overhead over the ideal loop, bytes, also as
`train.checkpoint_dtype: int8` would write them), loading/split scaling and peak memory on a 100k-row
set. The reference wheel and its dependencies are fetched with pip into a cache outside the repository
(BENCH_CACHE, default ~/.cache/transdnn-bench).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypedDict

import numpy as np
import pandas as pd
import yaml

from transdnn.choices import Checkpoint

REPO = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
CACHE = Path(os.environ.get("BENCH_CACHE", Path.home() / ".cache" / "transdnn-bench"))
# the CLI of the environment running this script, activated or not
TRANSDNN = str(Path(sys.executable).with_name("transdnn")) if Path(sys.executable).with_name("transdnn").exists() else "transdnn"
REFERENCE_DEPS = ["skorch==1.4.0", "scikit-learn", "tabulate", "tqdm", "joblib", "threadpoolctl"]


def fetch_reference() -> tuple[Path, Path]:
    """Download transbrain==1.8.7 and the reference's extra dependencies (no install into the venv)."""
    wheel_dir, deps = CACHE / "transbrain-1.8.7", CACHE / "deps"
    if not (wheel_dir / "pipeline" / "code" / "dnn" / "models.py").exists():
        dl = CACHE / "download"
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(dl), "transbrain==1.8.7"], check=True
        )
        with zipfile.ZipFile(next(dl.glob("transbrain-1.8.7-*.whl"))) as zf:
            zf.extractall(wheel_dir)
    if not (deps / "skorch").exists():
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(deps), *REFERENCE_DEPS], check=True
        )
    return wheel_dir, deps


@dataclass
class Case:
    key: str  # for --only
    name: str
    partition: str
    samples: int
    cells: int
    replicates: int
    epochs: int
    learning_rate: float | None = None  # None: the published 6e-5
    reference_replicates: int | None = None  # None: as many as transdnn trains
    data: Path = field(init=False)

    @property
    def reference_runs(self) -> int:
        """Replicates the reference trains."""
        return self.reference_replicates or self.replicates

    @property
    def rows(self) -> int:
        return self.samples * self.cells * regions_of(self.partition)


def regions_of(partition: str) -> int:
    """Training regions (the model's classes) of a partition, from transdnn's atlas."""
    from transdnn.synth import atlas_regions

    return len(atlas_regions(f"human_bn_{partition}"))


@dataclass
class Measure:
    wall: float
    peak_mb: float
    out_bytes: int = 0
    rank: float = float("nan")
    replicate_epochs: int = 0
    extra: dict = field(default_factory=dict)


def run(cmd: list[str], env: dict | None = None) -> tuple[float, float, str]:
    """Run a command; return wall seconds, peak RSS (MB) of that process tree's largest process, stdout."""
    start = time.perf_counter()
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})},
    )
    out, err = proc.communicate()
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{err[-3000:]}")
    import resource

    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return wall, peak, out


def run_measured(cmd: list[str], env: dict | None = None) -> tuple[float, float, str]:
    """Like run(), but the peak is of this command alone (a fresh wrapper process per command)."""
    wrapper = [
        sys.executable,
        "-c",
        (
            "import json,os,resource,subprocess,sys,time;"
            "t=time.perf_counter();p=subprocess.run(sys.argv[1:],capture_output=True,text=True);"
            "sys.stderr.write(p.stderr);sys.stdout.write(p.stdout);"
            "print(json.dumps({'__wall':time.perf_counter()-t,'__peak':resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss/1024,'__rc':p.returncode}))"
        ),
        *cmd,
    ]
    _, _, out = run(wrapper, env)
    info = json.loads(out.strip().splitlines()[-1])
    if info["__rc"] != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed")
    return info["__wall"], info["__peak"], "\n".join(out.strip().splitlines()[:-1])


def describe_machine() -> dict:
    import platform

    import torch

    cpu = next(
        (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if "model name" in line), ""
    )
    from transdnn.hardware import native_bf16, resolve_device

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpu": cpu or platform.processor(),
        "cores": os.cpu_count(),
        "gpu": gpu,
        "torch": torch.__version__,
        "native_bf16": native_bf16(resolve_device("auto")),
    }


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def synth(case: Case) -> None:
    from transdnn.settings import load_settings
    from transdnn.synth import synthesize

    base = load_settings(REPO / "params.yaml").synth
    case.data = CACHE / "data" / f"{case.partition}-{case.samples}x{case.cells}"
    if not paths(case).train(0).exists():
        cfg = base.model_copy(
            update={
                "out": case.data,
                "samples_per_region": case.samples,
                "cells_per_sample": case.cells,
                "other_rows": 0,
                "datasets": 1,
            }
        )
        synthesize(cfg, (case.partition,))


def paths(case: Case):
    from transdnn.synth import SynthPaths

    return SynthPaths(case.data, case.partition)


def rank_of(human_csv: Path, mouse_csv: Path, homology: Path) -> float:
    import torch

    from transdnn.homology import homology_rank, pair_indices, pearson

    h, m = pd.read_csv(human_csv, index_col=0), pd.read_csv(mouse_csv, index_col=0)
    hom = pd.read_csv(homology)
    hi, mi = pair_indices(
        [str(i) for i in h.index], [str(i) for i in m.index], hom.human_region.tolist(), hom.mouse_region.tolist()
    )
    return float(homology_rank(pearson(torch.tensor(h.to_numpy()), torch.tensor(m.to_numpy())), hi, mi))


def bench_reference(case: Case, wheel: Path, deps: Path, work: Path) -> Measure:
    p = paths(case)
    out = work / "reference"
    genes = len(pd.read_csv(p.genes))
    import anndata as ad

    obs = ad.read_h5ad(p.train(0), backed="r").obs
    regions = obs["region_index"].str.split("_").str[0].nunique()
    _, peak, stdout = run_measured(
        [
            sys.executable,
            str(HERE / "reference_runner.py"),
            "--wheel",
            str(wheel),
            "--deps",
            str(deps),
            "--train",
            str(p.train(0)),
            "--human",
            str(p.human),
            "--mouse",
            str(p.mouse),
            "--genes",
            str(p.genes),
            "--homology",
            str(p.homology),
            "--out",
            str(out),
            "--replicates",
            str(case.reference_runs),
            "--epochs",
            str(case.epochs),
            "--inputs",
            str(genes),
            "--outputs",
            str(regions),
            *(["--learning-rate", str(case.learning_rate)] if case.learning_rate else []),
        ]
    )
    info = json.loads(stdout.strip().splitlines()[-1])
    ranks, epochs, skipped = [], 0, 0
    for r in range(case.reference_runs):
        rep = out / "Data_0" / f"Repeat_{r}"
        hist = pd.read_csv(rep / "loss and rank each epoch.csv")
        epochs += len(hist) + (1 if len(hist) < case.epochs else 0)  # the stopping epoch is not logged
        res = rep / "Results"
        if (res / "human_embedding.csv").exists():
            ranks.append(rank_of(res / "human_embedding.csv", res / "mouse_embedding.csv", p.homology))
        else:  # its defect: no best-valid checkpoint (losses never went under 4.0), so embed skipped it
            skipped += 1
            last = max(res.glob("human_embedding_epoch*.csv"), key=lambda f: int(f.stem.removeprefix("human_embedding_epoch")))
            ranks.append(rank_of(last, res / last.name.replace("human", "mouse"), p.homology))
    extra = {"split_s": float(np.mean(info["split_seconds"])), "skipped_replicates": skipped}
    return Measure(info["wall"], peak, dir_bytes(out), float(np.mean(ranks)), epochs, extra)


def int8_growth(layout: Any, kind: Checkpoint, folder: Path) -> int:
    """How many bytes the written checkpoint would gain (a negative number) under `train.checkpoint_dtype:
    int8`: the same weights encoded and saved as transdnn saves them (the size depends on the shapes alone)."""
    from transdnn.checkpoints import load_model, save_model

    path = folder / f"{kind}.pt"
    save_model(path, folder / "model.json", load_model(layout, kind).encoded("int8"))
    return path.stat().st_size - layout.checkpoint(kind).stat().st_size


def bench_transdnn(case: Case, work: Path, precision: str, train_marginal: bool = False) -> Measure:
    from transdnn.checkpoints import RunLayout

    p = paths(case)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    part = params[case.partition]
    part["data"] = p.data_section()
    part["train"].update(replicates=case.replicates, max_epochs=case.epochs, device="auto", precision=precision)
    if case.learning_rate:
        part["train"]["learning_rate"] = case.learning_rate
    part["out"] = str(work / f"transdnn-{precision}")
    params_file = work / f"params-{precision}.yaml"
    params_file.write_text(yaml.safe_dump(params))
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}"}
    artifacts = work / "mlartifacts"  # the store's artifacts (logged models, history, plots) beside params
    before = dir_bytes(artifacts) if artifacts.exists() else 0
    wall_t, peak_t, _ = run_measured([TRANSDNN, "train", case.partition, "--params", str(params_file)], env)
    wall_e, peak_e, _ = run_measured([TRANSDNN, "embed", case.partition, "--params", str(params_file)], env)
    root = work / f"transdnn-{precision}"
    layout = RunLayout.for_training_file(root, p.train(0))
    summary = pd.read_csv(layout.summary)
    info = json.loads(layout.train_info.read_text())
    seconds = info["seconds"]
    metrics = json.loads(layout.partition_metrics.read_text())["data_sets"][layout.dataset]
    beyond = sum(v for k, v in seconds.items() if k not in ("train_pass", "epochs"))
    mlflow_bytes = dir_bytes(artifacts) - before  # before the two-set jobs log to the same store again
    embedded = json.loads(layout.embed_info.read_text())
    # the first set of a job also pays one-time costs (CUDA context, lazy imports); a second set does not
    further, further_embedded = info, embedded
    if train_marginal:
        further = train_second_set(params, case.partition, work / f"two-set-train-{precision}", env)
        further_embedded = embed_second_set(params, case.partition, layout.train_root, work / f"two-sets-{precision}", env)
    return Measure(
        wall_t + wall_e,
        max(peak_t, peak_e),
        dir_bytes(root),
        metrics["homology_rank_mean"],
        int(summary.epochs_run.sum()),  # a replicate that stopped early is no longer computed
        {
            "checkpoint_bytes": dir_bytes(layout.checkpoints_dir),
            "int8_out_bytes": dir_bytes(root) + int8_growth(layout, part["embed"]["checkpoint"], work / f"int8-{precision}"),
            "mlflow_bytes": mlflow_bytes,
            "train_data_set_s": further["data_set_seconds"],
            "train_first_data_set_s": info["data_set_seconds"],
            "after_training_s": further["after_training_seconds"],
            "embed_data_set_s": further_embedded["data_set_seconds"],
            "embed_first_data_set_s": embedded["data_set_seconds"],
            "epochs_run": int(summary.epochs_run.max()),
            # the ideal loop has no early stopping: as many replicate-epochs as transdnn ran
            "ideal_epochs": -(-int(summary.epochs_run.sum()) // case.replicates),
            "steps": int(summary.n_train_rows.max()) // int(part["train"]["batch_size"]),
            "train_s": wall_t,
            "embed_s": wall_e,
            "seconds": seconds,
            "per_epoch_overhead": beyond / seconds["train_pass"],
        },
    )


def _two_sets(params: dict, partition: str, work: Path) -> tuple[Path, list[str]]:
    """A params file in `work` that lists the partition's training set twice (a link under a second
    name), out in `work`; and the two names."""
    part = params[partition]
    (work / "sets").mkdir(parents=True)
    first = part["data"]["train"][0]
    names = [first, f"{Path(first).stem}_again.h5ad"]
    for name in names:
        (work / "sets" / name).symlink_to(Path(part["data"]["train_dir"]) / names[0])
    part = {**part, "data": {**part["data"], "train_dir": str(work / "sets"), "train": names}, "out": str(work)}
    params_file = work / "params.yaml"
    params_file.write_text(yaml.safe_dump({**params, partition: part}))
    return params_file, names


def train_second_set(params: dict, partition: str, work: Path, env: dict) -> dict:
    """train.json of the second data set of a two-set `transdnn train`: what each further data set costs."""
    from transdnn.checkpoints import RunLayout

    params_file, names = _two_sets(params, partition, work)
    run_measured([TRANSDNN, "train", partition, "--params", str(params_file)], env)
    return json.loads(RunLayout.for_training_file(work, Path(names[1])).train_info.read_text())


def embed_second_set(params: dict, partition: str, trained: Path, work: Path, env: dict) -> dict:
    """embed.json of the second data set of a two-set `transdnn embed` over the `trained` folder under two
    names: what each further data set costs the embed stage."""
    from transdnn.checkpoints import RunLayout

    params_file, names = _two_sets(params, partition, work)
    layouts = [RunLayout.for_training_file(work, Path(name)) for name in names]
    for layout in layouts:
        shutil.copytree(trained, layout.train_root)
    run_measured([TRANSDNN, "embed", partition, "--params", str(params_file)], env)
    return json.loads(layouts[1].embed_info.read_text())


def bench_ideal(case: Case, genes: int, epochs: int, steps: int, precision: str) -> Measure:
    args: dict[str, int | str] = {"rows": case.rows, "genes": genes, "classes": regions_of(case.partition)}
    args |= {"replicates": case.replicates}
    args |= {"epochs": epochs, "batch": 256, "steps": steps, "precision": precision}
    _, peak, stdout = run_measured(
        [sys.executable, str(HERE / "ideal_loop.py"), *(x for k, v in args.items() for x in (f"--{k}", str(v)))]
    )
    return Measure(json.loads(stdout.strip().splitlines()[-1])["wall"], peak, 0, float("nan"), case.replicates * epochs)


_LOAD_TIMERS = {
    "anndata": "import anndata as ad\nstart = time.perf_counter()\nad.read_h5ad(train)",
    "transdnn": (
        "from transdnn.data import load_training_set, read_gene_list\ngenes = read_gene_list(gene_list)\n"
        "start = time.perf_counter()\nload_training_set(train, genes)"
    ),
}


def _load_seconds(which: str, train: Path, gene_list: Path) -> float:
    """One read in a fresh process, as a training reads its set: imports excluded, first-call costs in."""
    code = f"import time\nfrom pathlib import Path\ntrain, gene_list = Path({str(train)!r}), Path({str(gene_list)!r})\n"
    code += _LOAD_TIMERS[which] + "\nprint(time.perf_counter() - start)"
    return float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()[-1])


def loading_and_split(case: Case, repeats: int = 5) -> dict:
    """transdnn's loading vs anndata's own read of the same file, each in fresh processes taken in turns,
    median of `repeats` (one read of a ~1 GB file varies 0.2-2 s here with the page cache and the kernel's
    memory state); split time."""
    from transdnn.data import load_training_set, read_gene_list
    from transdnn.split import split_samples

    p = paths(case)
    times: dict[str, list[float]] = {"anndata": [], "transdnn": []}
    for _ in range(repeats):
        for which, found in times.items():
            found.append(_load_seconds(which, p.train(0), p.genes))
    ts = load_training_set(p.train(0), read_gene_list(p.genes))
    start = time.perf_counter()
    split_samples(ts.sample_region, 0.1, np.random.default_rng(0))
    return {
        "rows": int(ts.X.shape[0]),
        "anndata_read_s": float(np.median(times["anndata"])),
        "transdnn_load_s": float(np.median(times["transdnn"])),
        "transdnn_split_s": time.perf_counter() - start,
        "anndata_read_all_s": times["anndata"],
        "transdnn_load_all_s": times["transdnn"],
    }


def memory_100k(rows_target: int = 100_000) -> dict:
    """Peak RSS of one training epoch on a ~100k-row cortex set vs 1.5x its float32 matrix + 1 GiB."""
    cells = max(1, round(rows_target / (regions_of("cortex") * 6)))
    case = Case("cortex-100k", "cortex 100k rows", "cortex", samples=6, cells=cells, replicates=1, epochs=1)
    synth(case)
    work = CACHE / "work" / "mem100k"
    work.mkdir(parents=True, exist_ok=True)
    p = paths(case)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["cortex"]["data"] = p.data_section()
    params["cortex"]["train"].update(replicates=1, max_epochs=1, device="cpu")
    params["cortex"]["out"] = str(work / "out")
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    _, peak, _ = run_measured([TRANSDNN, "train", "cortex", "--params", str(work / "params.yaml"), "--no-track"])
    rows = case.rows
    selected_mb = rows * len(pd.read_csv(p.genes)) * 4 / 2**20
    return {"rows": rows, "selected_mb": selected_mb, "peak_mb": peak, "limit_mb": 1.5 * selected_mb + 1024}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2 replicates x 3 epochs (smoke run)")
    ap.add_argument("--skip-100k", action="store_true", help="skip the 100k-row memory check")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument(
        "--precisions",
        help="transdnn/ideal precisions to run, comma-separated (default: fp32, and bf16 where the machine has native "
        "bf16; transdnn refuses bf16 elsewhere)",
    )
    ap.add_argument("--only", help="comma-separated case keys: cortex-5k, subcortex-2k, cortex-50k, early-stopping")
    ap.add_argument(
        "--train-marginal",
        action="store_true",
        help="also train and embed two data sets in one job and take the second's time as what each further set "
        "costs (without it: the one set's time, one-time costs included); on by itself on a GPU, where training is "
        "short and the GPU target is judged on further sets",
    )
    ap.add_argument(
        "--reference-replicates",
        type=int,
        help="replicates of the reference (default: as many as transdnn); it trains them one after another, so its "
        "time per replicate-epoch does not depend on how many: fewer fit a short GPU lease",
    )
    a = ap.parse_args()
    R, E = (2, 3) if a.quick else (10, 50)
    cases = [
        Case("cortex-5k", "cortex 5k rows", "cortex", 6, 8, R, E),
        # the reference divides by zero when validation holds < 256 rows, as on the default 1k-row subcortex set
        Case("subcortex-2k", "subcortex 2k rows", "subcortex", 6, 16, R, E),
        Case("cortex-50k", "cortex 50k rows", "cortex", 6, 80, 2, 2 if a.quick else 3),
        # real data stop early; the synthetic sets do so only at a higher learning rate
        Case("early-stopping", "subcortex 2k rows, early stopping (lr 1e-3)", "subcortex", 6, 16, R, E, learning_rate=1e-3),
    ]
    keys = [c.key for c in cases]
    only = keys if a.only is None else a.only.split(",")
    if unknown := set(only) - set(keys):
        ap.error(f"--only: unknown case {sorted(unknown)}; expected some of {keys}")
    by_key = {c.key: c for c in cases}
    cases = [c for c in cases if c.key in only]
    for c in cases:
        c.reference_replicates = a.reference_replicates
    machine = describe_machine()
    precisions = a.precisions.split(",") if a.precisions else ["fp32", "bf16"] if machine["native_bf16"] else ["fp32"]
    if "bf16" in precisions and not machine["native_bf16"]:
        ap.error("--precisions: bf16 on a machine without native bf16, which transdnn refuses (expected fp32 here)")
    wheel, deps = fetch_reference()
    marginal = a.train_marginal or machine["gpu"] is not None
    print("machine:", json.dumps(machine))
    results = []
    for case in cases:
        synth(case)
        work = CACHE / "work" / "".join(ch if ch.isalnum() else "-" for ch in case.name)
        if work.exists():
            shutil.rmtree(work)
        work.mkdir(parents=True)
        p = paths(case)
        genes = len(pd.read_csv(p.genes))
        result: dict[str, Any] = {
            "case": case.name,
            "replicates": case.replicates,
            "reference_replicates": case.reference_runs,
            "max_epochs": case.epochs,
            "transdnn": {},
            "ideal": {},
        }
        result["reference"] = bench_reference(case, wheel, deps, work).__dict__
        for precision in precisions:
            ours = bench_transdnn(case, work, precision, marginal)
            ideal = bench_ideal(case, genes, ours.extra["ideal_epochs"], ours.extra["steps"], precision)
            result["transdnn"][precision], result["ideal"][precision] = ours.__dict__, ideal.__dict__
        results.append(result)
        print_case(result)
        if a.json:  # after each case, so that a run cut short (a GPU lease ending) keeps what it measured
            write_json(a.json, {"machine": machine, "cases": results})
    published = [r for r in results if r["case"] in ("cortex 5k rows", "subcortex 2k rows")]
    if len(published) == 2:
        print("\n== the published workload, 100 data sets per partition, hours on this machine")
        print(workload_hours(published).round(1).to_string())
    # growth with rows needs the 5k set's data, not its training: a run of cortex-50k alone reads both
    scaling = {}
    if "cortex-50k" in only:
        for size in ("50k", "5k"):
            synth(by_key[f"cortex-{size}"])
            scaling[size] = loading_and_split(by_key[f"cortex-{size}"])
    if scaling:
        print("\nloading and split (s):", json.dumps(scaling, indent=1))
    mem = None if a.skip_100k else memory_100k()
    if mem:
        print(
            f"\npeak memory, {mem['rows']}-row cortex set: {mem['peak_mb']:.0f} MB (limit 1.5 x {mem['selected_mb']:.0f} MB + 1 GiB = {mem['limit_mb']:.0f} MB)"
        )
    run = {"machine": machine, "cases": results, "scaling": scaling, "memory_100k": mem}
    verdicts = targets(run)
    if len(verdicts):
        quick = "; a --quick run is not the workload they are set on" if a.quick else ""
        kind = "GPU" if machine["gpu"] else "CPU"
        print(f"\n== the {kind} targets: {(verdicts.met == 'yes').sum()} of {len(verdicts)} met{quick}")
        print(verdicts.to_string(index=False))
    if a.json:
        write_json(a.json, run | {"targets": verdicts.to_dict("records")})


def write_json(path: Path, results: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(results, indent=1, default=float))
    tmp.replace(path)


def data_set_s(ours: dict) -> float:
    """Seconds one more data set adds to a multi-set job (train + embed), start-up paid once per job."""
    return ours["extra"]["train_data_set_s"] + ours["extra"]["embed_data_set_s"]


def workload_hours(results: list[dict], data_sets: int = 100) -> pd.DataFrame:
    """The published workload (2 partitions x 100 data sets x 10 replicates) as one job per stage: the
    reference runs once per data set (scaled up linearly where it ran fewer replicates); transdnn pays its
    start-up once per partition and stage."""
    rows: dict[str, dict[str, float]] = {name: {} for name in ["reference", *(f"transdnn {p}" for p in results[0]["transdnn"])]}
    for r in results:
        partition = r["case"].split()[0]
        rows["reference"][partition] = data_sets * r["reference"]["wall"] * r["replicates"] / r["reference_replicates"]
        for precision, ours in r["transdnn"].items():
            startup = ours["wall"] - data_set_s(ours)
            rows[f"transdnn {precision}"][partition] = startup + data_sets * data_set_s(ours)
    table = pd.DataFrame(rows).T / 3600
    table["all 2,000 models"] = table.sum(axis=1)
    return table


class Ratios(TypedDict):
    speed_up: float | None
    per_replicate_epoch: float
    per_further_set: float
    over_ideal_train: float
    over_ideal: float
    over_ideal_further_set: float
    per_epoch_work: float
    bytes_share: float | None
    int8_bytes_share: float | None


def ratios_of(r: dict, precision: str) -> Ratios:
    """transdnn's ratios in one case and precision; the speed-up and the bytes share are None where the
    reference trained fewer replicates (its wall time and outputs are not the full run's)."""
    ref, ours, ideal = r["reference"], r["transdnn"][precision], r["ideal"][precision]
    whole = r["reference_replicates"] == r["replicates"]
    ref_ms = ref["wall"] / ref["replicate_epochs"]
    return {
        "speed_up": ref["wall"] / ours["wall"] if whole else None,
        "per_replicate_epoch": ref_ms / (ours["wall"] / ours["replicate_epochs"]),
        "per_further_set": ref_ms / (data_set_s(ours) / ours["replicate_epochs"]),
        "over_ideal_train": ours["extra"]["train_s"] / ideal["wall"],
        "over_ideal": ours["wall"] / ideal["wall"],
        "over_ideal_further_set": data_set_s(ours) / ideal["wall"],
        "per_epoch_work": ours["extra"]["per_epoch_overhead"],
        "bytes_share": ours["out_bytes"] / max(ref["out_bytes"], 1) if whole else None,
        "int8_bytes_share": ours["extra"]["int8_out_bytes"] / max(ref["out_bytes"], 1)
        if whole and "int8_out_bytes" in ours["extra"]  # since 2026-12-07
        else None,
    }


# The CPU budget (docs/performance.md, "target (CPU)"), set on the default cortex and subcortex sets.
TARGET_CASES = ("cortex 5k rows", "subcortex 2k rows")
MIN_SPEED_UP = 2.5  # the full run over the reference
MAX_OVER_IDEAL = 1.15  # train + embed over the ideal loop
MAX_PER_EPOCH_WORK = 0.10  # validation, rank, bookkeeping over the training pass
MAX_BYTES_SHARE = 0.10  # default outputs over the reference's
MAX_LOAD_OVER_ANNDATA = 1.2  # loading 50k rows over anndata's own read
MAX_GROWTH_OVER_ROWS = 1.5  # linear: 10x the rows costs at most 15x the time (quadratic: ~100x)
# The GPU target, per replicate-epoch over the reference, for each further data set of a job (train +
# embed): the published workload's unit, 100 sets per partition in one job
MIN_GPU_SPEED_UP = 50.0


def targets(run: dict) -> pd.DataFrame:
    """Each target against one run's results (the `--json` layout): measured, limit, met.

    A CPU run is judged on the CPU budget; a run on a GPU on the GPU speed-up instead (its wall-time
    ratios are not the CPU's). A case where the reference trained fewer replicates is judged per
    replicate-epoch and has no bytes row (its outputs are not the full run's). Loading, growth with rows
    and peak memory are judged on either."""
    rows = []
    on_gpu = bool(run.get("machine", {}).get("gpu"))

    def add(target: str, where: str, measured: float, limit: float, met: bool, fmt: str) -> None:
        rows.append(
            {
                "target": target,
                "where": where,
                "measured": fmt.format(measured),
                "limit": fmt.format(limit),
                "met": "yes" if met else "no",
            }
        )

    for r in (r for r in run["cases"] if r["case"] in TARGET_CASES):
        for precision in r["transdnn"]:
            where, x = f"{r['case'].split()[0]} {precision}", ratios_of(r, precision)
            if on_gpu:
                further = x["per_further_set"]
                name = "speed-up per replicate-epoch, each further data set"
                add(name, where, further, MIN_GPU_SPEED_UP, further >= MIN_GPU_SPEED_UP, "{:.1f}x")
                continue
            if x["speed_up"] is not None:
                speed_up, name = x["speed_up"], "speed-up over the reference"
            else:
                speed_up, name = x["per_replicate_epoch"], "speed-up over the reference per replicate-epoch"
            add(name, where, speed_up, MIN_SPEED_UP, speed_up >= MIN_SPEED_UP, "{:.2f}x")
            over = x["over_ideal"]
            add("train + embed over the ideal loop", where, over, MAX_OVER_IDEAL, over <= MAX_OVER_IDEAL, "{:.2f}x")
            work = x["per_epoch_work"]
            add("per-epoch work beyond the pass", where, work, MAX_PER_EPOCH_WORK, work <= MAX_PER_EPOCH_WORK, "{:.1%}")
            if (share := x["bytes_share"]) is not None:
                add(
                    "default outputs over the reference's bytes",
                    where,
                    share,
                    MAX_BYTES_SHARE,
                    share <= MAX_BYTES_SHARE,
                    "{:.1%}",
                )
    scaling = run.get("scaling") or {}
    if big := scaling.get("50k"):
        limit = MAX_LOAD_OVER_ANNDATA * big["anndata_read_s"]
        add(
            "loading 50k rows, s (anndata's read + 20 %)",
            "cortex",
            big["transdnn_load_s"],
            limit,
            big["transdnn_load_s"] <= limit,
            "{:.2f}",
        )
        if small := scaling.get("5k"):
            more_rows = big["rows"] / small["rows"]
            for what, key in (("loading", "transdnn_load_s"), ("split", "transdnn_split_s")):
                growth, limit = big[key] / small[key], MAX_GROWTH_OVER_ROWS * more_rows
                add(f"{what} time for {more_rows:.0f}x the rows", "cortex", growth, limit, growth <= limit, "{:.1f}x")
    if mem := run.get("memory_100k"):
        peak, limit = mem["peak_mb"], mem["limit_mb"]
        add(f"peak MB, {mem['rows']}-row set (1.5 x selected fp32 + 1 GiB)", "cortex", peak, limit, peak <= limit, "{:.0f}")
    return pd.DataFrame(rows, columns=["target", "where", "measured", "limit", "met"])


def print_case(r: dict) -> None:
    ref = r["reference"]
    measured = [("reference", ref)]
    for precision in r["transdnn"]:
        measured += [(f"transdnn {precision}", r["transdnn"][precision]), (f"ideal loop {precision}", r["ideal"][precision])]
    rows = [
        {
            "impl": name,
            "wall s": round(m["wall"], 1),
            "ms/replicate-epoch": round(1000 * m["wall"] / max(m["replicate_epochs"], 1), 1),
            "peak MB": round(m["peak_mb"]),
            "written MB": round(m["out_bytes"] / 2**20, 1),
            "homology rank": round(m["rank"], 2),
        }
        for name, m in measured
    ]
    fewer = r["reference_replicates"] != r["replicates"]
    reference = f"; the reference {r['reference_replicates']}" if fewer else ""
    print(f"\n== {r['case']} ({r['replicates']} replicates{reference}, up to {r['max_epochs']} epochs)")
    print(pd.DataFrame(rows).to_string(index=False))
    ratios = {}
    for precision, ours in r["transdnn"].items():
        x = ratios_of(r, precision)
        ratios[precision] = {
            "speed-up vs reference": "n/a" if x["speed_up"] is None else f"{x['speed_up']:.2f}x",
            "per replicate-epoch": f"{x['per_replicate_epoch']:.2f}x",
            "per replicate-epoch, each further data set": f"{x['per_further_set']:.2f}x",
            "overhead vs ideal (train)": f"{x['over_ideal_train']:.2f}x",
            "overhead vs ideal (train+embed)": f"{x['over_ideal']:.2f}x",
            "overhead vs ideal (each further data set of a job)": f"{x['over_ideal_further_set']:.2f}x",
            "per-epoch work beyond the pass": f"{x['per_epoch_work']:.1%}",
            "bytes vs reference": "n/a" if x["bytes_share"] is None else f"{x['bytes_share']:.1%}",
            "bytes vs reference, checkpoint_dtype int8": "n/a"
            if x["int8_bytes_share"] is None
            else f"{x['int8_bytes_share']:.1%}",
            "checkpoints MB": round(ours["extra"]["checkpoint_bytes"] / 2**20),
            "MLflow artifacts MB": round(ours["extra"]["mlflow_bytes"] / 2**20),
        }
    print(pd.DataFrame(ratios).to_string())
    print(
        f"reference split {ref['extra']['split_s']:.2f} s/replicate; "
        f"reference replicates without a best-valid checkpoint: {ref['extra']['skipped_replicates']}"
    )


if __name__ == "__main__":
    main()
