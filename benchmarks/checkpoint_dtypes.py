"""What each `train.checkpoint_dtype` costs in bytes and moves in the embeddings, against a float32 model.

    transdnn synth && sed -i 's/checkpoint_dtype: float16/checkpoint_dtype: float32/' params.yaml
    transdnn train cortex --no-track
    python benchmarks/checkpoint_dtypes.py cortex

Encodes the stored float32 weights of the first training set's chosen checkpoint as each dtype, saves
them as `transdnn train` would, and embeds the partition's transform sets with each: file size, the
largest change of an embedding correlation, the replicates' pair ranks and the consensus's pair ranks
that moved, and the homology rank mean. The replicates' own spread of each correlation is printed beside.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from transdnn.checkpoints import RunLayout, load_model, save_model
from transdnn.data import load_inputs
from transdnn.embed import embed_inputs
from transdnn.homology import pair_ranks
from transdnn.settings import load_settings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("partition", choices=["cortex", "subcortex"])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = parser.parse_args()
    part = getattr(load_settings(args.params), args.partition)
    layout = RunLayout.for_training_file(part.out, part.data.train_paths[0])
    full = load_model(layout, part.embed.checkpoint)
    if full.state["weights.0"].dtype != torch.float32:
        raise SystemExit(
            f"{layout.checkpoint(part.embed.checkpoint)}: weights in {full.state['weights.0'].dtype} (expected float32)"
        )
    inputs, device = load_inputs(part.data), torch.device("cpu")
    base = embed_inputs(full, inputs, device)
    h, m = base.pair_idx
    pairs, consensus = pair_ranks(torch.from_numpy(base.correlation), h, m), pair_ranks(torch.from_numpy(base.consensus), h, m)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in ("float32", "float16", "int8"):
            model = full.encoded(dtype)
            path = Path(tmp) / f"{dtype}.pt"
            save_model(path, Path(tmp) / "model.json", model)
            emb = embed_inputs(model, inputs, device)
            moved = (pair_ranks(torch.from_numpy(emb.correlation), h, m) - pairs).abs()
            moved_consensus = (pair_ranks(torch.from_numpy(emb.consensus), h, m) - consensus).abs()
            rows.append(
                {
                    "dtype": dtype,
                    "MiB": round(path.stat().st_size / 2**20, 1),
                    "max |change| of a correlation": f"{np.abs(emb.correlation - base.correlation).max():.1e}",
                    "pair ranks moved": f"{int((moved > 0).sum())} of {moved.numel()} (at most {float(moved.max()):g})",
                    "consensus pair ranks moved": f"{int((moved_consensus > 0).sum())} of {moved_consensus.numel()}",
                    "homology rank mean": round(float(emb.ranks.mean()), 3),
                }
            )
    spread = base.correlation.std(axis=0)
    print(f"{args.partition}, {len(base.replicates)} replicates; the replicates' standard deviation of a correlation:")
    print(f"mean {spread.mean():.3f}, smallest {spread.min():.3f}")
    print(pd.DataFrame(rows).to_string(index=False))


if __name__ == "__main__":
    main()
