"""The training loss without the whole vocabulary's fp32 logits.

`causal_lm_loss` in engine.py takes the mean next-token cross-entropy. The plain way,
`F.cross_entropy(model(...).logits.float(), ...)`, holds [tokens, vocab] logits in the model's
dtype, their fp32 copy, the fp32 log-probabilities and, in the backward, their fp32 gradients:
at vocabulary 128,256 and 8,192 tokens that is 4 GiB per copy. The chunked loss (train.loss=
chunked, the default where it is exact) never holds more than one chunk of train.loss_chunk_tokens
tokens' logits: for each chunk it computes the fp32 logits, their loss, and at once their
gradients with respect to the chunk's hidden states and the output weight (as Liger's fused
linear cross-entropy does, in plain torch), so the backward only hands those on.

How it is wired so that every DeepSpeed hook fires (ZeRO-3 gathers a module's parameters in its
forward pre-hook, so a weight read outside its module's forward is an empty partition): the
plain model's *instance* gets a forward that, given `loss_targets`, runs the decoder and then
calls the output-embedding module ONCE with the hidden states and the targets; that module
instance's forward computes the loss with its (then gathered) weight; the model returns that loss
and, for a mixture of experts, its router logits (trainer/moe.py). Without `loss_targets`
both forwards are the class's own, so evaluation, generation and export see the plain model.
Nothing is wrapped: parameter names, state dicts and checkpoints are the plain model's.
"""

from __future__ import annotations

import functools
import logging
import types
from typing import TYPE_CHECKING, Optional

import torch
import torch.nn.functional as F

from zeroforge.data.boundaries import IGNORE_INDEX
from zeroforge.trainer.config import Loss

if TYPE_CHECKING:
    from transformers import PreTrainedModel

log = logging.getLogger("zeroforge")

# Model types whose causal-LM forward is exactly `lm_head(decoder(...).last_hidden_state)`
# (checked in their transformers modeling code): no logit scaling or soft-capping after the
# output layer, which the chunked loss would leave out. Others train with the plain loss.
LINEAR_HEAD_MODEL_TYPES = frozenset(
    {
        "llama",
        "mistral",
        "qwen2",
        "qwen3",
        "olmo",
        "olmo2",
        "olmo3",
        "phi3",
        "gemma",
        "starcoder2",
        "smollm3",
        "qwen2_moe",
        "qwen3_moe",
        "mixtral",
        "olmoe",
        "deepseek_v3",
    }
)


def resolve_loss(loss: Loss | str, model_type: str) -> str:
    """train.loss with `auto` decided: chunked where it is exact for the model type, else plain."""
    if loss == Loss.auto:  # a str Enum: equal to its value, as strings are
        return "chunked" if model_type in LINEAR_HEAD_MODEL_TYPES else "plain"
    return Loss(loss).value


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of `hidden @ weight.T` against targets, one chunk of rows at a time.

    The gradients are computed in the forward, chunk by chunk, and kept for the backward (which
    only scales them by the incoming gradient): that costs the hidden states' size plus the
    weight's, instead of all tokens' fp32 logits, and no second pass over the output layer.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_tokens: int) -> torch.Tensor:
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        loss, grad_hidden, grad_weight = _chunked_loss(hidden, weight, targets, chunk_tokens, need_hidden, need_weight)
        ctx.save_for_backward(grad_hidden, grad_weight)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        # In place: these buffers exist only to be handed on, once (no double backward).
        for grad in (grad_hidden, grad_weight):
            if grad is not None:
                _scale_(grad, grad_loss)
        return grad_hidden, grad_weight, None, None


def _scale_(grad: torch.Tensor, factor: torch.Tensor, rows: int = 8192) -> None:
    """grad *= factor, in fp32 and rounded once, as autograd scales the plain loss's fp32
    gradient before its cast (a 16-bit factor such as 1/3 for 3 accumulation steps would skew
    the whole gradient by its rounding); a few rows at a time, so no fp32 copy of it exists."""
    if grad.dtype == torch.float32:
        grad.mul_(factor)
        return
    for start in range(0, grad.shape[0], rows):
        part = grad[start : start + rows]
        part.copy_(part.float().mul_(factor))


