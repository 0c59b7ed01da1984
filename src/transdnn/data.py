"""Data contract: load the TransBrain DNN-stage inputs in the reference layout and validate them.

Every violation raises `InputError` with one line naming the file, the field and what was expected.
"""

from __future__ import annotations

import mmap
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp

from transdnn.cpus import usable_cpus
from transdnn.errors import InputError, first_line

if TYPE_CHECKING:
    from transdnn.settings import DataPaths, ModelSettings

UNLABELLED = "other"
SPLIT_MIN_SAMPLES = 2  # samples per region a set to be split needs, so each side sees every region
_CAN_DROP_PAGES = hasattr(mmap, "MADV_DONTNEED")  # madvise is POSIX-only
_MAX_GATHER_THREADS = 8  # the gather is memory-bound: more threads than this only contend
_SHOW = 3


@dataclass(frozen=True)
class GeneList:
    path: Path
    genes: list[str]


@dataclass(frozen=True)
class Homology:
    path: Path
    human: list[str]
    mouse: list[str]


@dataclass(frozen=True)
class TrainingSet:
    """One integrated training set: labelled rows, their samples, and the selected genes."""

    path: Path
    X: np.ndarray  # rows x genes, float32, gene-list order
    labels: np.ndarray  # int64 category codes (alphabetical region order)
    regions: list[str]  # code -> region name
    row_sample: np.ndarray  # int64 sample code per row
    sample_region: np.ndarray  # int64 region code per sample
    genes: list[str]

    @property
    def n_samples(self) -> int:
        return len(self.sample_region)

    def units(self, model: ModelSettings) -> tuple[int, int]:
        """The model's input and output sizes for this set, held against params.yaml (`check_units`)."""
        return check_units(self.path, self.X.shape[1], len(self.regions), model)


@dataclass(frozen=True)
class TransformSet:
    """A human or mouse transform set, averaged per region (one row per region, sorted names)."""

    path: Path
    regions: list[str]
    means: np.ndarray  # regions x genes, float32


def _examples(items: list[str] | np.ndarray) -> str:
    items = list(items)
    more = f", ... ({len(items)} in all)" if len(items) > _SHOW else ""
    return ", ".join(repr(i) for i in items[:_SHOW]) + more


def read_gene_list(path: Path) -> GeneList:
    frame = _read_csv(path)
    if "genes" not in frame.columns:
        raise InputError(f"{path}: column 'genes' missing (expected a CSV with a 'genes' column)")
    genes = frame["genes"].dropna().astype(str).tolist()
    if not genes:
        raise InputError(f"{path}: column 'genes' is empty (expected at least one gene symbol)")
    dup = pd.Index(genes)[pd.Index(genes).duplicated()].unique().tolist()
    if dup:
        raise InputError(f"{path}: column 'genes' has duplicated genes {_examples(dup)} (expected unique symbols)")
    return GeneList(path, genes)


def gene_columns(trained: list[str], genes: GeneList) -> np.ndarray:
    """Where each gene a model was trained on sits in `genes`: inputs are matched to a model by gene
    name, so a gene list edited since the training (reordered, grown) still feeds each weight its gene."""
    where = {g: i for i, g in enumerate(genes.genes)}
    missing = [g for g in trained if g not in where]
    if missing:
        raise InputError(
            f"{genes.path}: column 'genes' lacks {len(missing)} of the {len(trained)} genes the model was trained on: "
            f"{_examples(missing)} (expected the training's gene list)"
        )
    return np.array([where[g] for g in trained], dtype=np.int64)


