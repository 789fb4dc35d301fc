"""The run's resumable state and the config records a run writes."""

from __future__ import annotations

import torch

from zeroforge.data.config import plain
from zeroforge.trainer.config import as_config, compose_config
from zeroforge.trainer.train_state import TrainState, rng_state, set_rng_state


def test_a_train_state_round_trips_through_a_client_state_with_more_keys() -> None:
    state = TrainState(step=7, tokens=7000, data={"consumed_samples": 56, "seed": 1}, rng=[rng_state()], skipped_steps=2)
    client_state = {**state.state_dict(), "tokenizer_hash": "abc", "world_size": 1, "config": {}}
    assert TrainState.from_state_dict(client_state) == state


def test_a_checkpoint_without_skipped_steps_loads_with_none_skipped() -> None:
    older = {"step": 3, "tokens": 300, "data": {"consumed_samples": 24}, "rng": []}
    assert TrainState.from_state_dict(older) == TrainState(step=3, tokens=300, data={"consumed_samples": 24}, rng=[], skipped_steps=0)


def test_restored_rng_states_repeat_the_same_draws() -> None:
    saved = rng_state()
    first = torch.rand(3)
    set_rng_state(saved)
    assert torch.equal(torch.rand(3), first)


def test_the_dataclass_config_records_a_users_dollar_text_as_text() -> None:
    """A prompt the user escaped (`\\${HOME}`) is text once composed; the record of the typed
    config keeps it, where OmegaConf would read it as an interpolation again."""
    cfg = compose_config([])
    cfg.eval.sample_prompts = ["echo \\${HOME}", "def "]
    assert plain(as_config(cfg))["eval"]["sample_prompts"] == ["echo ${HOME}", "def "]
    assert plain(as_config(cfg)) == plain(cfg)
