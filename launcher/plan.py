"""The pre-flight plan: whether a job fits on its GPUs and how long it takes, before it is queued.

`zeroforge plan [overrides]` prints it; every launch path calls `check_fits(cfg, world_size)`,
which refuses a job that cannot fit (unless `launcher.force=true`) and names changes that would.

Memory per GPU follows what DeepSpeed allocates: the ZeRO paper's accounting (e-byte weights
and gradients, fp32 master weights and Adam m, v) plus the fp32 gradient copy the optimizer
steps on, as DeepSpeed's own estimators count it. For N parameters, data-parallel size D and
e bytes per element (2 in bf16, 4 in fp32):

| ZeRO | weights | gradients | fp32 master | Adam m, v | fp32 gradient copy at the step |
| ---- | ------- | --------- | ----------- | --------- | ------------------------------ |
| 0    | eN      | eN        | 4N in bf16  | 8N        | 4N in bf16                     |
| 1    | eN      | eN        | 4N / D      | 8N / D    | 4N / D                         |
| 2    | eN      | eN / D    | 4N / D      | 8N / D    | 4N / D                         |
| 3    | eN / D  | eN / D    | 4N / D      | 8N / D    | 4 min(N / D, sub_group_size)   |

ZeRO-3 also holds its largest layer gathered (weights and gradients); in fp32 its weight partition
serves as the master (zeroforge fixes DeepSpeed's copy of it). Offloading the optimizer
moves the last three columns (and ZeRO-2/3's gradient partition) to host memory; offloading
ZeRO-3's parameters moves its weight partition there too.

Host memory per rank (HostMemory) adds to the rank's own and its offloaded states what each moment
that can kill a job holds on the host: start-up (a whole fp32 model, 4N, unless ZeRO-3 builds it
partitioned: then eN / D passing through DeepSpeed's defragmentation), resume (DeepSpeed reads
the rank's optimizer partition, 12N / D, and at ZeRO 0-2 the whole module into host memory), save
(the async save's copy, or the largest tensor torch.save stages) and export (one gathered
parameter on rank 0). A node needs its ranks' sum at the highest of these, checked against
cluster.host_memory_gb.
"""
from __future__ import annotations

import itertools
import logging
import math
from dataclasses import dataclass, replace
from typing import Iterator, Optional

import torch
from omegaconf import DictConfig, OmegaConf

from zeroforge.trainer.config import ConfigError, Scheduler
from zeroforge.trainer.entry import entry_point
from zeroforge.trainer.loss import LINEAR_HEAD_MODEL_TYPES, resolve_loss

log = logging.getLogger("zeroforge")

GIB = 2**30
# Outside PyTorch's tensors: the CUDA context, cuBLAS workspaces and NCCL's buffers.
CUDA_CONTEXT_GIB = 2.0
# The caching allocator never packs tensors perfectly; measured fragmentation is typically 5-15%.
FRAGMENTATION = 0.10
# DeepSpeed's defaults for the buffers it allocates beside the model states.
DS_REDUCE_BUCKET_SIZE = 500_000_000
DS_PREFETCH_BUCKET_SIZE = 50_000_000
DS_SUB_GROUP_SIZE = 1_000_000_000
# A rank's own host memory before any weight. On a GPU node: Python, torch with CUDA's host-side
# libraries and context, NCCL, DeepSpeed, transformers, the data loader (an estimate; 2-5 GiB is
# typical). On the CPU build: 0.40-0.47 GiB measured (bench/zero3_startup.py, "before the model").
PROCESS_HOST_GIB_GPU = 3.0
PROCESS_HOST_GIB_CPU = 0.5
# Above what the ranks of a node hold: the allocator's slack, and the system's own (kernel, page
# tables, Slurm and the node's daemons).
HOST_FRAGMENTATION = 0.10
HOST_SYSTEM_GIB = 8.0


@dataclass(frozen=True)
class ModelShape:
    """What the memory and time of a model depend on, counted without allocating a weight."""

    name: str
    params: int
    # The largest single module's parameters: what ZeRO-3 gathers at once (as DeepSpeed counts it).
    largest_layer: int
    vocab_size: int
    hidden: int
    kv_hidden: int
    intermediate: int
    layers: int
    heads: int
    flops_per_token: float


@dataclass(frozen=True)
class Setup:
    """The knobs a fix can turn; everything else about the job stays as configured."""

    stage: int
    offload_optimizer: bool
    offload_params: bool
    activation_checkpointing: bool
    micro_batch: int
    nodes: int
    # The next-token loss as trained: plain, chunked or liger (train.loss with auto decided).
    loss: str = "plain"
    # Host memory only: ZeRO-3's partitioned construction, and the async save's host copy.
    zero_init: bool = True
    async_save: bool = False


