"""The job's topology: how its ranks divide the world, derived once per process.

`validate()` (trainer/validate.py) returns it after checking the config; the launcher derives it
once and hands it to the plan and the pre-flight checks, and every rank derives it once in
`train()` and passes it down. Nothing else multiplies nodes by processes, divides the global
batch or decides which accelerator and precision the job runs in (as torchtitan's ParallelDims).
"""

from __future__ import annotations

from dataclasses import dataclass

from zeroforge.trainer.config import ClusterConfig, Precision, Scheduler, TrainPrecision


@dataclass(frozen=True)
class Topology:
    """World size, its parallel degrees and data-parallel size, the batch split, the accelerator
    and precision of the machines that run the job; nothing here is set by hand."""

    world_size: int
    # parallel.*: ranks that split one sample's sequence, one layer's matrices, the experts.
    sequence: int
    tensor: int
    expert: int
    micro_batch_size: int
    global_batch_size: int
    seq_len: int
    # "cuda" or "cpu", and the training precision with auto decided for that device.
    device: str
    precision: str

    @property
    def bf16(self) -> bool:
        """Parameters, gradients and activations in bf16: bf16 runs, and fp8 runs (bf16 but for the
        float8 matmuls of the decoder's linear layers)."""
        return self.precision in ("bf16", "fp8")

    @property
    def dp_size(self) -> int:
        """Ranks that see different samples: sequence and tensor parallel ranks share theirs
        (expert parallelism splits the data-parallel ranks' experts, not their data)."""
        return self.world_size // (self.sequence * self.tensor)

    @property
    def zero_shards(self) -> int:
        """Ranks ZeRO partitions the model states over: the data- and sequence-parallel ranks
        together (DeepSpeed's sequence-data-parallel group)."""
        return self.world_size // self.tensor

    def dp_rank(self, rank: int) -> int:
        """Which data-parallel rank (which samples) global `rank` is: the ranks of one
        sequence-parallel group are consecutive (as DeepSpeed's groups are) and share samples."""
        return rank // (self.sequence * self.tensor)

    def sequence_rank(self, rank: int) -> int:
        """Which slice of every sequence global `rank` computes, inside its group."""
        return rank % self.sequence

    @property
    def grad_accum(self) -> int:
        return self.global_batch_size // (self.micro_batch_size * self.dp_size)

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch_size * self.seq_len


def job_world_size(cluster: ClusterConfig) -> int:
    """The ranks a launch starts: cluster.nodes torchruns of cluster.nproc_per_node processes."""
    return cluster.nodes * cluster.nproc_per_node


def accelerator_is_cuda() -> bool:
    """DeepSpeed's accelerator decides, so DS_ACCELERATOR=cpu means the CPU even beside a GPU."""
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().device_name() == "cuda"


def job_is_on_gpus(cluster: ClusterConfig) -> bool:
    """Whether the machines that will run the job have GPUs, asked where the job is launched.

    A cluster config that gives its nodes GPUs (or GPU memory) answers for them: a Slurm login
    node, or a laptop planning a cluster job, may have none. On cluster=local such fields say
    this machine's GPUs; if it has none, the ranks (which ask the accelerator) refuse what needs
    one. Otherwise a Slurm cluster config means CPU nodes, and a local job runs on this machine's
    accelerator.
    """
    if cluster.gpus_per_node > 0 or cluster.gpu_memory_gb is not None:
        return True
    return cluster.scheduler != Scheduler.slurm and accelerator_is_cuda()


def resolve_precision(precision: Precision | TrainPrecision | str, cuda: bool) -> str:
    """auto: bf16 on GPUs, fp32 on the CPU; bf16, fp32 (and for training fp8) as they are."""
    if precision == Precision.auto:  # a str Enum: equal to its value, as strings are
        return "bf16" if cuda else "fp32"
    return TrainPrecision(precision).value
