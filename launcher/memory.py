"""Memory accounting: what one rank holds on its GPU and on the host, component by component.

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

import dataclasses
from dataclasses import dataclass
from typing import Optional

from zeroforge.launcher.model_shape import ModelShape

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
    # parallel.sequence: ranks that split every sequence (Ulysses).
    sequence: int = 1


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

    def __add__(self, other: ModelStates) -> ModelStates:
        return ModelStates(*(getattr(self, f.name) + getattr(other, f.name) for f in dataclasses.fields(self)))


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
        return max(phases, key=lambda phase: phases[phase])


def conversion_budget(host_memory_gb: Optional[float]) -> Optional[float]:
    """Bytes the conversion to DeepSpeed's universal form (trainer/universal.py) may hold on a node
    of host_memory_gb, which it has to itself before the ranks start: what a phase may hold there,
    before the allocator's slack and the system's share. None where the node's memory is unknown."""
    if host_memory_gb is None:
        return None
    return (host_memory_gb - HOST_SYSTEM_GIB) * GIB / (1 + HOST_FRAGMENTATION)


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


def moe_model_states(
    params: int,
    expert_params: int,
    largest_layer: int,
    setup: Setup,
    shards: int,
    expert: int,
    e: int,
    sub_group: float = DS_SUB_GROUP_SIZE,
) -> ModelStates:
    """model_states of a model whose routed experts (expert_params of its params) are split over
    `expert` ranks: each rank holds experts / expert of them, and ZeRO partitions those over the
    shards / expert ranks that hold the same experts (a dense model: expert_params 0)."""
    dense = model_states(params - expert_params, largest_layer, setup, shards, e, sub_group)
    if expert_params == 0:
        return dense
    return dense + model_states(expert_params // expert, 0, setup, max(shards // expert, 1), e, sub_group)


def liger_chunk_tokens(tokens: int, vocab: int, hidden: int) -> int:
    """The chunk Liger's fused linear cross-entropy takes: about tokens x hidden logits a chunk."""
    per_chunk = -(-tokens // -(-vocab // hidden))
    return min(tokens, 1 << (per_chunk - 1).bit_length())


def activation_bytes(
    shape: ModelShape,
    micro_batch: int,
    seq_len: int,
    e: int,
    checkpointing: bool,
    eager: bool,
    loss: str = "plain",
    chunk_tokens: int = 1024,
    liger_kernels: bool = False,
    sequence: int = 1,
    tiled_mlp: bool = False,
    fp8: bool = False,
) -> Activations:
    """What a Llama-shaped decoder (RMSNorm, gated MLP, fused attention) keeps for its backward.

    Per token and layer, counted from what autograd saves in transformers' Llama: each RMSNorm
    keeps its fp32 input and its normalised output, and the projections after it share that
    output (4 + 2e bytes per hidden unit, twice); attention keeps q, k, v and its output; the MLP
    keeps gate, activation, up and their product. Eager attention adds the probabilities.
    Liger's kernels (liger_kernels) keep each norm's input in the model's dtype instead of fp32,
    and SwiGLU keeps gate and up only (from Liger's saved tensors; not measurable on the CPU).
    Other model types get the same figure as an approximation.

    The tiled MLP (model.tiled_mlp) keeps only its input (the norm's output, counted there) and
    holds its intermediates for one slice of about hidden-size tokens a row at a time.

    Sequence parallelism (`sequence` ranks, Ulysses) leaves each rank seq_len / sequence tokens
    of every window, attention included (the whole sequence for its share of the heads is the
    same number of elements); around one layer's attention it adds the all-to-all's buffers: q,
    k, v and the output before and after the exchange.

    The loss (trainer/loss.py): plain keeps all tokens' fp32 log-probabilities and starts the
    backward with their fp32 gradient; chunked keeps the gradients of the hidden states (in
    place of the output layer's saved input) and of the output weight, and at its peak holds
    one chunk's fp32 logits (with their 16-bit copy and gradient in bf16); Liger's loss holds
    its chunk in the model's dtype.

    FP8 (torchao's float8 linear layers) saves the same bf16 tensors for the backward; what it adds
    are the float8 casts of one linear layer's matmuls while they run: its weight and input in the
    forward, its weight transposed, the output gradient and the input again in the backward (one
    byte each, for the largest layer: hidden x intermediate). Like the loss's chunk, they are
    transient, so the peak takes the larger of them.
    """
    h, i, vocab = shape.hidden, shape.intermediate, shape.vocab_size
    norm = 2 * e * h if liger_kernels else 4 * h + 2 * e * h
    mlp = (3 if liger_kernels else 4) * e * i
    per_layer = 2 * norm + 2 * e * h + 2 * e * shape.kv_hidden + (0 if tiled_mlp else mlp)
    if eager:
        # fp32 probabilities for the softmax backward, and in bf16 their cast copy for the matmul.
        per_layer += (4 + (e if e < 4 else 0)) * shape.heads * seq_len
    tokens = micro_batch * seq_len // sequence
    all_to_all = 2 * tokens * e * (2 * h + 2 * shape.kv_hidden) if sequence > 1 else 0
    # One slice's intermediates, while the tiled MLP runs it (forward, or backward's recompute).
    tile = min(micro_batch * h, tokens) * mlp if tiled_mlp else 0
    casts = 2 * h * i + tokens * (2 * i + h) if fp8 else 0  # the MLP's down projection: input i, output h
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
    return Activations(saved=saved, peak=saved + recomputed + max(loss_peak, all_to_all, tile, casts))


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


def host_memory(
    shape: ModelShape,
    setup: Setup,
    states: ModelStates,
    device_total: float,
    dp: int,
    e: int,
    ranks_per_node: int,
    on_gpus: bool,
    sub_group: float,
) -> HostMemory:
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