@dataclass(frozen=True)
class ModelStates:
    """Bytes per GPU of the model states, and what offloading moved to host memory per rank."""

    weights: float
    gradients: float
    master: float
    moments: float
    fp32_grads: float
    host: float

    @property
    def optimizer(self) -> float:
        return self.master + self.moments + self.fp32_grads

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer


@dataclass(frozen=True)
class Activations:
    """Activation bytes of one micro batch: held for the backward after the forward, and at peak."""

    saved: float
    peak: float


@dataclass(frozen=True)
class HostMemory:
    """Host memory per rank (bytes): its own, what it holds while training, and what each moment
    that decides whether a job starts and keeps running adds on top; and what a node needs."""

    ranks_per_node: int
    process: float
    # Offloaded states (on the CPU accelerator: everything the "GPU" figures count).
    resident: float
    # Building the model and the engine: the whole fp32 model (ZeRO 0-2, or ZeRO-3 without
    # deepspeed.zero_init), or ZeRO-3's shard staged through the host by DeepSpeed's defragmentation.
    startup: float
    # Resuming: DeepSpeed reads a rank's optimizer partition (and, at ZeRO 0-2, the whole module)
    # into host memory before copying it to the GPU.
    resume: float
    # Saving: the async save's copy of the rank's checkpoint, or the largest tensor torch.save
    # stages through the host; save_rank0 is rank 0's extra (ZeRO 0-2's module states).
    save: float
    save_rank0: float
    # Exporting (rank 0): one gathered parameter at a time.
    export: float

    def phases(self) -> dict[str, float]:
        """Per node, for each moment: every rank's share, rank 0's extra, the margin."""
        r = self.ranks_per_node
        base = self.process + self.resident
        raw = {
            "start-up": r * (self.process + max(self.startup, self.resident)),
            "resume": r * (base + self.resume),
            "save": r * (base + self.save) + self.save_rank0,
            "export": r * base + self.export,
        }
        return {k: v * (1 + HOST_FRAGMENTATION) + HOST_SYSTEM_GIB * GIB for k, v in raw.items()}

    @property
    def per_node(self) -> float:
        return max(self.phases().values())

    @property
    def highest(self) -> str:
        phases = self.phases()
        return max(phases, key=phases.get)


@dataclass(frozen=True)
class MemoryPlan:
    """Per-GPU memory (bytes) and time of one configuration; `fits` is None when the GPU is unknown."""

    model: ModelShape
    setup: Setup
    world_size: int
    precision: str
    seq_len: int
    global_batch: int
    states: ModelStates
    buffers: float
    activations: float
    # The same micro batch with activation checkpointing switched the other way.
    activations_other: float
    margin: float
    host: HostMemory
    # Host memory of one node (cluster.host_memory_gb), bytes; None: not checked.
    host_memory: Optional[float]
    inference_batch: int
    inference_context: int
    inference_weights: float
    kv_cache: float
    gpu_memory: Optional[float]
    peak_tflops: Optional[float]
    assumed_mfu: float
    steps: int

    @property
    def weights(self) -> float:
        return self.states.weights

    @property
    def gradients(self) -> float:
        return self.states.gradients

    @property
    def optimizer(self) -> float:
        return self.states.optimizer

    @property
    def total(self) -> float:
        return self.states.total + self.buffers + self.activations + self.margin

    @property
    def gpu_fits(self) -> Optional[bool]:
        return None if self.gpu_memory is None else self.total <= self.gpu_memory

    @property
    def host_fits(self) -> Optional[bool]:
        return None if self.host_memory is None else self.host.per_node <= self.host_memory

    @property
    def fits(self) -> Optional[bool]:
        """False when either memory is known not to suffice; None when neither is known."""
        verdicts = [v for v in (self.gpu_fits, self.host_fits) if v is not None]
        return all(verdicts) if verdicts else None

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch * self.seq_len

    @property
    def step_time_s(self) -> Optional[float]:
        if self.peak_tflops is None:
            return None
        # The assumed MFU counts model FLOPs; checkpointing recomputes the forward (2 of the 6).
        recompute = 8 / 6 if self.setup.activation_checkpointing else 1.0
        achieved = self.world_size * self.peak_tflops * 1e12 * self.assumed_mfu
        return self.model.flops_per_token * self.tokens_per_step * recompute / achieved

    @property
    def total_time_s(self) -> Optional[float]:
        step = self.step_time_s
        return None if step is None else step * self.steps


