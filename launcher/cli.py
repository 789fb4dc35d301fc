"""The `zeroforge` command: `zeroforge <command> [hydra options] [overrides]` runs that entry
point exactly as `python -m <its module>` would."""

from __future__ import annotations

import runpy
import sys
from typing import Optional, Sequence

COMMANDS = {
    "launch": ("zeroforge.launcher", "validate, prepare, train (torchrun or sbatch), export, evaluate, sample"),
    "train": ("zeroforge.trainer.train", "the trainer alone (under torchrun for several processes)"),
    "prepare": ("zeroforge.launcher.prepare", "tokenize and shard the data ahead of time"),
    "universal": ("zeroforge.launcher.universal", "convert the checkpoint a run resumes on another world size (launch does it)"),
    "plan": ("zeroforge.launcher.plan", "the pre-flight memory and time plan"),
    "evaluate": ("zeroforge.trainer.evaluate", "held-out loss and perplexity of an export or a checkpoint"),
    "generate": ("zeroforge.trainer.generate", "samples from an export or a checkpoint"),
    "export": ("zeroforge.trainer.export", "a checkpoint as a Hugging Face export (checkpoint=<dir>)"),
    "report": ("zeroforge.trainer.report", "a run's curves and summary"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: zeroforge <command> [--config-dir DIR] [overrides ...]", "", "commands:"]
    lines += [f"  {name:<{width}}  {about}" for name, (_, about) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(usage())
        sys.exit(0 if args else 2)
    if args[0] not in COMMANDS:
        print(f"zeroforge: unknown command {args[0]!r}; expected one of {', '.join(COMMANDS)}.\n\n{usage()}", file=sys.stderr)
        sys.exit(2)
    module = COMMANDS[args[0]][0]
    sys.argv = [f"zeroforge {args[0]}", *args[1:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
