"""ZeRO-3 with partitioned construction: while the model is built, each rank materialises only its
shard of the parameters (deepspeed.zero.Init), and DeepSpeed's start-up holds no more than it must.

Three things stand between transformers 5 and deepspeed.zero.Init (deepspeed 0.19.8, torch 2.13),
each fixed at its cause here:

1. The crash ("Signature mismatch between <function get_new_tensor_fn_for_dtype.<locals>.new_tensor>
   and <function tensor_pynew>"). zero.Init replaces torch.Tensor.__new__ with a Python function
   `new_tensor(cls, *args, **kwargs)` (deepspeed/runtime/zero/partition_parameters.py,
   _add_tensor_creation_wrappers). Inside the context, from_config lazily imports the model's
   module, whose imports (generation/utils.py -> masking_utils.py) import torch._dynamo for the
   first time; torch/_dynamo/polyfills/tensor.py then registers `@substitute_in_graph(torch.Tensor.__new__)`,
   and torch/_dynamo/decorators.py checks that the original's signature matches the polyfill's: the
   real __new__ is a builtin (the check is skipped), DeepSpeed's replacement is not and has another
   signature, so the registration raises. Nothing is traced: it is an import-time registration that
   fails only when dynamo is first imported while zero.Init is active. Importing torch._dynamo
   before entering zero.Init registers the polyfill against the real __new__.
2. Silently wrong initial weights. transformers' post_init -> initialize_weights ->
   smart_apply(_init_weights) runs after zero.Init has partitioned every leaf module (each
   parameter's .data is empty), so every init.normal_ writes nothing and torch's constructor
   defaults remain (an embedding of std 1.0 instead of 0.02). smart_apply is not Module.apply, so
   DeepSpeed's own gathering apply never runs. Here initialize_weights is replaced, for the
   construction only, by the same walk with each module's parameters gathered around its
   _init_weights; every rank draws the same numbers (their RNG streams stay in step) and rank 0's
   are kept. It runs exactly where the plain path runs it, so the same seed gives the same weights
   as building the whole model (on the CPU; on a GPU the draws come from the GPU's generator).
3. RoPE's inv_freq in bf16: zero.Init's torch.arange wrapper casts it; transformers'
   prevent_arange_dtype_change keeps it fp32, as transformers' own ZeRO-3 path does.

deepspeed.initialize then allocates, for a ZeRO-3 engine without offload (on the CPU, measured phase
by phase; "shard" is a rank's part of the weights): the flat parameter buffer (the shard moved, not
copied); the fp32 master (in fp32 a copy of the shard that DeepSpeed means to share, in bf16 two fp32
copies at once of which it keeps one); a zeroed fp32 gradient buffer for the optimizer's state
initialisation (transient); the gradient partition; the reduction bucket (reserved, untouched until
the backward); and, while registering gradient hooks, every parameter gathered in full one at a time
(transient, twice the largest parameter on gloo). zero3_startup() removes the four that are waste:
see there (the bf16 pair alone took 110M parameters on 2 ranks from 1014 to 909 MiB per rank).
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import logging
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
from transformers import PreTrainedModel

from zeroforge.trainer.config import ConfigError, DeepSpeedConfig, ModelConfig, OptimConfig
from zeroforge.trainer.topology import Topology

log = logging.getLogger("zeroforge")


def full_shape(param: torch.Tensor) -> torch.Size:
    """A parameter's shape, also when ZeRO-3 partitioned it (its .shape is then (0,))."""
    return getattr(param, "ds_shape", param.shape)


def full_numel(param: torch.Tensor) -> int:
    return getattr(param, "ds_numel", param.numel())


@torch.no_grad()
def _gathered_initialize_weights(self: PreTrainedModel) -> None:
    """PreTrainedModel.initialize_weights with each module's parameters gathered (2. above)."""
    import deepspeed
    from transformers import initialization

    is_custom_code = self.is_custom_code()

    def visit(module: torch.nn.Module, init: Callable[[torch.nn.Module, bool], None]) -> None:
        for child in module.children():
            visit(child, child._initialize_weights if isinstance(child, PreTrainedModel) else init)
        # A module's _init_weights may write its direct children's parameters too.
        params = list(module.parameters(recurse=False))
        for child in module.children():
            if not isinstance(child, PreTrainedModel):
                params.extend(child.parameters(recurse=False))
        with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
            init(module, is_custom_code)

    with initialization.guard_torch_init_functions():
        visit(self, self._initialize_weights)


def _do_nothing(*args: Any, **kwargs: Any) -> None:
    return None


