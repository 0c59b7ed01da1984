"""Embedded default inputs: synthetic TransBrain-layout data at the real shapes with a planted homology.

The planted structure mimics why the DNN helps on the real data. Each human region has a latent
identity; a mouse region's identity is the mean of its homologous human regions' (plus noise), and
unpaired mouse regions get their own. A conserved gene program expresses the identity in both species.
On top, each species carries strong *divergent* regional programs on all genes; in the integrated
training set these are weak (the snRNA-seq half does not share them), so a model trained there learns
the conserved program, while raw expression correlations are swamped by the divergent programs.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from transdnn.atomic import write_csv, write_with
from transdnn.settings import SynthSettings

GENES = {"cortex": 4542, "subcortex": 5063}
EXTRA_GENES = 0.05  # share of unused genes in each h5ad, so gene selection is exercised
LATENT = 16
CONSERVED_SHARE = 0.3
CONSERVED_STRENGTH = 1.0
DIVERGENT_STRENGTH = 4.5
TRAIN_DIVERGENT_STRENGTH = 0.25
MOUSE_IDENTITY_NOISE = 0.35
SAMPLE_NOISE = 0.6
CELL_NOISE = 1.2
TRANSFORM_NOISE = 1.0


def atlas_regions(name: str) -> list[str]:
    """Region names shipped with the package (Brainnetome human, Allen CCF mouse)."""
    text = resources.files("transdnn.atlas").joinpath(f"{name}_regions.txt").read_text()
    return [line for line in text.splitlines() if line.strip()]


def atlas_homology(partition: str) -> pd.DataFrame:
    """The seed notebook's homologous pairs (41 cortex, 9 subcortex)."""
    with resources.as_file(resources.files("transdnn.atlas").joinpath(f"homology_{partition}.csv")) as path:
        return pd.read_csv(path, index_col=0)


@dataclass(frozen=True)
class SynthPaths:
    """Where `transdnn synth` writes one partition, in the reference file names."""

    root: Path
    partition: str

    @property
    def train_dir(self) -> Path:
        return self.root / self.partition / "integrated"

    def train(self, k: int) -> Path:
        return self.train_dir / f"Integrated_dataset_{k}.h5ad"

    @property
    def human(self) -> Path:
        return self.root / self.partition / f"Human_trans_data_{self.partition}.h5ad"

    @property
    def mouse(self) -> Path:
        return self.root / self.partition / f"Mouse_trans_data_{self.partition}.h5ad"

    @property
    def genes(self) -> Path:
        return self.root / self.partition / f"common_stable_genes_{self.partition}.csv"

    @property
    def homology(self) -> Path:
        return self.root / self.partition / f"homo_{self.partition}.csv"

    def data_section(self, datasets: int = 1) -> dict[str, object]:
        """The `data:` section of a partition in params.yaml that points at these files."""
        return {
            "train_dir": str(self.train_dir),
            "train": [self.train(k).name for k in range(datasets)],
            "human": str(self.human),
            "mouse": str(self.mouse),
            "genes": str(self.genes),
            "homology": str(self.homology),
        }


def _zscore(X: np.ndarray, chunk: int = 8192) -> np.ndarray:
    """Each data set arrives z-scored per gene on its own ("separately normalized"); in place, float32."""
    total = np.zeros(X.shape[1])
    total_sq = np.zeros(X.shape[1])
    for start in range(0, len(X), chunk):
        block = X[start : start + chunk].astype(np.float64)
        total += block.sum(axis=0)
        total_sq += (block * block).sum(axis=0)
    mean = total / len(X)
    sd = np.sqrt(np.maximum(total_sq / len(X) - mean * mean, 0))
    X -= mean.astype(np.float32)
    X /= np.where(sd > 0, sd, 1).astype(np.float32)
    return X


def _write_h5ad(path: Path, X: np.ndarray, ids: list[str], genes: list[str]) -> None:
    adata = ad.AnnData(
        X=X,
        obs=pd.DataFrame({"region_index": ids}, index=[str(i) for i in range(len(ids))]),
        var=pd.DataFrame({"Gene": genes}, index=genes),
    )
    write_with(path, lambda tmp: adata.write_h5ad(tmp))


