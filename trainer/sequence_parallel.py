"""Ulysses sequence parallelism (DeepSpeed's ALST) on the plain HF model.

The ranks of a group of parallel.sequence consecutive ranks read the same samples (topology's
dp_rank) and each computes one slice of every sequence; around attention, DeepSpeed's
UlyssesSPAttentionHF swaps slices for heads with an all-to-all, so that each rank attends over
the whole sequence with its share of the heads, in the model's own attention kernel.

What zeroforge adds around it is the slicing (inputs, targets and positions, the positions those
of the whole sequence, restarted per document where data.reset_position_ids says so), sdpa's
mask of packed documents over the whole sequence (flash attention finds the documents in the
positions itself), and the loss: each rank's share is the loss of its slice's tokens over the token count of the whole
group, so the shares sum to the unsplit mean, and DeepSpeed's gradient reduction (a sum over all
ranks divided by the data-parallel size) gives the unsplit gradient. DeepSpeed 0.19.8's ZeRO-3
reduce-scatter (its default) divides by all ranks instead, data- and sequence-parallel together
(stage3.py `__avg_scatter_grads`, unlike its all-reduce path and ZeRO 1-2): there the backward
runs on the share times parallel.sequence (`backward_scale`), and the 2-rank exactness test under
ZeRO-3 fails if DeepSpeed changes that.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from transformers import PreTrainedModel

from zeroforge.data.boundaries import IGNORE_INDEX
from zeroforge.trainer.topology import Topology


@dataclass(frozen=True)
class SequenceSlices:
    """This rank's place in its sequence-parallel group, and the groups DeepSpeed's engine takes
    (`mpu`, DeepSpeed's parallel_state_sp)."""

    group: Any
    rank: int
    size: int
    mpu: Any
    # What the loss share is multiplied by for the backward, so that DeepSpeed's gradient
    # reduction ends at the unsplit gradient (see the top of this file).
    backward_scale: float = 1.0

    def slice(self, tensor: torch.Tensor) -> torch.Tensor:
        """This rank's slice of a [batch, seq_len, ...] tensor."""
        chunk = tensor.shape[1] // self.size
        return tensor[:, chunk * self.rank : chunk * (self.rank + 1)]

    def loss_share(self, loss: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """This rank's part of the group's mean loss, from `loss`, the mean over its own slice's
        counted targets (a slice with none counts nothing, instead of its 0/0)."""
        count = (targets != IGNORE_INDEX).sum()
        total = count.clone()
        dist.all_reduce(total, group=self.group)
        return torch.where(count > 0, loss * count, 0.0) / total

    def group_sum(self, value: torch.Tensor) -> torch.Tensor:
        """The sum over the group (of the loss shares: the group's loss, which every rank reports)."""
        value = value.detach().clone()
        dist.all_reduce(value, group=self.group)
        return value


def _documents_masked(core: Callable[..., Any]) -> Callable[..., Any]:
    """sdpa as transformers runs it on packed documents without sequence parallelism: where the
    positions restart (data.reset_position_ids) it builds a mask that keeps each document to
    itself. Ulysses drops that mask (it was made for one slice) and passes the whole sequence's
    positions instead, so the mask is made here again, for the whole sequence."""
    from transformers.masking_utils import find_packed_sequence_indices

    def attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: Any, **kwargs: Any):
        position_ids = kwargs.get("position_ids")
        if attention_mask is None and position_ids is not None:
            documents = find_packed_sequence_indices(position_ids)
            if documents is not None:
                index = torch.arange(documents.shape[1], device=documents.device)
                causal = index[:, None] >= index[None, :]
                attention_mask = ((documents[:, :, None] == documents[:, None, :]) & causal)[:, None]
        return core(module, query, key, value, attention_mask, **kwargs)

    return attention


def sequence_parallel(model: PreTrainedModel, topology: Topology, stage: int) -> Optional[SequenceSlices]:
    """Route the model's attention through Ulysses for parallel.sequence > 1 (None at 1), on a
    joined process group. Evaluation and generation (the model in eval mode) bypass it: every
    rank then runs the whole sequence, as without sequence parallelism. `stage`: the ZeRO stage
    (validate() refuses ZeRO-3's all-reduce path, deepspeed.zero_extra.reduce_scatter=false)."""
    if topology.sequence == 1:
        return None
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if model.config._attn_implementation == "sdpa":
        # Ulysses takes the kernel registered under the model's implementation as its core.
        ALL_ATTENTION_FUNCTIONS["sdpa"] = _documents_masked(ALL_ATTENTION_FUNCTIONS["sdpa"])
    mpu = UlyssesSPAttentionHF.register_with_transformers(
        model_name_or_path=model,
        core_attn_implementation=model.config._attn_implementation,
        sequence_parallel_size=topology.sequence,
        micro_batch_size=topology.micro_batch_size,
        seq_length=topology.seq_len,
        seq_length_is_variable=False,
        disable_in_eval=True,
    )
    return SequenceSlices(
        group=mpu.get_sequence_parallel_group(),
        rank=topology.sequence_rank(dist.get_rank()),  # the layout DeepSpeed groups by, derived once
        size=topology.sequence,
        mpu=mpu,
        backward_scale=float(topology.sequence) if stage == 3 else 1.0,
    )
