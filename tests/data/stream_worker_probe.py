"""`python -m tests.data.stream_worker_probe <overrides>`: whether a stream's dataloader worker can
tokenize on several threads once the training process has used the tokenizer's batch encoder.

Prints {"parent_started_pool": bool, "before": n, "after": m}: whether this process's validation
windows started the tokenizer's thread pool (the condition under which the library turns it off in a
forked child), and the worker's thread count before and after one batch encode (the pool starts at
its first use, unless the library turned it off in the worker).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Iterator

import torch

from zeroforge.data import stream
from zeroforge.trainer.config import compose_config


class ProbeSteps(stream._StreamSteps):
    """Yields the worker's thread counts around a batch encode instead of windows."""

    def __iter__(self) -> Iterator[tuple[torch.Tensor, str]]:
        before = len(os.listdir("/proc/self/task"))
        self.tokenizer.backend_tokenizer.encode_batch_fast(["alpha beta gamma delta"] * 64)
        after = len(os.listdir("/proc/self/task"))
        while True:
            yield torch.zeros(1), json.dumps({"before": before, "after": after})


def main() -> None:
    data = stream.StreamData(compose_config(sys.argv[1:]).data)
    threads = len(os.listdir("/proc/self/task"))
    data.validation_batches(batch_size=2, num_batches=1)  # in this process, as the trainer does first
    parent_started_pool = len(os.listdir("/proc/self/task")) > threads
    stream._StreamSteps = ProbeSteps
    loader = data.loader(seed=0, global_batch=2, micro_batch=2, dp_rank=0, dp_size=1)
    print(json.dumps({"parent_started_pool": parent_started_pool, **json.loads(next(loader._start())[1])}))


if __name__ == "__main__":
    # As the module's own name: the spawned worker unpickles ProbeSteps by it, never from __main__.
    from tests.data import stream_worker_probe

    stream_worker_probe.main()
