"""`torchrun --nproc_per_node N -m tests.data.stream_ranks_probe <out.json> <steps> <state_at> <overrides>`:
this rank's stream loader on a real process group, as the trainer builds and checkpoints it.

Each rank takes `steps` steps of its rows; after `state_at` steps the ranks' states are gathered
into the job's state with the trainer's own gather, as its checkpoint does. Rank 0 writes
{"batches": every step's global batch (rows in sample order), "state": that state}.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from zeroforge.data.stream import StreamData
from zeroforge.trainer import distributed
from zeroforge.trainer.config import compose_config

GLOBAL_BATCH, MICRO_BATCH = 8, 2


def main() -> None:
    out, steps, state_at = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    info = distributed.init_distributed("cpu")
    data = StreamData(compose_config(sys.argv[4:]).data)
    loader = data.loader(seed=0, global_batch=GLOBAL_BATCH, micro_batch=MICRO_BATCH, dp_rank=info.rank, dp_size=info.world_size)
    batches, state = [], None
    for step in range(1, steps + 1):
        rows = torch.cat(loader.next_batch())
        parts = [torch.empty_like(rows) for _ in range(info.world_size)]
        dist.all_gather(parts, rows)
        whole = torch.empty((GLOBAL_BATCH, rows.shape[1]), dtype=rows.dtype)
        for rank, part in enumerate(parts):
            whole[rank :: info.world_size] = part  # sample g of the batch is on rank g mod world size
        batches.append(whole.tolist())
        if step == state_at:
            state = loader.global_state(distributed.gather(loader.state_dict(), info))
    if info.is_main:
        out.write_text(json.dumps({"batches": batches, "state": state}))
    distributed.close()


if __name__ == "__main__":
    main()
