"""One configuration's plan: its memory per GPU and per node, and its time, from the config and
the topology (launcher/memory.py counts the parts)."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

from zeroforge.data.config import DataConfig, plain
from zeroforge.launcher.memory import (
    CUDA_CONTEXT_GIB,
    DS_SUB_GROUP_SIZE,
    FRAGMENTATION,
    GIB,
    HostMemory,
    ModelStates,
    Setup,
    activation_bytes,
    buffer_bytes,
    conversion_budget,
    host_memory,
    moe_model_states,
)
from zeroforge.launcher.model_shape import ModelShape, model_shape
from zeroforge.trainer.checkpoint import newest_checkpoint, saved_expert_parallel, saved_run
from zeroforge.trainer.config import AnyConfig, CheckpointConfig, ClusterConfig, DeepSpeedConfig, LauncherConfig, ModelConfig, TrainConfig
from zeroforge.trainer.loss import resolve_loss
from zeroforge.trainer.topology import Topology, accelerator_is_cuda
from zeroforge.trainer.universal import (
    UNIVERSAL,
    CheckpointSizes,
    ConversionPlan,
    checkpoint_sizes,
    converts,
    model_sizes,
    plan_conversion,
)
from zeroforge.trainer.watchdog import DEFAULT_HANG_TIMEOUT_S


@dataclass(frozen=True)
class Resume:
    """The checkpoint a job resumes from, where its optimizer state is cut for the ranks that saved
    it (ZeRO 1-3 without offload) and not converted to DeepSpeed's universal form yet."""

    path: Path
    world_size: int
    sizes: CheckpointSizes
    # The parallel.expert that saved it: experts move between ranks only through the universal form too.
    expert: int = 1


def unconverted_resume(checkpoint: CheckpointConfig, deepspeed: DeepSpeedConfig) -> Optional[Resume]:
    """The Resume of checkpoint.resume (its manifest says which world size saved it), if any."""
    path = newest_checkpoint(checkpoint.dir, checkpoint.resume)
    if path is None or not converts(deepspeed) or (path / UNIVERSAL).is_dir():
        return None
    run = saved_run(path)
    return Resume(path, int(run["world_size"]), checkpoint_sizes(path), saved_expert_parallel(run))


@dataclass(frozen=True)
class Conversion:
    """The conversion to DeepSpeed's universal form that a resume on another world size needs
    (trainer/universal.py), on one node before the ranks start."""

    plan: ConversionPlan
    # Its time limit: checkpoint.universal_timeout_s, or the default for this plan.
    timeout_s: float
    # The ranks that saved the checkpoint.
    saved_by: int
    # The checkpoint this job resumes and converts first; None: the plan is for this job's own
    # checkpoints, resumed on another world size later.
    checkpoint: Optional[Path]
    # The parallel.expert that saved it.
    saved_expert: int = 1


@dataclass(frozen=True)
class MemoryPlan:
    """Per-GPU memory (bytes) and time of one configuration; `fits` is None when the GPU is unknown."""

    model: ModelShape
    setup: Setup
    # The job's topology on setup.nodes nodes.
    topology: Topology
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
    # None: its checkpoints are never converted (ZeRO-0's load on any world size as they are,
    # ZeRO-Offload's resume on their own world size only).
    conversion: Optional[Conversion]
    # cluster.storage_gb_s, and cluster.hang_timeout_s as configured (None: derived below).
    storage_gb_s: float = 0.5
    configured_hang_timeout_s: Optional[int] = None

    @property
    def world_size(self) -> int:
        return self.topology.world_size

    @property
    def precision(self) -> str:
        return self.topology.precision

    @property
    def seq_len(self) -> int:
        return self.topology.seq_len

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
    def conversion_fits(self) -> Optional[bool]:
        """Whether the conversion this job runs before its ranks start fits a node's host memory;
        None where it runs none, or the memory is unknown."""
        c = self.conversion
        return None if c is None or c.checkpoint is None else c.plan.fits

    @property
    def fits(self) -> Optional[bool]:
        """False when any memory is known not to suffice; None when none is known."""
        verdicts = [v for v in (self.gpu_fits, self.host_fits, self.conversion_fits) if v is not None]
        return all(verdicts) if verdicts else None

    @property
    def tokens_per_step(self) -> int:
        return self.topology.tokens_per_step

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

    @property
    def save_time_s(self) -> float:
        """Rank 0's share of a checkpoint at cluster.storage_gb_s: its optimizer partition (fp32
        master, Adam m and v) and the module's weights (all of them at ZeRO 0-2, its shard at 3)."""
        n, shards, e = self.model.params, self.topology.zero_shards, 2 if self.topology.bf16 else 4
        optimizer = 12 * n / (shards if self.setup.stage >= 1 else 1)
        weights = e * n / (shards if self.setup.stage == 3 else 1)
        return (optimizer + weights) / (self.storage_gb_s * GIB)

    @property
    def hang_timeout_s(self) -> int:
        """cluster.hang_timeout_s, or where null: 10 steps or 3 saves, at least 10 minutes (a step
        with its validation and save must fit in it; trainer/watchdog.py)."""
        if self.configured_hang_timeout_s is not None:
            return self.configured_hang_timeout_s
        return round(max(DEFAULT_HANG_TIMEOUT_S, 10 * (self.step_time_s or 0), 3 * self.save_time_s))

    def hang_timeout_problem(self) -> Optional[str]:
        """Why the configured hang timeout would end a healthy job, or None."""
        configured = self.configured_hang_timeout_s
        if configured is None:
            return None
        needed = {"a checkpoint save": self.save_time_s, "a step": self.step_time_s or 0.0}
        what, seconds = max(needed.items(), key=lambda item: item[1])
        if configured >= seconds:
            return None
        return (
            f"cluster.hang_timeout_s={configured} is shorter than the time {what} of this job takes by the plan "
            f"({seconds:.0f} s; save at cluster.storage_gb_s={self.storage_gb_s} GiB/s per rank, step at the "
            f"assumed MFU): a healthy job would be ended as hung; raise it above {seconds:.0f}, or null to derive it"
        )


