"""The hardware's ceiling for this model: all replicates as one batched MLP on in-memory tensors,
training passes only (no validation, no homology rank, no checkpoints). Prints one JSON line."""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from transdnn.model import StackedMLP, seeds_for


def main() -> None:
    ap = argparse.ArgumentParser()
    for name in ("rows", "genes", "classes", "replicates", "epochs", "batch"):
        ap.add_argument(f"--{name}", type=int, required=True)
    ap.add_argument("--hidden", type=int, default=500)
    a = ap.parse_args()
    R, B = a.replicates, a.batch
    X = torch.randn(a.rows, a.genes)
    Y = torch.randint(0, a.classes, (R, a.rows))
    model = StackedMLP(R, a.genes, [a.hidden] * 3, a.classes, 0.1, "unit")
    model.reset_parameters(seeds_for(0, R))
    opt = torch.optim.AdamW(model.parameters(), lr=6e-5, weight_decay=1e-6, fused=True)
    steps = int(a.rows * 0.9) // B
    buffer = torch.empty(R * B, a.genes)
    rows = torch.arange(R)[:, None]
    start = time.perf_counter()
    for _ in range(a.epochs):
        order = torch.stack([torch.randperm(a.rows)[: steps * B] for _ in range(R)]).view(R, steps, B)
        for s in range(steps):
            idx = order[:, s]
            torch.index_select(X, 0, idx.reshape(-1), out=buffer)
            logits, _ = model(buffer.view(R, B, a.genes))
            loss = F.cross_entropy(logits.transpose(1, 2), Y[rows, idx], reduction="none").mean(dim=1).sum()
            opt.zero_grad(set_to_none=False)
            loss.backward()
            opt.step()
    print(json.dumps({"wall": time.perf_counter() - start}))


if __name__ == "__main__":
    main()