@contextlib.contextmanager
def _partitioned_construction(ds_config: dict[str, Any], initialize: bool) -> Iterator[None]:
    import deepspeed
    from deepspeed.accelerator import get_accelerator
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled, prevent_arange_dtype_change

    from zeroforge.trainer.host_memory import keep_large_allocations_returnable

    importlib.import_module("torch._dynamo")  # 1. above: before zero.Init patches torch.Tensor.__new__
    if is_deepspeed_zero3_enabled():
        raise RuntimeError(
            "a transformers HfDeepSpeedConfig with ZeRO-3 is alive in this process: from_config would enter "
            "its own zero.Init inside ours; zeroforge builds partitioned models itself"
        )
    if get_accelerator().device_name() == "cpu":
        keep_large_allocations_returnable()
    original = PreTrainedModel.initialize_weights
    # model.init_from: the weights are loaded right after, so nothing is gathered to initialise them
    # (post_init still ties the weights that are tied).
    PreTrainedModel.initialize_weights = _gathered_initialize_weights if initialize else _do_nothing  # type: ignore[method-assign]
    try:
        with prevent_arange_dtype_change(), deepspeed.zero.Init(config_dict_or_path=ds_config):
            yield
    finally:
        PreTrainedModel.initialize_weights = original  # type: ignore[method-assign]


def build_partitioned(build: Callable[[], PreTrainedModel], ds_config: dict[str, Any], initialize: bool = True) -> PreTrainedModel:
    """build() under zero.Init: each rank holds its shard of every parameter, never the whole model.
    initialize=False leaves the weights as the constructors made them, for a checkpoint to fill."""
    with _partitioned_construction(ds_config, initialize):
        model = build()
    if initialize and type(model).initialize_weights is not PreTrainedModel.initialize_weights:
        raise RuntimeError(
            f"{type(model).__name__} overrides initialize_weights, which partitioned construction cannot "
            "gather for; set deepspeed.zero_init=false to build the whole model on every rank instead"
        )
    return model


@contextlib.contextmanager
def zero3_startup() -> Iterator[None]:
    """Around deepspeed.initialize of a ZeRO-3 engine: four allocations that hold nothing are skipped.

    - The fp32 master copy when training in fp32. DeepSpeed means to share the flat parameter
      partition as its fp32 master when both have the same dtype and device
      (stage3.py, _create_fp32_partitions: "we don't need another copy of the weights"), but
      compares `tensor.device == self.device` with self.device the accelerator's device *name*, a
      str, and torch.device('cpu') == 'cpu' is False: the branch never runs and a clone is made.
      Passing the same device as a torch.device lets it run. In bf16 the dtypes differ and the
      master is a real fp32 copy, as it must be; with the optimizer offloaded self.device is
      DeepSpeed's offload enum and is left alone.
    - The second fp32 copy of the shard when training in bf16: _create_fp32_partitions makes the
      master as `flat.to(device, dtype=fp32)` and then `.clone()` of that, so two fp32 copies of
      the shard exist at once (4 bytes a parameter / ranks too many: the bf16 start-up's high point
      on the CPU and one more fp32 shard of device memory on a GPU). Handing it the flat shards
      already converted lets its sharing branch keep that one conversion as the master (the
      bf16 flat buffer itself is left as it was); offloaded or swapped optimizers keep their path.
    - The zeroed fp32 buffer of one whole shard that initialize_optimizer_states sets as every
      sub-group's .grad and drops again at its end (`group.grad = None` without an offloaded
      optimizer). Only its swapping (NVMe), offloading, Adagrad and Muon paths use it in between;
      otherwise the call changes nothing but the peak, so it is skipped exactly then (and never where
      DeepSpeed's version of it runs an optimizer step). With the copy above gone, it was the bf16
      start-up's high point on the CPU.
    - Gathering every parameter to register its gradient hook (create_reduce_and_remove_grad_hooks
      calls param.all_gather() and param.partition() around register_grad_hook). That was needed
      when the hook went on the AccumulateGrad node of param.expand_as(param); with torch >= 2.1,
      register_grad_hook uses register_post_accumulate_grad_hook, which needs no data, and each
      parameter is partitioned again right after, so the gathers only cost: twice the largest
      parameter at the highest point of start-up on the CPU (gloo's output and the copy into
      the parameter), one layer of device memory and an all-gather of the whole model on a GPU.
    """
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3 as Stage3
    from deepspeed.utils.torch import required_torch_version

    setup, hooks = Stage3._setup_for_real_optimizer, Stage3.create_reduce_and_remove_grad_hooks
    create_masters, init_states = Stage3._create_fp32_partitions, Stage3.initialize_optimizer_states
    # Older DeepSpeed releases ran an optimizer step on that buffer to create Adam's state at
    # start-up; there the call is not empty and always runs.
    try:
        steps_to_create_states = "_optimizer_step" in inspect.getsource(init_states)
    except (OSError, TypeError):
        steps_to_create_states = True

    def setup_sharing_the_fp32_master(self: Stage3) -> None:
        if not self.offload_optimizer and type(self.device) is str:
            self.device = torch.device(self.device)
        setup(self)

    def offloaded_or_swapped(self: Stage3) -> bool:
        """The optimizer offloaded or swapped, or parameters swapped to NVMe: DeepSpeed's own path."""
        return self.offload_optimizer or self.swap_optimizer or any(flat is None for flat in self.fp16_partitioned_groups_flat)

    def masters_in_one_copy(self: Stage3) -> None:
        lp_flat, dtype = self.fp16_partitioned_groups_flat, getattr(self, "master_weights_and_grads_dtype", torch.float32)
        if offloaded_or_swapped(self) or not isinstance(self.device, torch.device) or any(flat.dtype == dtype for flat in lp_flat):
            create_masters(self)
            return
        self.fp16_partitioned_groups_flat = [flat.to(self.device, dtype=dtype) for flat in lp_flat]
        try:
            create_masters(self)
        finally:
            self.fp16_partitioned_groups_flat = lp_flat

    def states_without_an_unused_buffer(self: Stage3) -> None:
        if (
            steps_to_create_states
            or offloaded_or_swapped(self)
            or getattr(self, "use_muon", False)
            or isinstance(self.optimizer, torch.optim.Adagrad)
        ):
            init_states(self)

    def hooks_without_gathering(self: Stage3) -> None:
        params = [p for group in self.fp16_groups for p in group]
        saved = [(p, p.all_gather, p.partition) for p in params]
        for p in params:
            p.all_gather = p.partition = _do_nothing
        try:
            hooks(self)
        finally:
            for p, gather, partition in saved:
                p.all_gather, p.partition = gather, partition

    Stage3._setup_for_real_optimizer = setup_sharing_the_fp32_master
    Stage3._create_fp32_partitions = masters_in_one_copy
    Stage3.initialize_optimizer_states = states_without_an_unused_buffer
    if required_torch_version(min_version=2.1):
        Stage3.create_reduce_and_remove_grad_hooks = hooks_without_gathering
    try:
        yield
    finally:
        Stage3._setup_for_real_optimizer, Stage3.create_reduce_and_remove_grad_hooks = setup, hooks
        Stage3._create_fp32_partitions, Stage3.initialize_optimizer_states = create_masters, init_states


