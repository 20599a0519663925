"""Many aligners in one batch: a bank of K aligners of one configuration, row b of a batch reading aligner
rows[b]; to serve many users' aligners, or to compare many aligners, in one forward or one generation.

The math is the aligner's (layer.py) with a batch axis on the tokens, keys, values and gates: each row's prefix
is computed from its own tokens, so a batch over K different aligners costs what one shared aligner does
(benchmarks/RESULTS.md). `aligner.generate(model, prompts, aligners=[...])` builds one for its call.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from aligner.model import Aligner, AlignerHooks


class AlignerBank(AlignerHooks):
    """K aligners stacked, for inference: tokens (K, N, d_model), or (K, n_active, N, d_model) when not shared,
    and gates (K, n_active, H). Attached like an aligner; `selected(rows)` says which aligner each row reads.
    Its hook points carry the batch axis first: `hook_tokens` (B, N, d_model) or (B, n_active, N, d_model),
    `hook_k`/`hook_v` (B, N, H_kv, d_head), `hook_gate` (B, H); the others keep the aligner's shapes."""

    def __init__(self, aligners: Sequence[Aligner]) -> None:
        if not aligners:
            raise ValueError("a bank needs at least one aligner")
        first = aligners[0]
        for j, other in enumerate(aligners):
            if (other.config, other.shape) != (first.config, first.shape):
                raise ValueError(
                    f"aligners[{j}] is {other.config} on {other.shape}, aligners[0] {first.config} on "
                    f"{first.shape}: a bank holds aligners of one configuration"
                )
        super().__init__(first.config, first.shape, first.base_model)
        self.register_buffer("tokens", torch.stack([a.tokens.detach() for a in aligners]))
        self.register_buffer("gates", torch.stack([a.gates.detach() for a in aligners]))
        self.rows: torch.Tensor | None = None  # (B,) the aligner each row of the batch reads, set by selected()

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def save(self, path: str | Path, **provenance_extra: Any) -> Path:
        raise TypeError("a bank is made of saved aligners, AlignerBank([Aligner.load(path), ...]): save each aligner")

    @contextlib.contextmanager
    def selected(self, rows: Sequence[int] | torch.Tensor) -> Iterator["AlignerBank"]:
        """Inside, row b of every batch reads aligner rows[b]; the batches must have len(rows) rows."""
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.tokens.device)
        if rows.ndim != 1 or not len(rows) or not (0 <= int(rows.min()) and int(rows.max()) < len(self)):
            raise IndexError(
                f"rows must be a non-empty list of aligner indices in [0, {len(self)}), got {rows.tolist()}"
            )
        previous, self.rows = self.rows, rows
        try:
            yield self
        finally:
            self.rows = previous

    def _tokens_and_gates(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.rows is None:
            raise RuntimeError("say which aligner each row reads first: `with bank.selected(rows):`")
        if len(self.rows) != batch_size:
            raise ValueError(f"the batch has {batch_size} rows, but bank.selected() was given {len(self.rows)}")
        tokens = self.hook_tokens(self.tokens[self.rows])  # (B, N, d_model), or (B, n_active, N, d_model)
        # Layer axis first, as the aligner's own: layer i reads tokens[i] (when not shared) and gates[i].
        return (tokens if self.config.shared else tokens.transpose(0, 1)), self.gates[self.rows].transpose(0, 1)
