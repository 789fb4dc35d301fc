"""Document boundaries inside packed windows: position ids that restart per document, cu_seqlens
for flash-attention varlen kernels, and no loss on the pair that crosses from one document into
the next. Documents end with EOS, so boundaries are found from the tokens alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

IGNORE_INDEX = -100  # what F.cross_entropy leaves out by default


def document_position_ids(inputs: torch.Tensor, eos_id: int) -> torch.Tensor:
    """[batch, seq] positions counted from each document's first token (the one after an EOS)."""
    batch, seq = inputs.shape
    index = torch.arange(seq, device=inputs.device).expand(batch, seq)
    starts_document = torch.zeros_like(inputs, dtype=torch.bool)
    starts_document[:, 1:] = inputs[:, :-1] == eos_id
    start = torch.where(starts_document, index, torch.zeros_like(index)).cummax(dim=1).values
    return index - start


def cu_seqlens(position_ids: torch.Tensor) -> torch.Tensor:
    """Cumulative document lengths over the flattened batch (int32, from 0 to batch x seq), as
    flash_attn_varlen_func takes them; every row also starts a sequence."""
    flat = position_ids.flatten()
    starts = torch.nonzero(flat == 0).flatten()
    end = torch.tensor([flat.numel()], device=flat.device)
    return torch.cat([starts, end]).to(torch.int32)


@dataclass(frozen=True)
class DocumentBoundaries:
    eos_id: int
    reset_position_ids: bool = False
    mask_cross_document_loss: bool = False

    def position_ids(self, inputs: torch.Tensor) -> Optional[torch.Tensor]:
        return document_position_ids(inputs, self.eos_id) if self.reset_position_ids else None

    def targets(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens[:, 1:], with the target after each EOS ignored when masking is on."""
        targets = tokens[:, 1:]
        if not self.mask_cross_document_loss:
            return targets
        return targets.masked_fill(tokens[:, :-1] == self.eos_id, IGNORE_INDEX)