def model_shape(cfg: DictConfig) -> ModelShape:
    """Count parameters on the meta device: any AutoConfig causal LM, no memory for weights."""
    from transformers import AutoModelForCausalLM

    from zeroforge.trainer.model import flops_per_token, hf_config

    m = cfg.model
    vocab = planned_vocab_size(cfg)
    config = hf_config(m, vocab)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    params = sum(p.numel() for p in model.parameters())  # a tied embedding is counted once
    largest = max(sum(p.numel() for p in mod.parameters(recurse=False)) for mod in model.modules())
    return ModelShape(
        name=m.name,
        params=params,
        largest_layer=largest,
        vocab_size=vocab,
        hidden=m.hidden_size,
        kv_hidden=m.hidden_size // m.num_heads * m.num_kv_heads,
        intermediate=m.intermediate_size,
        layers=m.num_layers,
        heads=m.num_heads,
        flops_per_token=flops_per_token(config, params, cfg.data.seq_len),
    )


def planned_vocab_size(cfg: DictConfig) -> int:
    """The vocabulary training will use, known before the data is prepared where possible."""
    import json

    from zeroforge.data.prepare import prepared_dir
    from zeroforge.trainer.model import resolve_vocab_size

    if cfg.model.vocab_size is not None:
        return cfg.model.vocab_size
    manifest = prepared_dir(cfg.data) / "manifest.json"
    if manifest.exists():
        return resolve_vocab_size(cfg.model, json.loads(manifest.read_text())["vocab_size"])
    if cfg.data.tokenizer == "embedded":
        return resolve_vocab_size(cfg.model, cfg.data.tokenizer_vocab_size)
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(cfg.data.tokenizer)
    except (OSError, ValueError) as err:
        raise ConfigError(
            f"the plan needs the vocabulary size, but data.tokenizer={cfg.data.tokenizer!r} could not be "
            f"loaded ({err}); set model.vocab_size"
        ) from err
    return resolve_vocab_size(cfg.model, len(tokenizer))


def model_states(params: int, largest_layer: int, setup: Setup, dp: int, e: int, sub_group: float = DS_SUB_GROUP_SIZE) -> ModelStates:
    """The model states per GPU, as in the table at the top of this module."""
    n = params
    shard = dp if setup.stage >= 1 else 1
    weights = e * n / (dp if setup.stage == 3 else 1)
    gradients = e * n / (dp if setup.stage >= 2 else 1)
    master = 4 * n / shard if (e == 2 or setup.stage >= 1) else 0.0
    if setup.stage == 3 and e == 4 and not setup.offload_optimizer:
        master = 0.0  # in fp32, ZeRO-3's weight partition is its own master (trainer/partitioned.py)
    moments = 8 * n / shard
    if setup.stage == 3:
        # ZeRO-3 steps sub-group by sub-group, flattening each one's gradients to fp32 in turn.
        fp32_grads = 4 * min(n / dp, sub_group)
        gathered = e * largest_layer
        weights += gathered
        gradients += gathered
    else:
        # The flattened (ZeRO-1/2) or cast (bf16) gradients the optimizer steps on.
        fp32_grads = 4 * n / shard if (e == 2 or setup.stage >= 1) else 0.0
    host = 0.0
    if setup.offload_optimizer:
        host += master + moments + fp32_grads
        master = moments = fp32_grads = 0.0
        if setup.stage >= 2:
            # Reduced gradient partitions go straight to the host copy the CPU optimizer steps on.
            gradients -= e * n / dp
    if setup.offload_params:
        host += e * n / dp
        weights -= e * n / dp
    return ModelStates(weights, gradients, master, moments, fp32_grads, host)


