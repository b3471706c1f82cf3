"""The recurrent state of a Mamba layer, and the checkpoints that let a recurrent cache reuse a prefix.

A Mamba layer carries two tensors from one token to the next, for each sequence of a batch:
- the conv state: the last kernel - 1 inputs of its causal depthwise conv (as llama.cpp and vLLM keep it);
- the SSM state: (inner, state) for Mamba-1, (heads, head_dim, state) for Mamba-2.
Both stay float32 whatever the model's dtype: the SSM state is a running sum over the whole sequence, and
rounding it to 16 bits at every token drifts visibly over long generations.

Unlike keys and values, a recurrent state cannot be cut back to an earlier position. So the cache keeps a
small ring of checkpoints (the state of every layer after a prompt and after an answer, with the tokens that
led there); the next chat turn restores the newest one that its prompt starts with and runs only the rest.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import torch

CHECKPOINTS = 4  # states remembered per cache: the last two turns' prompt and answer ends


class StateStore:
    """One Mamba layer's conv and SSM state for a batch of sequences, float32, preallocated."""

    def __init__(self, batch: int, conv_channels: int, conv_kernel: int, ssm_shape: Sequence[int],
                 device: torch.device | str):
        self.conv = torch.zeros(batch, conv_channels, conv_kernel - 1, dtype=torch.float32, device=device)
        self.ssm = torch.zeros(batch, *ssm_shape, dtype=torch.float32, device=device)

    def write(self, conv: torch.Tensor, ssm: torch.Tensor) -> None:
        """Replace the state by the one after the tokens just run."""
        self.conv.copy_(conv)
        self.ssm.copy_(ssm)

    def snapshot(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A copy of the state (for a checkpoint)."""
        return self.conv.clone(), self.ssm.clone()

    def restore(self, snapshot: tuple[torch.Tensor, torch.Tensor]) -> None:
        """Go back to a snapshot."""
        self.write(*snapshot)

    def clear(self) -> None:
        """The state before any token."""
        self.conv.zero_()
        self.ssm.zero_()

    def nbytes(self) -> int:
        """Memory held by the live state."""
        return self.conv.nbytes + self.ssm.nbytes


@dataclass(frozen=True)
class Checkpoint:
    """Every recurrent layer's state after `tokens`."""

    tokens: tuple[int, ...]
    states: tuple[tuple[torch.Tensor, torch.Tensor], ...]


class CheckpointRing:
    """The newest few checkpoints of a cache's recurrent layers."""

    def __init__(self, size: int = CHECKPOINTS):
        self.ring: deque[Checkpoint] = deque(maxlen=size)

    def save(self, tokens: Sequence[int], stores: Sequence[StateStore]) -> None:
        """Remember the stores' state after `tokens` (nothing new if the newest checkpoint is the same point)."""
        tokens = tuple(tokens)
        if not tokens or (self.ring and self.ring[-1].tokens == tokens):
            return
        self.ring.append(Checkpoint(tokens, tuple(store.snapshot() for store in stores)))

    def newest_prefix_of(self, token_ids: Sequence[int], longest: int) -> Checkpoint | None:
        """The newest checkpoint of at most `longest` tokens that `token_ids` starts with."""
        for checkpoint in reversed(self.ring):
            size = len(checkpoint.tokens)
            if size <= longest and tuple(token_ids[:size]) == checkpoint.tokens:
                return checkpoint
        return None

    def nbytes(self) -> int:
        """Memory held by the saved states."""
        return sum(t.nbytes for c in self.ring for state in c.states for t in state)

    def clear(self) -> None:
        """Forget every checkpoint."""
        self.ring.clear()
