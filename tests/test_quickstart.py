"""The README's main command, end to end: `zeroforge launch` with the defaults."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from tests.conftest import REPO, run_module, train_losses

pytestmark = pytest.mark.slow

PYTHON_WORDS = ("self", "return", "def ", "import", "None", "if ", "for ")


def documented_figures() -> tuple[float, float, float]:
    """The first loss, the final loss and the perplexity the README promises for this command."""
    text = " ".join((REPO / "README.md").read_text().split())
    found = re.search(r"the loss falls from ([\d.]+) to about ([\d.]+), held-out perplexity about ([\d.]+)", text)
    assert found, "README.md no longer states the quickstart's loss and perplexity"
    first, final, perplexity = map(float, found.groups())
    return first, final, perplexity


def test_default_launch_trains_exports_evaluates_and_samples(data_cache: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    # As a user runs it: all cores for the one rank, not the one thread the multi-rank tests use.
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    # Only where things go differ from the defaults: the shared data cache and a temporary run dir.
    result = run_module("zeroforge.launcher", [f"data.cache_dir={data_cache}", f"run.dir={run_dir}"], cwd=REPO, timeout=900, env=env)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]

    # What the README promises, with room for the last digits of floating point across machines,
    # and none for a regression: 10% on the final loss is about 1.5x on perplexity.
    first, final, perplexity = documented_figures()
    losses = train_losses(run_dir)
    assert abs(losses[0] - first) <= 0.05, f"first loss {losses[0]:.3f}, the README says {first}"
    assert losses[-1] <= final * 1.1, f"loss went from {losses[0]:.3f} to {losses[-1]:.3f}, the README says about {final}"
    assert (run_dir / "config.yaml").exists() and (run_dir / "export" / "model.safetensors").exists()

    ppl = re.search(r"held-out loss ([\d.]+) \| perplexity ([\d.]+)", output)
    assert ppl, output[-3000:]
    assert float(ppl.group(2)) <= perplexity * 1.3, f"perplexity {ppl.group(2)}, the README says about {perplexity}"

    # Only what the model wrote: stdout between the sample markers, each minus its prompt.
    samples = [s.strip("\n") for s in result.stdout.split("----- sample -----")[1:]]
    prompts = ["import os\n", "def ", "class "]
    assert len(samples) == len(prompts)
    generated = [s[len(p) :] for s, p in zip(samples, prompts) if s.startswith(p)]
    assert len(generated) == len(prompts), samples
    assert sum(word in " ".join(generated) for word in PYTHON_WORDS) >= 3, generated
