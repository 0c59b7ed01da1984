"""The detached DNN: Linear-ReLU x3, dropout, Linear; R replicates stacked as one module.

Replicates share nothing but the tensors that hold them: every matmul is a batched `baddbmm` over the
replicate dimension, so ten models train in the time of one larger one.
"""

from __future__ import annotations

import hashlib
import math
from itertools import pairwise

import numpy as np
import torch
from torch import nn

from transdnn.choices import DropoutMode


class StackedMLP(nn.Module):
    """R independent MLPs; the embedding is the output of the last hidden ReLU (before dropout)."""

    def __init__(
        self,
        replicates: int,
        input_units: int,
        hidden_units: list[int],
        output_units: int,
        dropout: float,
        dropout_mode: DropoutMode,
    ) -> None:
        super().__init__()
        self.sizes = [input_units, *hidden_units, output_units]
        self.replicates = replicates
        self.dropout = dropout
        self.dropout_mode = dropout_mode
        self.weights = nn.ParameterList(
            nn.Parameter(torch.empty(replicates, fan_in, fan_out)) for fan_in, fan_out in pairwise(self.sizes)
        )
        self.biases = nn.ParameterList(nn.Parameter(torch.empty(replicates, 1, fan_out)) for fan_out in self.sizes[1:])

    def reset_parameters(self, seeds: list[int]) -> None:
        """nn.Linear's default init (uniform +-1/sqrt(fan_in)), one seeded generator per replicate."""
        with torch.no_grad():
            for r, seed in enumerate(seeds):
                gen = torch.Generator().manual_seed(seed)
                for w, b in zip(self.weights, self.biases, strict=True):
                    bound = 1 / math.sqrt(w.shape[1])
                    w[r].copy_(torch.empty(w.shape[1:]).uniform_(-bound, bound, generator=gen))
                    b[r].copy_(torch.empty(b.shape[1:]).uniform_(-bound, bound, generator=gen))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(R, N, G) -> (R, N, H_last): the region embedding."""
        for w, b in zip(self.weights[:-1], self.biases[:-1], strict=True):
            x = torch.relu(torch.baddbmm(b, x, w))
        return x

    def head(self, embedding: torch.Tensor) -> torch.Tensor:
        """Dropout then the output layer. 'row' mode reproduces the reference's Dropout1d on 2-D batches,
        which zeroes whole rows (samples) rather than units."""
        if self.training and self.dropout > 0:
            if self.dropout_mode == "row":
                keep = torch.rand((*embedding.shape[:-1], 1), device=embedding.device) >= self.dropout
                embedding = embedding * keep / (1 - self.dropout)
            else:
                keep, scale = unit_keep_mask(embedding.shape, self.dropout, embedding.device)
                embedding = embedding * keep.to(embedding.dtype).mul_(scale)
        return torch.baddbmm(self.biases[-1], embedding, self.weights[-1])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        embedding = self.embed(x)
        return self.head(embedding), embedding

    def replicate_state(self, r: int) -> dict[str, torch.Tensor]:
        """One replicate's weights, as plain tensors."""
        return {name: p[r].detach().clone() for name, p in self.named_parameters()}


def unit_keep_mask(shape: torch.Size, p: float, device: torch.device) -> tuple[torch.Tensor, float]:
    """Dropout's keep mask from 16-bit uniform draws, four per 64-bit random number: a quarter of the
    generator calls of `rand_like` (on CPU the generator, not the arithmetic, is dropout's cost).

    `p` is rounded up to the next 1/65536; a unit is kept with probability q = 1 - that, and the returned
    scale is 1/q, so the expected output equals the input exactly."""
    n = math.prod(shape)
    bits = torch.randint(-(2**63), 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64, device=device)
    dropped = math.ceil(p * 65536)
    keep = bits.view(torch.int16)[:n].view(shape) >= dropped - 32768
    return keep, 65536 / (65536 - dropped)


def seeds_for(seed: int, replicates: int, dataset: str) -> list[int]:
    """Independent, reproducible per-replicate seeds from the run seed and the data set's name.

    With the name in them, replicate r of each data set of a job starts from its own weights, split and
    batch order, as the published code's unseeded processes do: the 100 sets share one sample layout, and
    one seed for all would tie their 1,000 models together. A set keeps its seeds whatever else is listed.
    """
    name = int.from_bytes(hashlib.sha256(dataset.encode()).digest()[:8], "little")
    return [int(s.generate_state(1)[0]) for s in np.random.SeedSequence(seed, spawn_key=(name,)).spawn(replicates)]