def _chunked_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    chunk_tokens: int,
    need_hidden: bool,
    need_weight: bool,
) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(mean loss, d loss / d hidden, d loss / d weight); a gradient is None where not needed.

    Numerically the plain loss's steps: the chunk's logits in the model's dtype, cast to fp32,
    their log-sum-exp; the fp32 gradient (softmax minus one-hot, over the counted tokens) cast
    back to the model's dtype before the two matmuls, as autograd does through `.float()`. The
    weight's gradient is summed over the chunks in place, in the weight's dtype (as Liger does):
    exact in fp32; in bf16 each chunk's product is rounded into the sum (one rounding per chunk,
    where the plain loss rounds one product once), which keeps the output layer's gradient at
    its own size instead of an fp32 copy plus a product (3x the weight: 6 GiB at 70B).
    """
    valid = targets != IGNORE_INDEX
    count = valid.sum()
    safe_targets = targets.masked_fill(~valid, 0)  # gather needs an index; ignored rows count nothing
    # Scaled per token so that the sum over chunks is the mean; like F.cross_entropy, a batch with
    # nothing to count gives a NaN loss (0/0), while its gradients stay zero.
    scale = torch.where(valid, 1.0 / count.clamp(min=1).to(torch.float32), 0.0)
    loss_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
    grad_hidden = torch.empty_like(hidden) if need_hidden else None
    grad_weight = torch.zeros_like(weight) if need_weight else None
    rows = torch.arange(min(chunk_tokens, hidden.shape[0]), device=hidden.device)
    for start in range(0, hidden.shape[0], chunk_tokens):
        end = min(start + chunk_tokens, hidden.shape[0])
        h, t = hidden[start:end], safe_targets[start:end]
        logits = F.linear(h, weight).float()
        target_logit = logits.gather(1, t[:, None]).squeeze(1)
        top = logits.amax(dim=1, keepdim=True)
        probs = logits.sub_(top).exp_()  # in place: one fp32 chunk at a time
        total = probs.sum(dim=1, keepdim=True)
        lse = (top + total.log()).squeeze(1)
        loss_sum += torch.where(valid[start:end], lse - target_logit, 0.0).sum()
        if need_hidden or need_weight:
            probs.div_(total)
            probs[rows[: end - start], t] -= 1.0
            grad_logits = probs.mul_(scale[start:end, None]).to(hidden.dtype)
            if grad_hidden is not None:
                torch.mm(grad_logits, weight, out=grad_hidden[start:end])
            if grad_weight is not None:
                grad_weight.addmm_(grad_logits.t(), h)
            del grad_logits
        del logits, probs  # before the next chunk's logits exist, or two chunks would be alive
    return loss_sum / count, grad_hidden, grad_weight


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_tokens: int) -> torch.Tensor:
    """Mean next-token loss of `[..., hidden] @ weight.T` against `[...]` targets (IGNORE_INDEX
    left out), equal to `F.cross_entropy(F.linear(hidden, weight).float(), targets)`."""
    hidden, targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _ChunkedLinearCrossEntropy.apply(hidden, weight, targets, chunk_tokens)
    return _chunked_loss(hidden, weight, targets, chunk_tokens, False, False)[0]


def _liger_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

    return LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX)(weight, hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1))


def _output_forward(self: torch.nn.Linear, hidden: torch.Tensor, targets: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The output layer's instance forward: logits as ever, or with targets the loss itself."""
    if targets is None:
        return type(self).forward(self, hidden)
    if self.zeroforge_loss == "liger":
        return _liger_cross_entropy(hidden, self.weight, targets)
    return chunked_cross_entropy(hidden, self.weight, targets, self.zeroforge_loss_chunk_tokens)  # type: ignore[arg-type]  # set by install_loss


def install_loss(model: PreTrainedModel, loss: str, chunk_tokens: int) -> None:
    """Give this model instance (not its class) the loss forward described at the top; `plain`
    leaves it untouched. Bound methods, so a deep copy of the model binds to the copy."""
    if loss == "plain":
        return
    head = model.get_output_embeddings()
    if type(head) is not torch.nn.Linear or head.bias is not None:
        raise ValueError(f"train.loss={loss} needs a bias-free nn.Linear output layer; {type(model).__name__} has {head!r}")
    head.zeroforge_loss = loss
    head.zeroforge_loss_chunk_tokens = chunk_tokens
    head.forward = types.MethodType(_output_forward, head)
    plain_forward = type(model).forward

    # The class forward's signature stays visible (inspect follows __wrapped__): generation asks
    # it whether the model takes attention_mask, position_ids and logits_to_keep.
    @functools.wraps(plain_forward)
    def forward(self, *args, loss_targets: Optional[torch.Tensor] = None, **kwargs):
        if loss_targets is None:
            return plain_forward(self, *args, **kwargs)
        outputs = self.get_decoder()(*args, **kwargs)
        return self.get_output_embeddings()(outputs.last_hidden_state, loss_targets), getattr(outputs, "router_logits", None)

    forward.zeroforge_loss = loss
    model.forward = types.MethodType(forward, model)


def installed_loss(model: torch.nn.Module) -> str:
    """`chunked` or `liger` where install_loss gave the model (or the engine's module) its loss forward."""
    module = getattr(model, "module", model)
    return getattr(module.forward, "zeroforge_loss", "plain")