@dataclass(frozen=True)
class Planner:
    """What a plan is counted from: the sections it reads, the job's topology, the model's shape
    (counted once) and the configured Setup; a fix plans another Setup with the same planner."""

    model: ModelConfig
    data: DataConfig
    train: TrainConfig
    deepspeed: DeepSpeedConfig
    cluster: ClusterConfig
    launcher: LauncherConfig
    checkpoint: CheckpointConfig
    topology: Topology
    shape: ModelShape
    configured: Setup
    resume: Optional[Resume]

    @classmethod
    def of(cls, config: AnyConfig, topology: Topology) -> Planner:
        """The planner of a validated config, for the job of `topology` (the launcher's)."""
        model, train, ds = config.model, config.train, config.deepspeed
        configured = Setup(
            stage=ds.stage,
            offload_optimizer=ds.offload_optimizer,
            offload_params=ds.offload_params,
            activation_checkpointing=model.activation_checkpointing,
            micro_batch=train.micro_batch_size,
            nodes=config.cluster.nodes,
            loss=resolve_loss(train.loss, model.model_type),
            zero_init=ds.zero_init,
            async_save=config.checkpoint.async_save,
            sequence=topology.sequence,
        )
        return cls(
            model=model,
            data=config.data,
            train=train,
            deepspeed=ds,
            cluster=config.cluster,
            launcher=config.launcher,
            checkpoint=config.checkpoint,
            topology=topology,
            shape=model_shape(model, config.data),
            configured=configured,
            resume=unconverted_resume(config.checkpoint, ds),
        )

    def topology_of(self, setup: Setup) -> Topology:
        """The job's topology for `setup` (a fix may change the nodes, cluster.nproc_per_node each,
        and parallel.sequence)."""
        return replace(self.topology, world_size=self.cluster.nproc_per_node * setup.nodes, sequence=setup.sequence)

    def sequence_splits(self, nodes: int) -> list[int]:
        """The parallel.sequence degrees (powers of two) that can split this model's sequences on
        up to `nodes` nodes: what the fix search may offer."""
        from zeroforge.trainer.validate import sequence_parallel_problems

        if self.shape.experts:
            return [1]  # a mixture of experts balances whole sequences' routing (trainer/moe.py)
        ranks = self.cluster.nproc_per_node * nodes
        degrees = (1 << k for k in range(ranks.bit_length()) if 1 << k <= ranks)
        return [sp for sp in degrees if not sequence_parallel_problems(sp, self.model, self.data, self.deepspeed)]

    def peak_tflops(self) -> Optional[float]:
        """cluster.peak_tflops, or for a job on GPUs the GPU of this machine where it has one (a
        local job's); never a launching machine's GPU for a job on CPU nodes."""
        from zeroforge.trainer.metrics import peak_tflops

        if self.cluster.peak_tflops is not None:
            return self.cluster.peak_tflops
        return peak_tflops(None, "cuda") if self.topology.device == "cuda" and accelerator_is_cuda() else None

    def plan(self, setup: Setup) -> MemoryPlan:
        """The plan of `setup` (the configured one, or a fix's)."""
        c, launcher, shape = self.cluster, self.launcher, self.shape
        topology = self.topology_of(setup)
        e = 2 if topology.bf16 else 4
        # ZeRO partitions over the data- and sequence-parallel ranks together.
        seq, shards = topology.seq_len, topology.zero_shards
        zero_extra = plain(self.deepspeed.zero_extra)
        sub_group = float(zero_extra.get("sub_group_size", DS_SUB_GROUP_SIZE))
        states = moe_model_states(shape.params, shape.expert_params, shape.largest_layer, setup, shards, topology.expert, e, sub_group)
        act, other = (
            activation_bytes(
                shape,
                setup.micro_batch,
                seq,
                e,
                checkpointing,
                self.model.attn_implementation == "eager",
                loss=setup.loss,
                chunk_tokens=self.train.loss_chunk_tokens,
                liger_kernels=self.model.liger_kernels,
                sequence=setup.sequence,
                tiled_mlp=self.model.tiled_mlp,
                fp8=topology.precision == "fp8",
            )
            for checkpointing in (setup.activation_checkpointing, not setup.activation_checkpointing)
        )
        buffers = buffer_bytes(zero_extra, setup, shape.params, shards, e)
        tensors = states.total + buffers + act.peak
        host = host_memory(shape, setup, states, tensors, shards, e, c.nproc_per_node, topology.device == "cuda", sub_group)
        context = launcher.inference_context or self.model.max_position_embeddings
        return MemoryPlan(
            model=shape,
            setup=setup,
            topology=topology,
            states=states,
            buffers=buffers,
            activations=act.peak,
            activations_other=other.peak,
            margin=CUDA_CONTEXT_GIB * GIB + FRAGMENTATION * tensors,
            host=host,
            host_memory=None if c.host_memory_gb is None else c.host_memory_gb * GIB,
            inference_batch=launcher.inference_batch_size,
            inference_context=context,
            inference_weights=e * shape.params,
            kv_cache=2 * shape.layers * shape.kv_hidden * e * launcher.inference_batch_size * context,
            gpu_memory=None if c.gpu_memory_gb is None else c.gpu_memory_gb * GIB,
            peak_tflops=self.peak_tflops(),
            assumed_mfu=launcher.assumed_mfu,
            steps=self.train.steps,
            conversion=self.conversion(setup, topology, e),
            storage_gb_s=c.storage_gb_s,
            configured_hang_timeout_s=c.hang_timeout_s,
        )

    def conversion(self, setup: Setup, topology: Topology, e: int) -> Optional[Conversion]:
        """The conversion this job runs before its ranks start (it resumes a checkpoint saved by
        another world size), or else the one its own checkpoints would need, on the model's size."""
        budget, timeout = conversion_budget(self.cluster.host_memory_gb), self.checkpoint.universal_timeout_s
        resume = self.resume
        if resume is not None and (resume.world_size, resume.expert) != (topology.world_size, topology.expert):
            plan = plan_conversion(resume.sizes, budget, self.cluster.storage_gb_s)
            return Conversion(plan, plan.timeout_s(timeout), resume.world_size, resume.path, resume.expert)
        if not converts(setup):
            return None
        sizes = model_sizes(self.shape.params, self.shape.largest_layer, topology.world_size, setup.stage, e)
        plan = plan_conversion(sizes, budget, self.cluster.storage_gb_s)
        return Conversion(plan, plan.timeout_s(timeout), topology.world_size, None)

    def estimate(self) -> MemoryPlan:
        """The plan of the configuration as it is."""
        return self.plan(self.configured)

    def longest_seq_len(self) -> Optional[int]:
        """The longest data.seq_len up to model.max_position_embeddings (it, or a power of two)
        that fits the configured setup, None where nothing fits or the GPU memory is unknown."""
        if self.cluster.gpu_memory_gb is None:
            return None
        most = self.model.max_position_embeddings
        lengths = [most, *(1 << k for k in range(most.bit_length() - 1, 9, -1) if 1 << k < most)]
        for seq_len in lengths:
            if seq_len % self.configured.sequence == 0:
                longer = replace(self, topology=replace(self.topology, seq_len=seq_len))
                if longer.plan(self.configured).gpu_fits:
                    return seq_len
        return None

    def best_micro_batch(self, limit: int = 64) -> Optional[tuple[int, MemoryPlan]]:
        """The largest power-of-two micro batch up to `limit` that fits this configuration (its
        loss, kernels and stage as set) on cluster.gpu_memory_gb, with its plan; None if not even 1."""
        for micro in (1 << k for k in range(int(math.log2(limit)), -1, -1)):
            plan = self.plan(replace(self.configured, micro_batch=micro))
            if plan.fits is not False:
                return micro, plan
        return None
