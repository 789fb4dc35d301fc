"""Wrapping the plain model for training: the loss forward, Liger kernels, activation
checkpointing, the (fused) optimizer, the DeepSpeed engine and compile."""

from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING, Callable, NamedTuple, Optional, Union

import torch
import torch.nn.functional as F
from torch.optim.lr_scheduler import LambdaLR

from zeroforge.data.boundaries import IGNORE_INDEX, DocumentBoundaries
from zeroforge.trainer.config import Compile, ConfigError, DeepSpeedConfig, ModelConfig, OptimConfig, TrainConfig
from zeroforge.trainer.deepspeed_config import deepspeed_config
from zeroforge.trainer.faults import FaultGuard, SkippableAdamW
from zeroforge.trainer.fp8 import apply_fp8
from zeroforge.trainer.loss import install_loss, installed_loss, resolve_loss
from zeroforge.trainer.moe import accept_string_keys_in_output_recorders, autoep_section, autoep_serves, mark_leaf_blocks
from zeroforge.trainer.partitioned import full_shape, zero3_startup
from zeroforge.trainer.routing import Routing, router_aux_loss_coef, routes_tokens, routing
from zeroforge.trainer.schedule import lr_factor
from zeroforge.trainer.sequence_parallel import SequenceSlices
from zeroforge.trainer.tiled_mlp import tile_mlps
from zeroforge.trainer.topology import Topology

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine
    from transformers import PreTrainedModel

log = logging.getLogger("zeroforge")


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Only matrices decay; biases and norm scales (1-d) do not (by their full shape: a ZeRO-3
    partitioned parameter is flat)."""
    decay = [p for p in model.parameters() if p.requires_grad and len(full_shape(p)) >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and len(full_shape(p)) < 2]
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


class _KnownOptimizer(logging.Filter):
    """DeepSpeed warns about every optimizer class not on its list; ours is torch's AdamW with a skip flag."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "untested optimizer" not in record.getMessage()


_KNOWN_OPTIMIZER = _KnownOptimizer()


def fused_adamw(optim: OptimConfig, topology: Topology) -> bool:
    """optim.fused, or where it is null: the fused kernel on CUDA only (on the CPU torch's
    default, foreach, is what the tests and the CPU figures have always run)."""
    return topology.device == "cuda" if optim.fused is None else bool(optim.fused)


def apply_liger_kernels(model: torch.nn.Module) -> None:
    """Liger's RMSNorm, SwiGLU and RoPE in this model instance (validate() checked that
    liger_kernel is installed, CUDA present and the model type supported). Its own loss patch
    stays off: train.loss=liger goes through the output layer like the chunked loss."""
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    _apply_liger_kernel_to_instance(
        model=model,
        rope=True,
        rms_norm=True,
        swiglu=True,
        cross_entropy=False,
        fused_linear_cross_entropy=False,
    )