def read_homology(path: Path) -> Homology:
    frame = _read_csv(path)
    missing = [c for c in ("human_region", "mouse_region") if c not in frame.columns]
    if missing:
        raise InputError(f"{path}: columns {missing} missing (expected 'human_region' and 'mouse_region')")
    if frame.empty:
        raise InputError(f"{path}: no homologous pairs (expected at least one human_region/mouse_region row)")
    frame = frame[["human_region", "mouse_region"]]
    if frame.isna().any().any():
        raise InputError(f"{path}: empty cells in 'human_region'/'mouse_region' (expected a region name in each)")
    frame = frame.astype(str)
    repeated = frame[frame.duplicated()].drop_duplicates()
    if not repeated.empty:
        pairs = [f"{h}/{m}" for h, m in repeated.itertuples(index=False)]
        raise InputError(
            f"{path}: pairs listed more than once: {_examples(pairs)} (expected each human_region/mouse_region pair once: "
            "a repeated pair would count twice in the homology rank)"
        )
    return Homology(path, frame["human_region"].tolist(), frame["mouse_region"].tolist())


def _require_file(path: Path, expected: str) -> None:
    if path.is_dir():
        raise InputError(f"{path}: a folder, not a file (expected {expected})")
    if not path.is_file():
        raise InputError(f"{path}: file not found (expected {expected})")


def _read_csv(path: Path) -> pd.DataFrame:
    _require_file(path, "a CSV file")
    try:
        return pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not a readable CSV ({first_line(exc)})") from None


@contextmanager
def _backed(path: Path) -> Iterator[ad.AnnData]:
    """An h5ad open in backed mode: obs and var are read, X stays on disk until `_select_genes`."""
    _require_file(path, "an .h5ad file")
    if not h5py.is_hdf5(path):
        raise InputError(f"{path}: not an HDF5 file (expected an .h5ad file written by anndata)")
    try:
        adata = ad.read_h5ad(path, backed="r")
    except Exception as exc:  # anndata/h5py raise many types for truncated or foreign files
        raise _unreadable(path, exc) from None
    try:
        yield adata
    finally:
        adata.file.close()


def _unreadable(path: Path, exc: Exception) -> InputError:
    return InputError(f"{path}: unreadable h5ad ({first_line(exc)}); expected a complete anndata file")


def _region_ids(adata: ad.AnnData, path: Path) -> pd.Series:
    if "region_index" not in adata.obs.columns:
        raise InputError(f"{path}: obs['region_index'] missing (expected ids like 'A8m_sample3_17')")
    return adata.obs["region_index"].astype(str).reset_index(drop=True)


def _gene_positions(adata: ad.AnnData, genes: GeneList, path: Path) -> np.ndarray:
    """Where each gene-list gene sits among X's columns (var['Gene'], else var_names)."""
    names = adata.var["Gene"].astype(str) if "Gene" in adata.var.columns else pd.Series(adata.var_names)
    index = pd.Index(names.to_numpy())
    wanted = pd.Index(genes.genes)
    dup = index[index.duplicated()].unique()
    dup = dup[dup.isin(wanted)]
    if len(dup):
        raise InputError(f"{path}: var['Gene'] has duplicated genes {_examples(dup.tolist())} (expected unique symbols)")
    missing = wanted[~wanted.isin(index)]
    if len(missing):
        raise InputError(
            f"{path}: var['Gene'] lacks {len(missing)} of {len(wanted)} genes of {genes.path.name}: "
            f"{_examples(missing.tolist())} (expected every gene-list gene)"
        )
    first = pd.Series(np.arange(len(index)), index=index)
    return first[~first.index.duplicated()].reindex(wanted).to_numpy()  # duplicates outside the list are harmless


def _select_genes(adata: ad.AnnData, rows: np.ndarray, genes: GeneList, path: Path, chunk: int = 4096) -> np.ndarray:
    """Return rows x gene-list matrix (float32), reading X in row chunks: only the selected block is
    ever dense in memory, whether X is dense or sparse on disk."""
    cols = _gene_positions(adata, genes, path)
    out = np.empty((len(rows), len(cols)), dtype=np.float32)
    keep = np.zeros(adata.n_obs, dtype=bool)
    keep[rows] = True
    try:
        X = adata.X
        mapped = _mapped(X, path) if isinstance(X, h5py.Dataset) else None
        if mapped is None:
            _gather_read(X, keep, cols, out, path, chunk)
        else:
            _gather_mapped(*mapped, keep, cols, out, path, chunk)
    except InputError:
        raise
    except Exception as exc:  # a truncated or corrupt X only shows when it is read
        raise _unreadable(path, exc) from None
    return out