def _local_model_dir(source: str) -> Path:
    """model.init_from as a directory: itself, or the hub snapshot of its weights and config."""
    if Path(source).is_dir():
        return Path(source)
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(source, allow_patterns=["*.json", "*.safetensors"]))


@torch.no_grad()
def load_hf_weights(model: PreTrainedModel, source: str) -> None:
    """Fill a partitioned model with the safetensors weights of an HF model directory (or hub
    name): every rank reads only its own slice of each parameter, so no rank ever holds a whole
    weight, let alone the model. Every tensor is checked against the model before any is read."""
    from zeroforge.trainer.safetensors_io import read_flat_range, tensor_shapes, weight_files

    files = weight_files(_local_model_dir(source))
    shapes = tensor_shapes(files)
    # A tied weight once, under its first name; Any: DeepSpeed gives each its ds_* attributes.
    params: dict[str, Any] = dict(model.named_parameters())
    buffers = {name: b for name, b in model.named_buffers() if name in files}
    problems = [f"{name} is missing" for name in params if name not in shapes]
    problems += [
        f"{name}: {source} has {list(shapes[name])}, the model has {list(full_shape(t))}"
        for name, t in [*params.items(), *buffers.items()]
        if name in shapes and tuple(shapes[name]) != tuple(full_shape(t))
    ]
    if problems:
        raise ConfigError(f"model.init_from={source}: its weights do not fit the model: " + "; ".join(problems) + ".")
    for name, param in params.items():
        shard = param.ds_tensor
        start = param.ds_zero_partition_rank * shard.ds_numel
        end = min(start + shard.ds_numel, param.ds_numel)
        if start < end:
            shard.narrow(0, 0, end - start).copy_(read_flat_range(files[name], name, start, end))
    for name, buffer in buffers.items():
        buffer.copy_(read_flat_range(files[name], name, 0, buffer.numel()).view(buffer.shape))
    log.info("loaded %d tensors from %s, each rank its own slice", len(params) + len(buffers), source)


def build_for_training(
    *, model_config: ModelConfig, optim: OptimConfig, deepspeed: DeepSpeedConfig, topology: Topology, vocab_size: int, eos_id: Optional[int]
) -> PreTrainedModel:
    """The model train() wraps: whole on every rank (ZeRO 0-2, or deepspeed.zero_init=false), or
    partitioned while it is built (ZeRO-3), with model.init_from's weights loaded shard by shard."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from zeroforge.trainer.deepspeed_config import deepspeed_config
    from zeroforge.trainer.model import build_model

    m = model_config
    if deepspeed.stage != 3 or not deepspeed.zero_init:
        return build_model(m, vocab_size, eos_id)
    ds_config = deepspeed_config(optim=optim, deepspeed=deepspeed, topology=topology)
    if not m.init_from:
        return build_partitioned(lambda: build_model(m, vocab_size, eos_id), ds_config)
    log.info(
        "weights from %s (model.init_from), each rank reading its own shard; the optimizer and the data position start fresh", m.init_from
    )
    config = AutoConfig.from_pretrained(m.init_from)
    model = build_partitioned(
        lambda: AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation=m.attn_implementation),
        ds_config,
        initialize=False,
    )
    load_hf_weights(model, m.init_from)
    return model
