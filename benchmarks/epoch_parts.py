"""Where one training's epochs go: the training pass and the per-epoch work beyond it (validation,
homology rank, bookkeeping), from transdnn's own accounting, for a few epochs of one training set.

With `--against SRC` it compares two checkouts side by side in one run: fresh processes in turns, this
checkout's `src` and SRC (e.g. a `git worktree` of an older commit), `--rounds` times each, so the
machine's drift falls on both alike. Prints one JSON line per process and, with `--against`, a table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BEYOND = ("validation", "homology_rank", "bookkeeping")


def measure(params: Path, partition: str, synth: Path | None, epochs: int, precision: str) -> dict[str, float]:
    """Train the partition's first training set for `epochs` epochs (no tracking, no resume states)."""
    import torch

    from transdnn.data import load_inputs, load_training_set
    from transdnn.settings import load_settings, override, override_paths
    from transdnn.synth import SynthPaths
    from transdnn.training import train

    part = load_settings(params).partition(partition)
    if synth is not None:
        p = SynthPaths(synth, partition)
        part = override_paths(part, train=p.train(0), human=p.human, mouse=p.mouse, genes=p.genes, homology=p.homology)
    part = override(part, "train", max_epochs=epochs, precision=precision)
    inputs = load_inputs(part.data)
    result = train(load_training_set(part.data.train_paths[0], inputs.genes), inputs, part, torch.device("cpu"))
    seconds = result.seconds
    return {**seconds, "beyond_share": sum(seconds[k] for k in BEYOND) / seconds["train_pass"]}


def compare(args: argparse.Namespace) -> None:
    """Alternate fresh processes of this checkout and of `args.against`; print each and a summary."""
    argv = [sys.executable, __file__, args.partition, "--params", str(args.params), "--epochs", str(args.epochs)]
    argv += ["--precision", args.precision] + (["--synth", str(args.synth)] if args.synth else [])
    shares: dict[str, list[float]] = {"this": [], "against": []}
    for _ in range(args.rounds):
        for label, src in (("against", args.against), ("this", REPO / "src")):
            env = {**os.environ, "PYTHONPATH": str(src)}
            line = subprocess.run(argv, env=env, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            print(f"{label} {line}", flush=True)
            shares[label].append(json.loads(line)["beyond_share"])
    for label, values in shares.items():
        print(f"{label:<8} per-epoch work beyond the pass: " + " / ".join(f"{100 * v:.2f} %" for v in values))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("partition", choices=["cortex", "subcortex"])
    ap.add_argument("--params", type=Path, default=REPO / "params.yaml")
    ap.add_argument("--synth", type=Path, help="a `transdnn synth` folder to train on instead of params' data")
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--against", type=Path, help="another checkout's src folder to compare with")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    if args.against is not None:
        compare(args)
        return
    print(json.dumps(measure(args.params, args.partition, args.synth, args.epochs, args.precision)))


if __name__ == "__main__":
    main()
