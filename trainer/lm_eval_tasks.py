"""lm-evaluation-harness tasks of `eval.tasks`: lm-eval's own by name, or task YAMLs of your own by
path (a file, or a directory of them). Names and paths are checked, and the tasks' datasets loaded,
before the model is: a misspelt name or an offline node fails in seconds, not after the weights load."""

from __future__ import annotations

import difflib
import importlib.metadata
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import datasets
import yaml

from zeroforge.trainer.config import ConfigError
from zeroforge.trainer.inference_model import LoadedModel

log = logging.getLogger("zeroforge")

_EXPECTED = (
    "expected the name of one of lm-eval's tasks, groups or tags (`lm-eval ls tasks` lists them) or the path "
    "of a task YAML of your own: a file (e.g. eval.tasks=[./my_task.yaml]) or a directory of them"
)


@dataclass
class TaskSelection:
    """eval.tasks as lm-eval specs (names, and YAML files by absolute path), each with the entry it
    came from; and the TaskManager that indexed them, which simple_evaluate reuses instead of
    indexing lm-eval's thousands of task YAMLs again."""

    manager: Any
    specs: dict[str, str]


@dataclass
class Tasks:
    """The tasks and groups to run, their datasets loaded: top level only, a group brings its members."""

    selection: TaskSelection
    objects: list[Any]


def is_task_path(entry: str) -> bool:
    """An eval.tasks entry that names a file or directory; anything else is one of lm-eval's names."""
    return "/" in entry or entry.endswith((".yaml", ".yml"))


def select_tasks(entries: list[str]) -> Optional[TaskSelection]:
    """eval.tasks checked without reading a dataset; None (and a warning saying why) where lm-eval's
    HF backend is not installed, since it is an optional extra."""
    try:
        # The HF backend as well: it imports accelerate, which lm-eval does not install by itself.
        from lm_eval.models.huggingface import HFLM  # noqa: F401
        from lm_eval.tasks import TaskManager
    except ModuleNotFoundError as missing:
        log.warning(
            "eval.tasks=%s not run: %s is not installed (pip install 'zeroforge[eval]' installs lm-evaluation-harness "
            "with what its HF backend imports); the held-out perplexity does not need it.",
            entries,
            missing.name,
        )
        return None
    paths = {entry: Path(entry).expanduser().absolute() for entry in entries if is_task_path(entry)}
    for entry, where in paths.items():
        if not where.exists():
            raise ConfigError(f"eval.tasks: no task YAML at {where} (from {entry!r}); {_EXPECTED}.")
    # Directories indexed with lm-eval's own tasks, so that their groups find their members by name.
    manager = TaskManager(include_path=[str(where) for where in paths.values() if where.is_dir()] or None)
    specs: dict[str, str] = {}
    for entry in entries:
        path = paths.get(entry)
        if path is None:
            if entry not in manager.all_tasks:
                close = difflib.get_close_matches(entry, manager.all_tasks, n=5)
                near = f" (the closest: {', '.join(close)})" if close else ""
                version = importlib.metadata.version("lm_eval")
                raise ConfigError(f"eval.tasks: {entry!r} is not a task of lm-evaluation-harness {version}{near}; {_EXPECTED}.")
            specs[entry] = entry
        elif path.is_file():
            specs[str(path)] = entry
        else:
            own = TaskManager(include_defaults=False, include_path=str(path))
            names = own.all_groups + own.all_subtasks
            if not names:
                raise ConfigError(f"eval.tasks: {path} holds no task YAML; expected *.yaml files with a `task:` (or `group:`) config.")
            specs.update(dict.fromkeys(names, entry))
    return TaskSelection(manager, specs)


def load_tasks(selection: TaskSelection) -> Tasks:
    """The selected tasks with their datasets loaded (downloaded where not cached yet)."""
    tasks: dict[str, Any] = {}
    groups: dict[str, Any] = {}
    members: set[str] = set()
    for spec, entry in selection.specs.items():
        try:
            loaded = selection.manager.load([spec])
        except OSError as err:  # ConnectionError where the Hub is out of reach, FileNotFoundError for missing files
            raise ConfigError(
                f"eval.tasks: the dataset of {entry!r} could not be loaded: {err}. Expected its files where the task "
                "says: local files, or the Hugging Face Hub (reachable from here, or already in the datasets cache "
                f"{datasets.config.HF_DATASETS_CACHE}). On a machine without network, run the same evaluation once "
                "where the Hub is reachable with the same HF_HOME (it fills that cache) and set HF_DATASETS_OFFLINE=1 "
                "here, or evaluate a task YAML of your own over local files (README: Benchmark tasks)."
            ) from err
        except (KeyError, ValueError, TypeError, yaml.YAMLError) as err:  # a YAML of the user's that lm-eval cannot make a task of
            if not is_task_path(entry):
                raise
            raise ConfigError(
                f"eval.tasks: lm-evaluation-harness cannot load {spec} (from {entry!r}): {type(err).__name__}: {err}; expected a task YAML: "
                "a `task:` config (dataset, prompt, metric), or a `group:` of lm-eval's tasks or of tasks in a directory that eval.tasks names."
            ) from err
        tasks.update(loaded["tasks"])
        groups.update(loaded.get("groups", {}))
        members.update(name for children in loaded.get("group_map", {}).values() for name in children)
    top = [group for name, group in groups.items() if name not in members]
    return Tasks(selection, top + [task for name, task in tasks.items() if name not in members])


def prepare_tasks(entries: list[str]) -> Optional[Tasks]:
    """eval.tasks checked and loaded, ready to run on a model; None where lm-eval is not installed."""
    selection = select_tasks(entries)
    return None if selection is None else load_tasks(selection)


def run_tasks(loaded: LoadedModel, tasks: Tasks, batch_size: int, limit: Optional[int]) -> dict[str, dict[str, Any]]:
    """The tasks' metrics on the model, through lm-eval's HF adapter: {task or group: {metric,filter: value}}."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    adapter = HFLM(pretrained=loaded.model, tokenizer=loaded.tokenizer, batch_size=batch_size)
    results = lm_eval.simple_evaluate(model=adapter, tasks=tasks.objects, limit=limit, task_manager=tasks.selection.manager)["results"]
    for task, metrics in results.items():
        log.info("%s: %s", task, ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float)))
    return results
