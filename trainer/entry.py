"""What every entry point shares: a user's mistake ends in one clear paragraph and exit code 2,
never a traceback, whether Hydra finds it while composing or zeroforge while checking or running."""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from typing import Callable, NoReturn, Optional, Sequence, TypeVar

import hydra
import yaml
from hydra.errors import HydraException
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from zeroforge.data.errors import DataError
from zeroforge.trainer.config import CONF_DIR, ConfigError
from zeroforge.trainer.distributed import StartupAborted
from zeroforge.trainer.faults import TrainingDiverged
from zeroforge.trainer.preemption import REQUEUE_EXIT_CODE, Preempted
from zeroforge.trainer.validate import check_fields

T = TypeVar("T")

USER_ERROR_EXIT_CODE = 2

# Hydra's options that take a value as the next argument (`--config-dir DIR`); `--opt=value` is one.
_VALUE_OPTIONS = {
    "--config-path",
    "-cp",
    "--config-name",
    "-cn",
    "--config-dir",
    "-cd",
    "--cfg",
    "-c",
    "--package",
    "-p",
    "--experimental-rerun",
}
_INFO_TOPICS = {"all", "config", "defaults", "defaults-tree", "plugins", "searchpath"}


def user_error(kind: str, message: object) -> NoReturn:
    print(f"zeroforge: {kind}: {message}", file=sys.stderr, flush=True)
    sys.exit(USER_ERROR_EXIT_CODE)


def run_entry_point(fn: Callable[[], T]) -> T:
    try:
        return fn()
    except (ConfigError, DataError, StartupAborted) as err:
        user_error(
            "configuration error" if isinstance(err, ConfigError) else "data error" if isinstance(err, DataError) else "stopped", err
        )
    except TrainingDiverged as diverged:
        print(f"zeroforge: training stopped: {diverged}", file=sys.stderr, flush=True)
        sys.exit(1)
    except Preempted as stopped:
        print(f"zeroforge: {stopped} (exit code {REQUEUE_EXIT_CODE}: requeue me)", file=sys.stderr, flush=True)
        sys.exit(REQUEUE_EXIT_CODE)


def _from_here(path: str) -> str:
    """A relative --config-path as the user means it: from the working directory (Hydra would
    take it from zeroforge's own package directory)."""
    return path if "://" in path else str(Path(path).absolute())


def hydra_arguments(args: Sequence[str]) -> list[str]:
    """Hydra's options first, then the overrides: its parser refuses an option after an override
    (`experiment=mine --config-dir ./myconf`), which scripts that prepend overrides produce."""
    options: list[str] = []
    overrides: list[str] = []
    args = list(args)
    while args:
        arg = args.pop(0)
        if not arg.startswith("-") or arg == "-":
            overrides.append(arg)
            continue
        name, _, value = arg.partition("=")
        if name in ("--config-path", "-cp") and value:
            arg = f"{name}={_from_here(value)}"
        options.append(arg)
        takes_value = arg in _VALUE_OPTIONS or (arg in ("--info", "-i") and args and args[0] in _INFO_TOPICS)
        if takes_value and args:
            value = args.pop(0)
            options.append(_from_here(value) if arg in ("--config-path", "-cp") else value)
    return options + overrides


def entry_point(task: Callable[[DictConfig], Optional[int]]) -> Callable[[], None]:
    """The `@hydra.main` of every zeroforge command: it composes conf/ (and any --config-dir,
    --config-path/--config-name or hydra.searchpath the user gives), refuses a field out of its
    rule before the command does anything, runs `task(cfg)` through run_entry_point, and exits
    with the task's return code when it is not 0."""
    started = False

    @functools.wraps(task)
    def hydra_task(cfg: DictConfig) -> None:
        nonlocal started
        started = True

        def checked() -> Optional[int]:
            broken = check_fields(cfg)
            if broken:
                raise ConfigError("; ".join(broken.values()) + ".")
            return task(cfg)

        code = run_entry_point(checked)
        if code:
            sys.exit(code)

    hydra_main = hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")(hydra_task)

    def main() -> None:
        sys.argv = [sys.argv[0], *hydra_arguments(sys.argv[1:])]
        # Hydra then raises its composition errors instead of printing them and exiting with 1.
        os.environ["HYDRA_FULL_ERROR"] = "1"
        try:
            hydra_main()
        except (HydraException, OmegaConfBaseException, yaml.YAMLError) as err:
            if started:
                raise  # not the user's config: a bug, which keeps its traceback
            cause = f" ({err.__cause__})" if err.__cause__ is not None else ""
            user_error("configuration error", " ".join(f"{err}{cause}".split()))

    return main