def _mapped(X: h5py.Dataset, path: Path) -> tuple[mmap.mmap, int, np.ndarray] | None:
    """The file's pages under a contiguous X (anndata's default layout), as an array.

    None, and X is read instead, where X is chunked (compressed), the file cannot be mapped, or the
    mapping does not read back X's first row (a file layout this does not know, e.g. a user block).
    """
    offset = X.id.get_offset()
    if offset is None:
        return None
    try:
        with open(path, "rb") as handle:
            pages = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        whole = np.frombuffer(pages, dtype=X.dtype, count=X.size, offset=offset).reshape(X.shape)
    except (OSError, ValueError):
        return None
    return (pages, offset, whole) if np.array_equal(whole[0], X[0], equal_nan=True) else None


def _gather_mapped(
    pages: mmap.mmap,
    offset: int,
    whole: np.ndarray,
    keep: np.ndarray,
    cols: np.ndarray,
    out: np.ndarray,
    path: Path,
    chunk: int,
) -> None:
    """Gather the gene columns of a mapped X straight from the file's pages.

    Mapping instead of reading skips a copy of every full-width row, and the chunks are gathered on
    all cores: numpy's take runs without the GIL, and the first touch of `out`'s fresh pages, as costly
    as the gather itself, is shared too. 50k cortex rows: 0.23 s on 2 cores against 0.4-2 s for one
    read-and-gather. Each chunk's pages leave the mapping once gathered, so resident memory grows by
    the chunks in flight, not by the file.
    """
    row_bytes = whole.dtype.itemsize * whole.shape[1]
    starts = range(0, whole.shape[0], chunk)
    firsts = np.concatenate([[0], np.cumsum([np.count_nonzero(keep[s : s + chunk]) for s in starts])])

    def gather(i: int) -> None:
        start, stop = starts[i], min(starts[i] + chunk, whole.shape[0])
        sel = keep[start:stop]
        if sel.any():
            _take(whole[start:stop] if sel.all() else whole[start:stop][sel], cols, out[firsts[i] : firsts[i + 1]], path)
        if _CAN_DROP_PAGES:
            low = (offset + start * row_bytes) // mmap.PAGESIZE * mmap.PAGESIZE
            pages.madvise(mmap.MADV_DONTNEED, low, offset + stop * row_bytes - low)

    with ThreadPoolExecutor(max_workers=_cores(), thread_name_prefix="transdnn-gather") as pool:
        list(pool.map(gather, range(len(starts))))


def _gather_read(
    X: h5py.Dataset | ad.abc.CSRDataset | ad.abc.CSCDataset,
    keep: np.ndarray,
    cols: np.ndarray,
    out: np.ndarray,
    path: Path,
    chunk: int,
) -> None:
    """Read a chunked (compressed) dense X or a sparse X chunk by chunk and gather each.

    A dense chunk is read into one reused float32 buffer: fresh 100+ MB blocks would each page-fault in
    anew. A sparse chunk is sliced to the selected genes before it is densified.
    """
    dense = isinstance(X, h5py.Dataset)
    buffer = np.empty((min(chunk, X.shape[0]), X.shape[1]), dtype=np.float32) if dense else None
    filled = 0
    for start in range(0, X.shape[0], chunk):
        stop = min(start + chunk, X.shape[0])
        sel = keep[start:stop]
        if not sel.any():
            continue
        block: np.ndarray | sp.spmatrix | sp.sparray
        if buffer is not None:
            block = buffer[: stop - start]
            X.read_direct(block, np.s_[start:stop], np.s_[0 : stop - start])
        else:
            block = X[start:stop]
        if not sel.all():
            block = block[sel]
        target = out[filled : filled + block.shape[0]]
        if isinstance(block, np.ndarray):
            _take(block, cols, target, path)
        else:
            target[:] = block[:, cols].toarray()
            _check_finite(target, path)
        filled += block.shape[0]


