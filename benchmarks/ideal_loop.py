"""The hardware's ceiling for this model: all replicates as one batched MLP on in-memory tensors,
training passes only (no validation, no homology rank, no checkpoints), the same number of steps per
epoch as transdnn's split gives, in fp32 or under bf16 autocast, on the GPU when there is one.
Prints one JSON line."""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from transdnn.hardware import reuse_freed_memory
from transdnn.model import StackedMLP, seeds_for


def main() -> None:
    ap = argparse.ArgumentParser()
    for name in ("rows", "genes", "classes", "replicates", "epochs", "batch", "steps"):
        ap.add_argument(f"--{name}", type=int, required=True)
    ap.add_argument("--hidden", type=int, default=500)
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    a = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    R, B = a.replicates, a.batch
    X = torch.randn(a.rows, a.genes, device=device)
    Y = torch.randint(0, a.classes, (R, a.rows), device=device)
    model = StackedMLP(R, a.genes, [a.hidden] * 3, a.classes, 0.1, "unit")
    model.reset_parameters(seeds_for(0, R, "ideal"))
    model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=6e-5, weight_decay=1e-6, fused=True)
    buffer = torch.empty(R * B, a.genes, device=device)
    rows = torch.arange(R, device=device)[:, None]
    start = time.perf_counter()
    with reuse_freed_memory(device):  # as transdnn's epochs do
        for _ in range(a.epochs):
            order = torch.stack([torch.randperm(a.rows)[: a.steps * B] for _ in range(R)]).view(R, a.steps, B).to(device)
            for s in range(a.steps):
                idx = order[:, s]
                torch.index_select(X, 0, idx.reshape(-1), out=buffer)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=a.precision == "bf16"):
                    logits, _ = model(buffer.view(R, B, a.genes))
                loss = F.cross_entropy(logits.float().transpose(1, 2), Y[rows, idx], reduction="none").mean(dim=1).sum()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    print(json.dumps({"wall": time.perf_counter() - start, "device": str(device)}))


if __name__ == "__main__":
    main()