class _World:
    """The latent biology of one partition: identities and gene programs for both species."""

    def __init__(self, partition: str, rng: np.random.Generator) -> None:
        self.human = atlas_regions(f"human_bn_{partition}")
        self.mouse = atlas_regions(f"mouse_{partition}")
        self.pairs = atlas_homology(partition)
        n_genes = GENES[partition]
        n_all = round(n_genes * (1 + EXTRA_GENES))
        names = np.array([f"G{partition[0].upper()}{i:05d}" for i in range(n_all)])
        self.all_genes = names[rng.permutation(n_all)].tolist()
        self.used = sorted(rng.choice(self.all_genes, size=n_genes, replace=False).tolist())
        z_h = rng.normal(size=(len(self.human), LATENT))
        z_m = rng.normal(size=(len(self.mouse), LATENT))
        h_pos = {r: i for i, r in enumerate(self.human)}
        for j, m in enumerate(self.mouse):
            partners = self.pairs.loc[self.pairs.mouse_region == m, "human_region"].map(h_pos).to_numpy()
            if len(partners):
                z_m[j] = z_h[partners].mean(axis=0) + MOUSE_IDENTITY_NOISE * rng.normal(size=LATENT)
        conserved = rng.random(n_all) < CONSERVED_SHARE
        loading = rng.normal(size=(LATENT, n_all)) * conserved / np.sqrt(LATENT)
        self.human_signal = CONSERVED_STRENGTH * z_h @ loading
        self.mouse_signal = CONSERVED_STRENGTH * z_m @ loading
        self.human_divergent = DIVERGENT_STRENGTH * rng.normal(size=(len(self.human), n_all))
        self.mouse_divergent = DIVERGENT_STRENGTH * rng.normal(size=(len(self.mouse), n_all))


def _training_set(world: _World, cfg: SynthSettings, rng: np.random.Generator) -> tuple[np.ndarray, list[str]]:
    """Integrated cells, generated region by region straight into one float32 matrix in shuffled order."""
    S, C = cfg.samples_per_region, cfg.cells_per_sample
    n_all = len(world.all_genes)
    ids = [f"{r}_sample{s}_{c}" for r in world.human for s in range(S) for c in range(C)]
    ids += [f"other_sample{i % S}_{i}" for i in range(cfg.other_rows)]
    position = rng.permutation(len(ids))
    X = np.empty((len(ids), n_all), dtype=np.float32)
    base = world.human_signal + TRAIN_DIVERGENT_STRENGTH / DIVERGENT_STRENGTH * world.human_divergent
    for h in range(len(world.human)):
        sample = base[h] + SAMPLE_NOISE * rng.normal(size=(S, 1, n_all))
        cells = sample + CELL_NOISE * rng.normal(size=(S, C, n_all))
        X[position[h * S * C : (h + 1) * S * C]] = cells.reshape(S * C, n_all)
    if cfg.other_rows:
        X[position[len(world.human) * S * C :]] = (SAMPLE_NOISE + CELL_NOISE) * rng.normal(size=(cfg.other_rows, n_all))
    ordered = [""] * len(ids)
    for i, p in enumerate(position):
        ordered[p] = ids[i]
    return _zscore(X), ordered


def _transform_set(regions: list[str], signal: np.ndarray, n: int, rng: np.random.Generator) -> tuple[np.ndarray, list[str]]:
    X = np.repeat(signal, n, axis=0) + TRANSFORM_NOISE * rng.normal(size=(len(regions) * n, signal.shape[1]))
    ids = [f"{r}_{k}" for r in regions for k in range(n)]
    return _zscore(X.astype(np.float32)), ids


def synthesize(cfg: SynthSettings, partitions: tuple[str, ...]) -> list[SynthPaths]:
    """Write training set(s), transform sets, gene list and homology for each partition."""
    written = []
    for p_index, partition in enumerate(partitions):
        rng = np.random.default_rng([cfg.seed, p_index])
        world = _World(partition, rng)
        paths = SynthPaths(Path(cfg.out), partition)
        for k in range(cfg.datasets):
            X, ids = _training_set(world, cfg, rng)
            _write_h5ad(paths.train(k), X, ids, world.all_genes)
        n = cfg.transform_samples_per_region
        X, ids = _transform_set(world.human, world.human_signal + world.human_divergent, n, rng)
        _write_h5ad(paths.human, X, ids, world.all_genes)
        X, ids = _transform_set(world.mouse, world.mouse_signal + world.mouse_divergent, n, rng)
        _write_h5ad(paths.mouse, X, ids, world.all_genes)
        write_csv(paths.genes, pd.DataFrame({"genes": world.used}), index=False)
        write_csv(paths.homology, world.pairs)
        written.append(paths)
    return written