def _take(block: np.ndarray, cols: np.ndarray, target: np.ndarray, path: Path) -> None:
    # cols are in range by construction; numpy buffers `out` (a second copy) only in mode="raise"
    np.take(np.asarray(block, dtype=np.float32), cols, axis=1, out=target, mode="wrap")
    _check_finite(target, path)


def _check_finite(target: np.ndarray, path: Path) -> None:
    if not (np.isfinite(target.min()) and np.isfinite(target.max())):  # min and max propagate NaN
        raise InputError(f"{path}: X has NaN or inf values (expected finite expression values)")


def _cores() -> int:
    return min(usable_cpus(), _MAX_GATHER_THREADS)


@dataclass(frozen=True)
class _Labels:
    """What a training h5ad's obs says: the labelled rows, their regions and samples."""

    rows: np.ndarray
    labels: np.ndarray
    regions: list[str]
    row_sample: np.ndarray
    sample_region: np.ndarray


def load_training_set(path: Path, genes: GeneList, min_samples: int = SPLIT_MIN_SAMPLES) -> TrainingSet:
    """Load a training h5ad: drop `other` rows, parse `{region}_{sampleK}_{cell}` ids, select genes.

    A held-out test set (the same layout, never split) may have `min_samples=1`."""
    with _backed(path) as adata:
        obs = _training_labels(adata, path, min_samples)
        X = _select_genes(adata, obs.rows, genes, path)
    return TrainingSet(
        path=path,
        X=X,
        labels=obs.labels,
        regions=obs.regions,
        row_sample=obs.row_sample,
        sample_region=obs.sample_region,
        genes=genes.genes,
    )


def check_units(path: Path, n_genes: int, n_regions: int, model: ModelSettings) -> tuple[int, int]:
    """The model's input and output sizes come from the data (genes, regions); where params.yaml sets
    them they must agree."""
    for key, expected, actual in (
        ("input_units", model.input_units, n_genes),
        ("output_units", model.output_units, n_regions),
    ):
        if expected is not None and expected != actual:
            raise InputError(f"{path}: data give {key}={actual} but params set model.{key}={expected} (expected them to agree)")
    return n_genes, n_regions


def check_training_file(path: Path, genes: GeneList, homology: Homology, model: ModelSettings) -> None:
    """Everything `load_training_set`, `check_training_regions` and `check_units` check that needs no
    X: a job over many training sets checks them all before it trains the first, and a bad 57th set
    fails in seconds, not hours. (Values, NaN or inf, are checked as each set is read.)"""
    with _backed(path) as adata:
        obs = _training_labels(adata, path, SPLIT_MIN_SAMPLES)
        _gene_positions(adata, genes, path)
    _check_regions(obs.regions, path, homology)
    check_units(path, len(genes.genes), len(obs.regions), model)


