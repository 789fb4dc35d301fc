"""`python -m tests.data.stream_worker_probe <overrides>`: whether a stream's dataloader worker can
tokenize on several threads once the training process has used the tokenizer's batch encoder.

Prints {"before": n, "after": m}: the worker's thread count before and after one batch encode (the
tokenizer's thread pool starts at its first use, unless the library turned it off in this worker).
"""
from __future__ import annotations

import json
import os
import sys
from typing import Iterator

import torch

from data import stream
from launcher.config import compose_config


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
    data.validation_batches(batch_size=2, num_batches=1)  # in this process, as the trainer does first
    stream._StreamSteps = ProbeSteps
    loader = data.loader(seed=0, global_batch=2, micro_batch=2, dp_rank=0, dp_size=1)
    print(next(loader._start())[1])


if __name__ == "__main__":
    # As the module's own name: the spawned worker unpickles ProbeSteps by it, never from __main__.
    from tests.data import stream_worker_probe

    stream_worker_probe.main()