def liger_chunk_tokens(tokens: int, vocab: int, hidden: int) -> int:
    """The chunk Liger's fused linear cross-entropy takes: about tokens x hidden logits a chunk."""
    per_chunk = -(-tokens // -(-vocab // hidden))
    return min(tokens, 1 << (per_chunk - 1).bit_length())


def activation_bytes(
    shape: ModelShape, micro_batch: int, seq_len: int, e: int, checkpointing: bool, eager: bool,
    loss: str = "plain", chunk_tokens: int = 1024, liger_kernels: bool = False,
) -> Activations:
    """What a Llama-shaped decoder (RMSNorm, gated MLP, fused attention) keeps for its backward.

    Per token and layer, counted from what autograd saves in transformers' Llama: each RMSNorm
    keeps its fp32 input and its normalised output, and the projections after it share that
    output (4 + 2e bytes per hidden unit, twice); attention keeps q, k, v and its output; the MLP
    keeps gate, activation, up and their product. Eager attention adds the probabilities.
    Liger's kernels (liger_kernels) keep each norm's input in the model's dtype instead of fp32,
    and SwiGLU keeps gate and up only (from Liger's saved tensors; not measurable on the CPU).
    Other model types get the same figure as an approximation.

    The loss (trainer/loss.py): plain keeps all tokens' fp32 log-probabilities and starts the
    backward with their fp32 gradient; chunked keeps the gradients of the hidden states (in
    place of the output layer's saved input) and of the output weight, and at its peak holds
    one chunk's fp32 logits (with their 16-bit copy and gradient in bf16); Liger's loss holds
    its chunk in the model's dtype.
    """
    h, i, vocab = shape.hidden, shape.intermediate, shape.vocab_size
    norm = 2 * e * h if liger_kernels else 4 * h + 2 * e * h
    per_layer = 2 * norm + 2 * e * h + 2 * e * shape.kv_hidden + (3 if liger_kernels else 4) * e * i
    if eager:
        # fp32 probabilities for the softmax backward, and in bf16 their cast copy for the matmul.
        per_layer += (4 + (e if e < 4 else 0)) * shape.heads * seq_len
    tokens = micro_batch * seq_len
    # The final norm as in every layer; the loss's share per token and once per model.
    head, fixed = norm + (4 * vocab if loss == "plain" else 0), (0 if loss == "plain" else e * vocab * h)
    if loss == "plain":
        loss_peak = tokens * 4 * vocab
    elif loss == "liger":
        loss_peak = liger_chunk_tokens(tokens, vocab, h) * e * vocab
    else:
        loss_peak = min(chunk_tokens, tokens) * vocab * (4 + (2 * e if e < 4 else 0))
    if checkpointing:
        # Each layer keeps only its input; one layer at a time is recomputed in full.
        saved = tokens * (shape.layers * e * h + head) + fixed
        recomputed = tokens * per_layer
    else:
        saved = tokens * (shape.layers * per_layer + head) + fixed
        recomputed = 0
    return Activations(saved=saved, peak=saved + recomputed + loss_peak)


def buffer_bytes(zero_extra: dict, setup: Setup, params: int, dp: int, e: int) -> float:
    """DeepSpeed's gradient-reduction buckets (and ZeRO-3's parameter prefetch) at their set sizes,
    plus the square root of Adam's v that torch's AdamW builds for the step (on the GPU)."""
    sub_group = float(zero_extra.get("sub_group_size", DS_SUB_GROUP_SIZE))
    stepped = params / dp if setup.stage >= 1 else params
    if setup.stage == 3:
        stepped = min(stepped, sub_group)
    adam = 0.0 if setup.offload_optimizer else 4 * stepped  # torch's AdamW unless DeepSpeed's CPU Adam runs it
    if setup.stage == 0:
        return adam
    bucket = float(zero_extra.get("reduce_bucket_size", DS_REDUCE_BUCKET_SIZE))
    if setup.stage == 3:
        prefetch = float(zero_extra.get("stage3_prefetch_bucket_size", DS_PREFETCH_BUCKET_SIZE))
        return adam + e * (bucket + prefetch)
    # ZeRO-1/2 with contiguous gradients (the default) stage gradients in one bucket, two with overlap.
    if not zero_extra.get("contiguous_gradients", True):
        return adam
    return adam + e * bucket * (2 if zero_extra.get("overlap_comm", False) else 1)


def host_memory(shape: ModelShape, setup: Setup, states: ModelStates, device_total: float, dp: int, e: int,
                ranks_per_node: int, on_gpus: bool, sub_group: float) -> HostMemory:
    """Host memory per rank, as in HostMemory's fields. On the CPU accelerator the device figures
    are host memory, held from start-up on."""
    n = shape.params
    optimizer_partition = 12 * n / (dp if setup.stage >= 1 else 1)  # fp32 master, Adam m and v
    module = 0.0 if setup.stage == 3 else e * n  # ZeRO 0-2 save and load the whole module
    if setup.stage == 3 and setup.zero_init:
        build = e * n / dp  # defragment() copies the shard into one host buffer on its way back
    else:
        build = 4 * n  # the whole model in fp32, built on the CPU before DeepSpeed moves it
    if not on_gpus:
        resident, build = device_total, 0.0
    else:
        resident = states.host
    if setup.async_save:
        save = optimizer_partition if setup.stage >= 1 else 0.0
    elif setup.offload_optimizer or not on_gpus:
        save = 0.0  # torch.save writes host tensors as they are
    else:
        # torch.save copies each device tensor to the host in turn: the largest is one flat fp32
        # partition (ZeRO-3: one sub-group of it), or one parameter's Adam state without ZeRO.
        save = 4 * (min(n / dp, sub_group) if setup.stage == 3 else n / dp if setup.stage >= 1 else shape.largest_layer)
    rank0 = module + (optimizer_partition if setup.stage == 0 else 0.0)
    return HostMemory(
        ranks_per_node=ranks_per_node,
        process=(PROCESS_HOST_GIB_GPU if on_gpus else PROCESS_HOST_GIB_CPU) * GIB,
        resident=resident,
        startup=build,
        resume=optimizer_partition + module,
        save=save,
        save_rank0=rank0 if setup.async_save else 0.0,
        export=e * shape.largest_layer,
    )


def _on_gpus(cfg: DictConfig) -> bool:
    from zeroforge.trainer.validate import accelerator_is_cuda

    c = cfg.cluster
    return c.gpu_memory_gb is not None or c.get("gpus_per_node", 0) > 0 or accelerator_is_cuda()


def _precision(cfg: DictConfig) -> str:
    precision = cfg.train.precision.value if hasattr(cfg.train.precision, "value") else str(cfg.train.precision)
    if precision != "auto":
        return precision
    return "bf16" if _on_gpus(cfg) else "fp32"


def _peak_tflops(cfg: DictConfig) -> Optional[float]:
    from zeroforge.trainer.metrics import peak_tflops
    from zeroforge.trainer.validate import accelerator_is_cuda

    if cfg.cluster.peak_tflops is not None:
        return cfg.cluster.peak_tflops
    return peak_tflops(None, "cuda") if accelerator_is_cuda() else None


def _setup(cfg: DictConfig) -> Setup:
    ds = cfg.deepspeed
    return Setup(
        stage=ds.stage,
        offload_optimizer=ds.offload_optimizer,
        offload_params=ds.offload_params,
        activation_checkpointing=cfg.model.activation_checkpointing,
        micro_batch=cfg.train.micro_batch_size,
        nodes=cfg.cluster.nodes,
        loss=resolve_loss(cfg.train.loss, cfg.model.model_type),
        zero_init=ds.zero_init,
        async_save=cfg.checkpoint.async_save,
    )


def _plan(cfg: DictConfig, shape: ModelShape, setup: Setup) -> MemoryPlan:
    c = cfg.cluster
    world_size = setup.nodes * c.nproc_per_node
    precision = _precision(cfg)
    e = 2 if precision == "bf16" else 4
    seq = cfg.data.seq_len
    zero_extra = OmegaConf.to_container(cfg.deepspeed.zero_extra, resolve=True)
    sub_group = float(zero_extra.get("sub_group_size", DS_SUB_GROUP_SIZE))
    states = model_states(shape.params, shape.largest_layer, setup, world_size, e, sub_group)
    eager = cfg.model.attn_implementation == "eager"
    kernels = {"loss": setup.loss, "chunk_tokens": cfg.train.loss_chunk_tokens, "liger_kernels": cfg.model.liger_kernels}
    act = activation_bytes(shape, setup.micro_batch, seq, e, setup.activation_checkpointing, eager, **kernels)
    other = activation_bytes(shape, setup.micro_batch, seq, e, not setup.activation_checkpointing, eager, **kernels)
    buffers = buffer_bytes(zero_extra, setup, shape.params, world_size, e)
    tensors = states.total + buffers + act.peak
    host = host_memory(shape, setup, states, tensors, world_size, e, c.nproc_per_node, _on_gpus(cfg), sub_group)
    context = cfg.launcher.inference_context or cfg.model.max_position_embeddings
    return MemoryPlan(
        model=shape,
        setup=setup,
        world_size=world_size,
        precision=precision,
        seq_len=seq,
        global_batch=cfg.train.global_batch_size,
        states=states,
        buffers=buffers,
        activations=act.peak,
        activations_other=other.peak,
        margin=CUDA_CONTEXT_GIB * GIB + FRAGMENTATION * tensors,
        host=host,
        host_memory=None if c.get("host_memory_gb") is None else c.host_memory_gb * GIB,
        inference_batch=cfg.launcher.inference_batch_size,
        inference_context=context,
        inference_weights=e * shape.params,
        kv_cache=2 * shape.layers * shape.kv_hidden * e * cfg.launcher.inference_batch_size * context,
        gpu_memory=None if c.gpu_memory_gb is None else c.gpu_memory_gb * GIB,
        peak_tflops=_peak_tflops(cfg),
        assumed_mfu=cfg.launcher.assumed_mfu,
        steps=cfg.train.steps,
    )


def estimate(cfg: DictConfig, world_size: int) -> MemoryPlan:
    """The plan of this configuration on `world_size` ranks (nodes x nproc_per_node)."""
    per_node = cfg.cluster.nproc_per_node
    if world_size != cfg.cluster.nodes * per_node:
        raise ConfigError(
            f"world size {world_size} is not cluster.nodes ({cfg.cluster.nodes}) x "
            f"cluster.nproc_per_node ({per_node}) = {cfg.cluster.nodes * per_node}"
        )
    return _plan(cfg, model_shape(cfg), _setup(cfg))


def best_micro_batch(cfg: DictConfig, world_size: int, limit: int = 64) -> Optional[tuple[int, MemoryPlan]]:
    """The largest power-of-two micro batch up to `limit` that fits this configuration (its
    loss, kernels and stage as set) on cluster.gpu_memory_gb, with its plan; None if not even 1."""
    shape, now = model_shape(cfg), _setup(cfg)
    for micro in (1 << k for k in range(int(math.log2(limit)), -1, -1)):
        plan = _plan(cfg, shape, replace(now, micro_batch=micro))
        if plan.fits is not False:
            return micro, plan
    return None


# What each change costs, roughly, to rank the fixes: the chunked loss costs nothing (the same
# loss, no slower), a ZeRO stage adds communication (per stage), checkpointing recomputes the
# forward (a third more compute), a halved micro batch runs smaller kernels, a doubling of the
# nodes doubles the GPUs held, offloading the optimizer puts its step on the CPU, and
# partitioned construction costs a little start-up time. (A synchronous save is never a fix:
# the async save's host copy is what a resume reads anyway.)
_COST = {"loss": 0, "stage": 1, "checkpointing": 2, "halving": 1, "doubling": 4, "offload": 6, "host": 1}
_MAX_NODE_DOUBLINGS = 6


def _candidates(cfg: DictConfig, now: Setup) -> Iterator[tuple[tuple[int, int], Setup]]:
    dp_per_node = cfg.cluster.nproc_per_node
    glob = cfg.train.global_batch_size
    # The local launcher runs one node; more nodes are a fix only on a cluster.
    doublings_allowed = _MAX_NODE_DOUBLINGS if cfg.cluster.scheduler == Scheduler.slurm else 0
    # The plain loss can become the chunked one where that is exact for the model type.
    losses = sorted({now.loss, "chunked"} if now.loss == "plain" and cfg.model.model_type in LINEAR_HEAD_MODEL_TYPES else {now.loss})
    for stage, ckpt, halvings, doublings, offload, loss, zero_init in itertools.product(
        range(now.stage, 4),
        sorted({now.activation_checkpointing, True}),
        range(0, int(math.log2(now.micro_batch)) + 1),
        range(0, doublings_allowed + 1),
        sorted({now.offload_optimizer, True}),
        losses,
        sorted({now.zero_init, True}),
    ):
        setup = replace(
            now,
            stage=stage,
            activation_checkpointing=ckpt,
            micro_batch=max(1, now.micro_batch >> halvings),
            nodes=now.nodes << doublings,
            offload_optimizer=offload and stage >= 1,
            loss=loss,
            zero_init=zero_init,
        )
        if offload and stage == 0 or glob % (setup.micro_batch * setup.nodes * dp_per_node):
            continue  # offload needs ZeRO; the global batch must still divide
        cost = (
            _COST["stage"] * (stage - now.stage)
            + _COST["checkpointing"] * (ckpt != now.activation_checkpointing)
            + _COST["halving"] * halvings
            + _COST["doubling"] * doublings
            + _COST["offload"] * (offload != now.offload_optimizer)
            + _COST["loss"] * (loss != now.loss)
            + _COST["host"] * (zero_init != now.zero_init)
        )
        yield (cost, len(_changed(now, setup))), setup


def _overrides(now: Setup, fix: Setup) -> str:
    parts = []
    if fix.stage != now.stage:
        parts.append(f"deepspeed.stage={fix.stage}")
    if fix.activation_checkpointing != now.activation_checkpointing:
        parts.append("model.activation_checkpointing=true")
    if fix.micro_batch != now.micro_batch:
        parts.append(f"train.micro_batch_size={fix.micro_batch}")
    if fix.nodes != now.nodes:
        parts.append(f"cluster.nodes={fix.nodes}")
    if fix.offload_optimizer != now.offload_optimizer:
        parts.append("deepspeed.offload_optimizer=true")
    if fix.loss != now.loss:
        parts.append(f"train.loss={fix.loss}")
    if fix.zero_init != now.zero_init and fix.stage == 3:
        parts.append("deepspeed.zero_init=true")
    return " ".join(parts)


def _changed(now: Setup, fix: Setup) -> set[str]:
    """Which knobs a fix turns (not by how much)."""
    return {override.split("=")[0] for override in _overrides(now, fix).split()}


def fixes(cfg: DictConfig, plan: MemoryPlan, limit: int = 4) -> list[tuple[str, MemoryPlan]]:
    """The cheapest changes that make the job fit, each recomputed; none that turns a superset of
    the knobs of one already listed."""
    fitting = [
        (cost, setup) for cost, setup in _candidates(cfg, plan.setup)
        if _plan(cfg, plan.model, setup).fits
    ]
    chosen: list[Setup] = []
    for _, setup in sorted(fitting, key=lambda item: item[0]):
        if any(_changed(plan.setup, earlier) <= _changed(plan.setup, setup) for earlier in chosen):
            continue
        chosen.append(setup)
        if len(chosen) == limit:
            break
    return [(_overrides(plan.setup, s), _plan(cfg, plan.model, s)) for s in chosen]


def _gib(x: float) -> str:
    return f"{x / GIB:.1f} GiB"


def _duration(seconds: Optional[float]) -> str:
    if seconds is None:
        return "unknown (set cluster.peak_tflops)"
    if seconds < 120:
        return f"{seconds:.2f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    hours = seconds / 3600
    return f"{hours:.1f} h" if hours < 48 else f"{hours / 24:.1f} days"


def _where(plan: MemoryPlan) -> str:
    s = plan.setup
    offload = " + offload optimizer" if s.offload_optimizer else ""
    offload += " + offload params" if s.offload_params else ""
    ckpt = "on" if s.activation_checkpointing else "off"
    return (
        f"ZeRO-{s.stage}{offload}, {plan.precision}, {s.nodes} node(s) x {plan.world_size // s.nodes} GPUs, "
        f"micro batch {s.micro_batch} x seq_len {plan.seq_len}, activation checkpointing {ckpt}, loss {s.loss}"
    )


def _host_breakdown(plan: MemoryPlan) -> str:
    h = plan.host
    return (
        f"per rank {_gib(h.process)} of its own and {_gib(h.resident)} held while training; on top of that, "
        f"start-up {_gib(h.startup)}, resume {_gib(h.resume)}, save {_gib(h.save)}"
        + (f" (+{_gib(h.save_rank0)} on rank 0)" if h.save_rank0 else "")
        + f", export {_gib(h.export)} (rank 0); x {h.ranks_per_node} ranks a node, "
        f"+{HOST_FRAGMENTATION:.0%} and {HOST_SYSTEM_GIB:.0f} GiB for the system"
    )


def refusal(cfg: DictConfig, plan: MemoryPlan) -> str:
    """Why the job does not fit, with the numbers and the changes that would make it fit."""
    found = fixes(cfg, plan)
    lines = []
    if plan.gpu_fits is False:
        lines.append(
            f"{plan.model.name} needs {_gib(plan.total)} per GPU but cluster.gpu_memory_gb={cfg.cluster.gpu_memory_gb} "
            f"({cfg.cluster.name}), at {_where(plan)}: weights {_gib(plan.weights)}, gradients "
            f"{_gib(plan.gradients)}, optimizer {_gib(plan.optimizer)}, buffers {_gib(plan.buffers)}, "
            f"activations {_gib(plan.activations)}, margin {_gib(plan.margin)}."
        )
    if plan.host_fits is False:
        lines.append(
            f"{plan.model.name} needs {_gib(plan.host.per_node)} of host memory per node (at {plan.host.highest}) but "
            f"cluster.host_memory_gb={cfg.cluster.host_memory_gb} ({cfg.cluster.name}), at {_where(plan)}: "
            f"{_host_breakdown(plan)}."
        )
    if found:
        lines.append("Changes that fit, cheapest first:")
        lines += [f"  {overrides}  ->  {_gib(p.total)} per GPU, {_gib(p.host.per_node)} host per node" for overrides, p in found]
    else:
        lines.append(f"No change of ZeRO stage, checkpointing, micro batch, offload, loss or (on Slurm) up to {2**_MAX_NODE_DOUBLINGS}x the nodes fits.")
    lines.append("Or launcher.force=true to launch anyway (zeroforge plan prints the whole plan)")
    return "\n".join(lines)


def check_fits(cfg: DictConfig, world_size: int) -> MemoryPlan:
    """What every launch path calls before it prepares data or submits: refuse a job that cannot
    fit, unless forced. It validates first, so a plan is only ever made of a valid config."""
    from zeroforge.trainer.validate import validate

    validate(cfg, world_size)
    plan = estimate(cfg, world_size)
    if plan.fits is False:
        if not cfg.launcher.force:
            raise ConfigError(refusal(cfg, plan))
        log.warning("launcher.force=true: launching although %s", refusal(cfg, plan).splitlines()[0])
    else:
        log.info(
            "plan: %s per GPU (%s), %s host memory per node (%s), %s per step, %s to %.3g tokens at %.0f%% MFU",
            _gib(plan.total), "fits" if plan.gpu_fits else "GPU memory unknown", _gib(plan.host.per_node),
            "fits" if plan.host_fits else "host memory unknown", _duration(plan.step_time_s),
            _duration(plan.total_time_s), plan.tokens_per_step * plan.steps, 100 * plan.assumed_mfu,
        )
    return plan


def _stage_table(cfg: DictConfig, plan: MemoryPlan) -> list[str]:
    rows = [
        "| ZeRO | weights | grads | optimizer | buffers | activations (ckpt off / on) | total (ckpt off / on) | fits (off / on) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for stage, offload in [(0, False), (1, False), (2, False), (3, False), (3, True)]:
        off, on = (
            _plan(cfg, plan.model, replace(plan.setup, stage=stage, offload_optimizer=offload,
                                           offload_params=offload, activation_checkpointing=ckpt))
            for ckpt in (False, True)
        )
        verdict = " / ".join("?" if p.fits is None else "yes" if p.fits else "no" for p in (off, on))
        rows.append(
            f"| {stage}{' + offload (zero3-offload)' if offload else ''} | {_gib(off.weights)} | {_gib(off.gradients)} | "
            f"{_gib(off.optimizer)} | {_gib(off.buffers)} | {_gib(off.activations)} / {_gib(on.activations)} | "
            f"{_gib(off.total)} / {_gib(on.total)} | {verdict} |"
        )
    return rows


def _host_table(plan: MemoryPlan) -> list[str]:
    h = plan.host
    phases = h.phases()
    explained = {
        "start-up": ("building the model and the engine", max(h.startup, h.resident)),
        "resume": ("DeepSpeed reading the rank's checkpoint into host memory", h.resident + h.resume),
        "save": ("async copy of the checkpoint" if plan.setup.async_save else "torch.save staging one tensor", h.resident + h.save),
        "export": ("rank 0 writing one gathered parameter at a time (rank 0)", h.resident + h.export),
    }
    rows = [
        f"| host memory ({h.ranks_per_node} ranks a node) | per rank above its own {_gib(h.process)} | per node |",
        "| --- | ---: | ---: |",
    ]
    for phase, (what, per_rank) in explained.items():
        rows.append(f"| {phase}: {what} | {_gib(per_rank)} | {_gib(phases[phase])} |")
    return rows


def format_plan(cfg: DictConfig, plan: MemoryPlan) -> str:
    m = plan.model
    verdict = (
        "GPU memory unknown (set cluster.gpu_memory_gb): not checked" if plan.gpu_fits is None
        else f"fits in {_gib(plan.gpu_memory)}" if plan.gpu_fits
        else f"DOES NOT FIT in {_gib(plan.gpu_memory)}"
    )
    host_verdict = (
        "host memory unknown (set cluster.host_memory_gb): not checked" if plan.host_fits is None
        else f"fits in {_gib(plan.host_memory)} per node" if plan.host_fits
        else f"DOES NOT FIT in {_gib(plan.host_memory)} per node"
    )
    inference = plan.inference_weights + plan.kv_cache
    lines = [
        f"{m.name}: {m.params / 1e9:.3f}B parameters (vocabulary {m.vocab_size}), "
        f"{m.flops_per_token / 1e9:.2f} GFLOPs per token (6N + attention at seq_len {plan.seq_len})",
        f"setup: {_where(plan)}",
        "",
        "| per GPU | |",
        "| --- | ---: |",
        f"| weights | {_gib(plan.weights)} |",
        f"| gradients | {_gib(plan.gradients)} |",
        f"| optimizer states (fp32 master, Adam m, v, fp32 grads) | {_gib(plan.optimizer)} |",
        f"| buffers (DeepSpeed's buckets, AdamW's step temporary) | {_gib(plan.buffers)} |",
        f"| activations (checkpointing {'on' if plan.setup.activation_checkpointing else 'off'}; "
        f"{'off' if plan.setup.activation_checkpointing else 'on'}: {_gib(plan.activations_other)}) | {_gib(plan.activations)} |",
        f"| margin ({CUDA_CONTEXT_GIB:.0f} GiB CUDA context + {FRAGMENTATION:.0%} fragmentation) | {_gib(plan.margin)} |",
        f"| total | {_gib(plan.total)} |",
        "",
        f"verdict: {verdict}",
        "",
        *_host_table(plan),
        "",
        f"host verdict: {host_verdict}",
        "",
    ]
    lines += [
        f"time: {_duration(plan.step_time_s)} per step of {plan.tokens_per_step:,} tokens, "
        f"{_duration(plan.total_time_s)} for {plan.steps:,} steps ({plan.tokens_per_step * plan.steps:.3g} tokens) "
        f"at {plan.assumed_mfu:.0%} MFU of {plan.peak_tflops or '?'} TFLOP/s per GPU (launcher.assumed_mfu)",
        f"inference: weights {_gib(plan.inference_weights)} + KV cache {_gib(plan.kv_cache)} "
        f"(batch {plan.inference_batch} x context {plan.inference_context}) = {_gib(inference)}"
        + ("" if plan.gpu_memory is None else f", {math.ceil(inference / (plan.gpu_memory - CUDA_CONTEXT_GIB * GIB))} GPU(s)"),
        "",
        *_stage_table(cfg, plan),
    ]
    if plan.fits is False:
        lines += ["", refusal(cfg, plan)]
    return "\n".join(lines)


def print_plan(cfg: DictConfig) -> MemoryPlan:
    from zeroforge.trainer.validate import validate

    world_size = cfg.cluster.nodes * cfg.cluster.nproc_per_node
    validate(cfg, world_size)
    plan = estimate(cfg, world_size)
    print(format_plan(cfg, plan), flush=True)
    return plan


@entry_point
def main(cfg: DictConfig) -> None:
    print_plan(cfg)


if __name__ == "__main__":
    main()