def _training_labels(adata: ad.AnnData, path: Path, min_samples: int) -> _Labels:
    ids = _region_ids(adata, path)
    parts = ids.str.split("_", n=2, expand=True).reindex(columns=range(3))
    region = parts[0]
    keep = (region != UNLABELLED).to_numpy()
    if not keep.any():
        raise InputError(f"{path}: obs['region_index'] has only '{UNLABELLED}' rows (expected labelled regions)")
    sample_tok = parts[1][keep]
    bad = ~sample_tok.str.fullmatch(r"sample\d+", na=False)
    if bad.any():
        raise InputError(
            f"{path}: obs['region_index'] ids without a sampleK token, e.g. {_examples(ids[keep][bad].tolist())} "
            "(expected '{region}_{sampleK}_{cell}')"
        )
    rows = np.flatnonzero(keep)
    region_kept = region[keep].to_numpy()
    sample_key = region_kept + "_" + sample_tok.to_numpy()
    regions, labels = np.unique(region_kept, return_inverse=True)
    samples, row_sample = np.unique(sample_key, return_inverse=True)
    sample_region = np.empty(len(samples), dtype=np.int64)
    sample_region[row_sample] = labels
    per_region = np.bincount(sample_region, minlength=len(regions))
    thin = regions[per_region < min_samples]
    if len(thin):
        raise InputError(
            f"{path}: obs['region_index'] regions with fewer than {min_samples} samples: {_examples(thin.tolist())} "
            f"(expected at least {min_samples} samples per region so each side of the split sees it)"
        )
    return _Labels(rows, labels.astype(np.int64), regions.tolist(), row_sample.astype(np.int64), sample_region)


def load_transform_set(path: Path, genes: GeneList) -> TransformSet:
    """Load a human or mouse transform h5ad (`{region}_{sample}` ids) and average it per region."""
    with _backed(path) as adata:
        ids = _region_ids(adata, path)
        region = ids.str.split("_", n=1).str[0]
        keep = (region != UNLABELLED).to_numpy()
        if not keep.any():
            raise InputError(f"{path}: obs['region_index'] has no labelled rows (expected '{{region}}_{{sample}}' ids)")
        X = _select_genes(adata, np.flatnonzero(keep), genes, path)
    names, codes = np.unique(region[keep].to_numpy(), return_inverse=True)
    return TransformSet(path=path, regions=names.tolist(), means=region_means(X, codes, len(names)))


def region_means(X: np.ndarray, codes: np.ndarray, n_regions: int) -> np.ndarray:
    """Average rows per region code, in float64, one region's rows at a time (every code has rows).

    `np.add.at` did it in one unbuffered pass that took 10 s for a 50k-row transform set (every `train`
    and `embed` reads both sets); one region at a time takes 0.4 s."""
    means = np.empty((n_regions, X.shape[1]), dtype=np.float32)
    for code in range(n_regions):
        means[code] = X[codes == code].mean(axis=0, dtype=np.float64)
    return means


@dataclass(frozen=True)
class PartitionInputs:
    """The transform sets, gene list and homology of one partition, checked against each other."""

    genes: GeneList
    human: TransformSet
    mouse: TransformSet
    homology: Homology


def load_partition_inputs(human: Path, mouse: Path, genes: Path, homology: Path) -> PartitionInputs:
    gene_list = read_gene_list(genes)
    hom = read_homology(homology)
    h = load_transform_set(human, gene_list)
    m = load_transform_set(mouse, gene_list)
    for side, names, tset in (("human_region", hom.human, h), ("mouse_region", hom.mouse, m)):
        absent = sorted(set(names) - set(tset.regions))
        if len(absent) == len(set(names)):
            raise InputError(
                f"{homology}: no {side} is a region of {tset.path} "
                f"(expected the {side.split('_')[0]} transform set; got regions {_examples(tset.regions)})"
            )
        if absent:
            raise InputError(f"{homology}: {side} {_examples(absent)} absent from {tset.path} (expected every pair's region)")
    return PartitionInputs(gene_list, h, m, hom)


def load_inputs(data: DataPaths) -> PartitionInputs:
    """The partition's shared inputs as params.yaml names them."""
    return load_partition_inputs(data.human, data.mouse, data.genes, data.homology)


def check_training_regions(train: TrainingSet, homology: Homology) -> None:
    """The human side of every homologous pair must be a training label."""
    _check_regions(train.regions, train.path, homology)


def _check_regions(regions: list[str], path: Path, homology: Homology) -> None:
    absent = sorted(set(homology.human) - set(regions))
    if absent:
        raise InputError(
            f"{homology.path}: human_region {_examples(absent)} absent from the regions of {path} (expected training labels)"
        )
