"""FP8 training (train.precision=fp8): torchao's float8 linear layers in the decoder.

The run is a bf16 run (DeepSpeed's bf16 master weights and optimizer states, the embeddings, norms
and output layer in bf16) whose decoder linear layers compute their three matmuls in float8 with
dynamic scales (torchao.float8: tensorwise or rowwise). The swap keeps each layer's parameters and
names, so checkpoints and the export are the plain model's; nothing of torchao is saved.

Refused before start: fp8 without torchao, on GPUs below compute capability 8.9 (no FP8 tensor
cores), and mxfp8 (torchao 0.18 trains MX formats only in MoE grouped GEMMs, not dense layers).
"""

from __future__ import annotations

import importlib.util
import logging
import re
from types import ModuleType
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:  # torch is imported where it is used: validate() imports this module, and launches import it
    import torch

log = logging.getLogger("zeroforge")

# FP8 tensor cores: Ada (8.9), Hopper (9.0), Blackwell (10.0 and up).
MIN_CAPABILITY = 8.9
# The FP8 GEMM (torch._scaled_mm) needs both dimensions of the weight divisible by 16.
DIM_MULTIPLE = 16


def fp8_problems(recipe: str, cuda: bool, capability: Optional[float]) -> list[str]:
    """Why train.precision=fp8 cannot run here (empty when it can). `capability`: the job's GPUs'
    compute capability where known (None: not known where the job is launched; the ranks ask)."""
    problems = []
    if importlib.util.find_spec("torchao") is None:
        problems.append(
            "train.precision=fp8 needs torchao's float8 training, which is not installed: "
            "pip install 'zeroforge[fp8]' (or pip install torchao); or train.precision=bf16"
        )
    if cuda and capability is not None and capability < MIN_CAPABILITY:
        problems.append(
            f"train.precision=fp8 (fp8 recipe {recipe}) needs FP8 tensor cores, compute capability "
            f">= {MIN_CAPABILITY} (H100, H200, B200, L40S), found {capability} on this job's GPUs; use train.precision=bf16"
        )
    return problems


def gpu_capability() -> Optional[float]:
    """This machine's GPU's compute capability as major.minor (None without a CUDA GPU)."""
    import torch

    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability()
    return float(f"{major}.{minor}")


def _import_float8() -> ModuleType:
    """torchao.float8; on the CPU its CUDA kernels' libraries cannot load, which it warns about
    at import: those warnings are expected there and are held back."""
    import torch

    torchao_log = logging.getLogger("torchao")
    level = torchao_log.level
    if not torch.cuda.is_available():
        torchao_log.setLevel(logging.ERROR)
    try:
        import torchao.float8 as float8
    finally:
        torchao_log.setLevel(level)
    return float8


def convertible(module: torch.nn.Module, fqn: str, skip: tuple[str, ...]) -> bool:
    """A decoder linear layer the FP8 GEMM accepts: not one of `skip` (the output layer), and
    both dimensions multiples of 16."""
    import torch

    if type(module) is not torch.nn.Linear or fqn in skip:
        return False
    return module.in_features % DIM_MULTIPLE == 0 and module.out_features % DIM_MULTIPLE == 0


def _output_layer(model: torch.nn.Module) -> tuple[str, ...]:
    """The name of the model's output layer (transformers' get_output_embeddings), if any."""
    get_output = getattr(model, "get_output_embeddings", None)
    output = get_output() if callable(get_output) else None
    return tuple(name for name, module in model.named_modules() if module is output)


def convert_to_fp8(model: torch.nn.Module, recipe: str) -> list[str]:
    """Swap the decoder's linear layers for torchao's Float8Linear (same parameters, same names);
    the names of the converted layers. The embeddings are not linear layers; the output layer
    stays bf16 (its logits feed the loss, as torchtitan and Megatron keep it)."""
    float8 = _import_float8()
    skip = _output_layer(model)
    converted = [name for name, module in model.named_modules() if convertible(module, name, skip)]
    float8.convert_to_float8_training(
        model,
        config=float8.Float8LinearConfig.from_recipe_name(recipe),
        module_filter_fn=lambda module, fqn: convertible(module, fqn, skip),
    )
    return converted


def left_out(model: torch.nn.Module, converted: list[str]) -> list[str]:
    """The model's linear layers that stay in bf16, each with why."""
    import torch

    done, output = set(converted), _output_layer(model)
    found = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name not in done:
            why = "the output layer" if name in output else f"{module.out_features}x{module.in_features}, not multiples of 16"
            found.append(f"{name} ({why})")
    return found


def summarise(names: list[str]) -> str:
    """Layer names with the layer index folded: `model.layers.*.mlp.up_proj x 32`."""
    counts: dict[str, int] = {}
    for name in names:
        folded = re.sub(r"\.\d+\.", ".*.", name)
        counts[folded] = counts.get(folded, 0) + 1
    return ", ".join(f"{name} x {n}" if n > 1 else name for name, n in counts.items())


def apply_fp8(model: torch.nn.Module, recipe: str, device: str, compiled: bool) -> list[str]:
    """train.precision=fp8 on `model` (before DeepSpeed wraps it), said in the start-up log."""
    converted = convert_to_fp8(model, recipe)
    log.info("fp8 (%s recipe): %d linear layers in float8: %s", recipe, len(converted), summarise(converted))
    kept = left_out(model, converted)
    if kept:
        log.info("fp8: kept in bf16: %s", summarise(kept))
    log.info("fp8: MFU is reported against the bf16 dense peak (cluster.peak_tflops), as torchtitan and Megatron report FP8 runs")
    if device == "cpu":
        log.warning("fp8 on the CPU: the numerics of FP8 training, with no speed (torch's CPU float8 matmul is emulated)")
    elif not compiled:
        log.warning(
            "fp8 with model.compile=off: each float8 cast and scale runs as kernels of its own, which can cost more "
            "than the FP8 matmuls save; model.compile=regional fuses them (torchao's own figures are compiled)"
        )
    return converted