def compile_blocks(model: PreTrainedModel) -> None:
    """model.compile=regional: each decoder block compiled in place (module.compile() keeps the
    module and its parameter names); the blocks share one compiled graph."""
    layers = getattr(model.get_decoder(), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise ConfigError(
            f"model.compile=regional compiles the decoder's blocks (`get_decoder().layers`), which "
            f"{type(model).__name__} does not have; use model.compile=full or off"
        )
    if model.is_gradient_checkpointing:
        # transformers' checkpointed blocks set and reset a context variable in their forward
        # (the kernels package's per-model function table): a side effect dynamo refuses inside
        # a checkpoint, so without this every block would fall back to eager. Not replaying that
        # set-and-reset in the backward's recompute changes nothing.
        torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True
    for block in layers:
        block.compile()


def build_engine(
    model: PreTrainedModel,
    *,
    model_config: ModelConfig,
    train: TrainConfig,
    optim: OptimConfig,
    deepspeed: DeepSpeedConfig,
    topology: Topology,
    sequence: Optional[SequenceSlices] = None,
    load_universal: bool = False,
) -> DeepSpeedEngine:
    """The plain `model` wrapped for training: kernels (and FP8's linear layers), loss, checkpointing, the optimizer and
    schedule, DeepSpeed's engine on the generated config (with the sequence-parallel groups of
    `sequence`, and AutoEP's expert-parallel MoE blocks where parallel.expert > 1), then compile."""
    import deepspeed as ds
    from deepspeed.moe.utils import configure_moe_param_groups
    from deepspeed.utils import logger as ds_logger

    ds_logger.addFilter(_KNOWN_OPTIMIZER)  # added once: the same filter object is not added twice

    if model_config.liger_kernels:
        apply_liger_kernels(model)
    if model_config.tiled_mlp:
        log.info("model.tiled_mlp: %d MLPs computed a slice of the sequence at a time", tile_mlps(model))
    if topology.precision == "fp8":
        apply_fp8(model, train.fp8_recipe, topology.device, compiled=Compile(model_config.compile) != Compile.off)
    loss = resolve_loss(train.loss, model_config.model_type)
    install_loss(model, loss, train.loss_chunk_tokens)
    if model_config.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if hasattr(model, "config"):
        model.config.use_cache = False
    if deepspeed.stage == 3:
        blocks = mark_leaf_blocks(model)
        if blocks:
            log.info("ZeRO-3 gathers each MoE block whole (leaf modules: %s)", ", ".join(blocks))
    expert_parallel = None
    if autoep_serves(model.config):
        accept_string_keys_in_output_recorders()
        expert_parallel = autoep_section(model.config, topology.expert)
    factor = lr_factor(optim, train.steps)
    groups = param_groups(model, optim.weight_decay)
    # With ZeRO-Offload DeepSpeed builds its CPU Adam from the generated config instead.
    fused = fused_adamw(optim, topology)

    def adamw(groups: list[dict]) -> SkippableAdamW:
        return SkippableAdamW(
            groups, lr=optim.lr, betas=(optim.betas[0], optim.betas[1]), eps=optim.eps, fused=fused
        )  # validate() checked there are two betas

    optimizer: Union[None, SkippableAdamW, Callable[[list[dict]], SkippableAdamW]]
    if deepspeed.offload_optimizer:
        optimizer = None
    elif expert_parallel is not None:
        # AutoEP replaces the MoE blocks' parameters inside initialize(), and DeepSpeed's ZeRO
        # wants the experts in groups of their own ("moe", split by group name): it builds the
        # optimizer from the replaced parameters through this callable.
        optimizer = lambda replaced: adamw(  # noqa: E731
            configure_moe_param_groups([{**group, "name": name} for name, group in zip(("decay", "no_decay"), replaced)])
        )
    else:
        optimizer = adamw(groups)
    with zero3_startup() if deepspeed.stage == 3 else contextlib.nullcontext():
        engine, _, _, _ = ds.initialize(
            model=model,
            optimizer=optimizer,
            model_parameters=None if isinstance(optimizer, SkippableAdamW) else groups,
            config=deepspeed_config(
                optim=optim, deepspeed=deepspeed, topology=topology, load_universal=load_universal, expert_parallel=expert_parallel
            ),
            lr_scheduler=lambda optimizer: LambdaLR(optimizer, factor),
            mpu=None if sequence is None else sequence.mpu,
        )
    compile_mode = Compile(model_config.compile)
    # Both compile in place, so parameter names (and checkpoints) carry no `_orig_mod.` prefix.
    if compile_mode == Compile.full:
        engine.compile()
    elif compile_mode == Compile.regional:
        compile_blocks(engine.module)
        if deepspeed.stage == 3:
            log.warning(
                "model.compile=regional under ZeRO-3: DeepSpeed's parameter-gathering hooks break the compiled "
                "graphs (it trains as eager does, with little of the compiled speed); ZeRO 0-2 compile without breaks"
            )
    log.info(
        "loss %s%s | AdamW %s | compile %s | attention %s%s",
        loss,
        f" ({train.loss_chunk_tokens} tokens a chunk)" if loss == "chunked" else "",
        "DeepSpeed's CPU Adam (offload)" if optimizer is None else "fused" if fused else "foreach/for-loop",
        compile_mode.value,
        model_config.attn_implementation,
        " | Liger kernels" if model_config.liger_kernels else "",
    )
    return engine


class Losses(NamedTuple):
    """One forward's mean next-token loss, and for a mixture of experts its routing (the
    load-balancing loss and the tokens each expert received)."""

    lm: torch.Tensor
    routing: Optional[Routing]


def forward_losses(
    model: torch.nn.Module,
    tokens: torch.Tensor,
    boundaries: Optional[DocumentBoundaries] = None,
    sequence: Optional[SequenceSlices] = None,
    with_routing: bool = True,
) -> Losses:
    """The losses of [batch, seq_len + 1] windows: inputs tokens[:, :-1], targets tokens[:, 1:].

    With boundaries, positions restart per document and/or the pair after each EOS is left out.
    With sequence parallelism this rank computes its slice of every window, and returns its
    share of the group's mean loss. A model (or engine) that build_engine gave the chunked or
    Liger loss computes it in its own forward (trainer/loss.py); any other model returns logits
    and takes the plain loss here. A mixture of experts also hands out its router logits.
    """
    inputs = tokens[:, :-1]
    targets = tokens[:, 1:] if boundaries is None else boundaries.targets(tokens)
    position_ids = None if boundaries is None else boundaries.position_ids(inputs)
    if sequence is not None:
        # The whole window's positions, sliced: each slice knows where in the sequence it lies.
        if position_ids is None:
            position_ids = torch.arange(inputs.shape[1], device=inputs.device).expand_as(inputs)
        inputs, targets, position_ids = sequence.slice(inputs), sequence.slice(targets), sequence.slice(position_ids)
    routed = with_routing and routes_tokens(model)
    router = {"output_router_logits": True} if routed else {}
    if installed_loss(model) != "plain":
        loss, router_logits = model(input_ids=inputs, position_ids=position_ids, loss_targets=targets, **router)
    else:
        out = model(input_ids=inputs, position_ids=position_ids, **router)
        loss = F.cross_entropy(out.logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)
        router_logits = getattr(out, "router_logits", None)
    return Losses(loss if sequence is None else sequence.loss_share(loss, targets), routing(model, router_logits) if routed else None)


def causal_lm_loss(
    model: torch.nn.Module,
    tokens: torch.Tensor,
    boundaries: Optional[DocumentBoundaries] = None,
    sequence: Optional[SequenceSlices] = None,
) -> torch.Tensor:
    """Mean next-token loss of [batch, seq_len + 1] windows (forward_losses without the router's
    logits: evaluation does not train the router)."""
    return forward_losses(model, tokens, boundaries, sequence, with_routing=False).lm


def _grad_norm(model: torch.nn.Module) -> Optional[torch.Tensor]:
    grads = [p.grad.detach().float().norm() for p in model.parameters() if p.grad is not None]
    return torch.stack(grads).norm() if grads else None


class StepResult(NamedTuple):
    """One optimizer step: this rank's mean loss and the gradient norm (tensors, so that a GPU is
    not synchronised on steps that log nothing), the learning rate it used, whether the update
    was skipped (trainer/faults.py), and for a mixture of experts the mean load-balancing loss and
    the tokens each expert received."""

    loss: torch.Tensor
    grad_norm: Optional[torch.Tensor]
    lr: float
    skipped: bool
    aux_loss: Optional[torch.Tensor] = None
    expert_tokens: Optional[torch.Tensor] = None


def train_step(
    engine: DeepSpeedEngine,
    micro_batches: list[torch.Tensor],
    device: str,
    measure_grad_norm: bool,
    guard: FaultGuard,
    step: int,
    boundaries: Optional[DocumentBoundaries] = None,
    sequence: Optional[SequenceSlices] = None,
) -> StepResult:
    """One optimizer step over this rank's micro-batches (with sequence parallelism, the loss is
    its group's, the same on every rank of the group)."""
    engine.train()
    lr = engine.get_lr()[0]  # DeepSpeed advances the scheduler inside the last engine.step()
    total = torch.zeros((), device=device)
    aux_total, expert_tokens = None, None
    norm = None
    skipped_before = engine.skipped_steps
    coef = router_aux_loss_coef(engine)
    for i, batch in enumerate(micro_batches):
        loss, routed = forward_losses(engine, batch.to(device, non_blocking=True), boundaries, sequence)
        objective = loss if routed is None else loss + coef * routed.aux_loss
        engine.backward(objective if sequence is None else objective * sequence.backward_scale)
        total += loss.detach() if sequence is None else sequence.group_sum(loss)
        if routed is not None:
            aux_total = routed.aux_loss.detach() if aux_total is None else aux_total + routed.aux_loss.detach()
            expert_tokens = routed.expert_tokens if expert_tokens is None else expert_tokens + routed.expert_tokens
        last = i == len(micro_batches) - 1
        if last and (measure_grad_norm or guard.checks_grad_norm) and engine.zero_optimization_stage() == 0:
            # Without ZeRO, DeepSpeed clips but does not keep the norm; gradients are already
            # averaged across ranks here, so this is the same number ZeRO 1-3 report.
            norm = _grad_norm(engine.module)
        if last and guard.judges_before_update:
            guard.before_update(total / len(micro_batches), norm)
        engine.step()
    reported = engine.get_global_grad_norm()
    if reported is not None:
        norm = torch.as_tensor(reported)
    skipped = guard.after_update(step, skipped_by_deepspeed=engine.skipped_steps > skipped_before)
    aux = None if aux_total is None else aux_total / len(micro_batches)
    return StepResult(total / len(micro_batches), norm, lr, skipped, aux, expert_tokens)


@torch.no_grad()
def validation_loss(model: torch.nn.Module, batches: list[torch.Tensor], device: str) -> float:
    """Mean token loss over fixed held-out windows (every window has the same number of tokens)."""
    model.eval()
    total, count = 0.0, 0
    for batch in batches:
        loss = causal_lm_loss(model, batch.to(device))
        n = batch[:, 1:].numel()
        total += loss.item() * n
        count += n
    return total / count
