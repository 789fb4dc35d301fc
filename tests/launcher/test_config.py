"""Every config group composes, and a bad config is refused with the numbers that are wrong."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.errors import ConfigCompositionException
from transformers import AutoModelForCausalLM

from zeroforge.launcher.model_shape import model_shape
from zeroforge.trainer.config import CONF_DIR, ConfigError, compose_config
from zeroforge.trainer.deepspeed_config import deepspeed_config
from zeroforge.trainer.model import hf_config
from zeroforge.trainer.validate import job_topology, validate

GROUPS = ["model", "data", "optim", "deepspeed", "cluster", "logging", "experiment"]


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (Path(CONF_DIR) / group).glob("*.yaml"))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in _options(g)])
def test_every_group_option_composes_and_validates(group: str, option: str) -> None:
    cfg = compose_config([f"{group}={option}"])
    # An experiment names the cluster it is for: it is validated for that job.
    plan = job_topology(cfg) if group == "experiment" else validate(cfg, world_size=1, cuda=False)
    assert plan.grad_accum * cfg.train.micro_batch_size == cfg.train.global_batch_size
    if group == "experiment":
        assert cfg.run.name == option
    else:
        assert cfg[group].name == option


def test_required_keys_exist() -> None:
    cfg = compose_config()
    for key in [
        "run.dir",
        "seed",
        "train.steps",
        "train.micro_batch_size",
        "train.global_batch_size",
        "data.seq_len",
        "logging.every",
        "checkpoint.every",
        "eval.every",
        "cluster.nodes",
        "cluster.nproc_per_node",
    ]:
        node = cfg
        for part in key.split("."):
            node = node[part]
        assert node is not None, key
    assert cfg.run.dir.startswith("runs/")


def test_unknown_key_is_an_error() -> None:
    with pytest.raises(ConfigCompositionException, match="stepz"):
        compose_config(["train.stepz=3"])


def test_mistyped_value_is_an_error() -> None:
    with pytest.raises(ConfigCompositionException, match="steps"):
        compose_config(["train.steps=many"])
    with pytest.raises(ConfigCompositionException, match="schedule"):
        compose_config(["optim.schedule=linearr"])


def test_grad_accum_is_derived_from_world_size() -> None:
    cfg = compose_config(["train.global_batch_size=32", "train.micro_batch_size=4"])
    assert validate(cfg, world_size=1, cuda=False).grad_accum == 8
    assert validate(cfg, world_size=2, cuda=False).grad_accum == 4
    assert validate(cfg, world_size=8, cuda=False).grad_accum == 1


def test_indivisible_global_batch_names_the_numbers() -> None:
    cfg = compose_config(["train.global_batch_size=10", "train.micro_batch_size=4"])
    with pytest.raises(ConfigError) as err:
        validate(cfg, world_size=2, cuda=False)
    message = str(err.value)
    assert "train.global_batch_size=10" in message and "(4)" in message and "(2)" in message and "= 8" in message


def test_sequence_longer_than_model_is_refused() -> None:
    cfg = compose_config(["data.seq_len=4096"])
    with pytest.raises(ConfigError, match=r"data.seq_len=4096 .* model.max_position_embeddings=1024"):
        validate(cfg, world_size=1, cuda=False)


def test_nonexistent_zero_stage_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"deepspeed.stage must be one of \[0, 1, 2, 3\], found 5"):
        validate(compose_config(["deepspeed.stage=5"]), world_size=1, cuda=False)
    with pytest.raises(ConfigCompositionException, match="zero5"):
        compose_config(["deepspeed=zero5"])


def test_all_problems_are_reported_together() -> None:
    cfg = compose_config(["deepspeed.stage=7", "data.seq_len=99999", "logging.every=0"])
    with pytest.raises(ConfigError) as err:
        validate(cfg, world_size=1, cuda=False)
    assert "deepspeed.stage must be one of [0, 1, 2, 3], found 7" in str(err.value)
    assert "logging.every" in str(err.value)


def test_precision_follows_the_device() -> None:
    cfg = compose_config()
    assert validate(cfg, 1, cuda=True).precision == "bf16"
    assert validate(cfg, 1, cuda=False).precision == "fp32"
    assert validate(compose_config(["train.precision=fp32"]), 1, cuda=True).precision == "fp32"


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_deepspeed_config_is_generated_from_the_hydra_config(stage: int) -> None:
    cfg = compose_config(
        [f"deepspeed=zero{stage}", "train.global_batch_size=64", "train.micro_batch_size=4", "optim.lr=1e-4", "optim.grad_clip=0.5"]
    )
    plan = validate(cfg, world_size=4, cuda=True)
    ds = deepspeed_config(optim=cfg.optim, deepspeed=cfg.deepspeed, topology=plan)
    assert ds["train_batch_size"] == 64
    assert ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["gradient_accumulation_steps"] == 4
    assert ds["train_batch_size"] == ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * 4
    assert ds["zero_optimization"]["stage"] == stage
    assert ds["bf16"]["enabled"] is True
    assert ds["gradient_clipping"] == 0.5
    assert "optimizer" not in ds  # zeroforge's own AdamW (trainer/faults.py), built from cfg.optim


def test_offload_config() -> None:
    cfg = compose_config(["deepspeed=zero3-offload"])
    ds = deepspeed_config(optim=cfg.optim, deepspeed=cfg.deepspeed, topology=validate(cfg, 1, cuda=False))
    assert ds["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["optimizer"]["params"]["lr"] == cfg.optim.lr  # DeepSpeed's CPU Adam, from the same config
    with pytest.raises(ConfigError, match="offload_params needs ZeRO stage 3"):
        validate(compose_config(["deepspeed=zero2", "deepspeed.offload_params=true"]), 1, cuda=False)


def test_unknown_model_type_is_refused_before_anything_runs() -> None:
    with pytest.raises(ConfigError, match="model.model_type='no-such-model'"):
        validate(compose_config(["model.model_type=no-such-model"]), 1, cuda=False)


def test_model_fields_that_do_not_reach_the_hf_config_are_named() -> None:
    # GPT-2 calls its context n_positions; our max_position_embeddings reaches it through the
    # attribute map, so gpt2 composes, and the check would catch a field that silently vanished.
    plan = validate(compose_config(["model.model_type=gpt2"]), 1, cuda=False)
    assert plan.dp_size == 1
    with pytest.raises(ConfigError, match="logging.level must be one of .*, found 'LOUD'"):
        validate(compose_config(["logging.level=LOUD"]), 1, cuda=False)


def test_a_model_field_that_reaches_the_config_is_what_the_plan_counts() -> None:
    cfg = compose_config(["model.intermediate_size=1000"])  # llama's config has intermediate_size itself
    validate(cfg, 1, cuda=False)
    assert hf_config(cfg.model, 64).intermediate_size == 1000
    assert model_shape(cfg.model, cfg.data).intermediate == 1000


def test_gpt2_takes_the_model_fields_under_its_own_names() -> None:
    # Its attribute_map makes hidden_size n_embd and num_heads n_head; its MLP width is n_inner.
    fields = ["model.hidden_size=96", "model.num_heads=3", "model.num_kv_heads=3", "model.intermediate_size=200"]
    cfg = compose_config(["model.model_type=gpt2", *fields])
    validate(cfg, 1, cuda=False)
    config = hf_config(cfg.model, 64)
    assert (config.n_embd, config.n_head, config.n_inner) == (96, 3, 200)
    assert "num_key_value_heads" not in config.to_dict()  # not kept where GPT-2 never reads it
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert model.transformer.h[0].mlp.c_fc.nf == 200
    shape = model_shape(cfg.model, cfg.data)
    assert (shape.hidden, shape.heads, shape.kv_hidden, shape.intermediate) == (96, 3, 96, 200)


@pytest.mark.parametrize(
    "model_type,expected",
    [
        ("bloom", "model.max_position_embeddings=1024 does not reach the bloom config: BloomConfig has no max_position_embeddings"),
        ("falcon", "model.num_kv_heads=4 does not reach the falcon config: its num_key_value_heads is 1"),  # multi-query
    ],
)
def test_a_model_field_the_config_does_not_take_is_refused_with_what_it_has(model_type: str, expected: str) -> None:
    with pytest.raises(ConfigError) as err:
        validate(compose_config([f"model.model_type={model_type}"]), 1, cuda=False)
    assert expected in str(err.value)
