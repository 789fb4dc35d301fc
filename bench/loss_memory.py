"""Peak memory of one forward + backward: the plain loss (`logits.float()` over the whole vocabulary)
against the chunked loss (trainer/loss.py), at vocabulary 128,256 and 2,048 tokens.

    python bench/loss_memory.py [--tokens 2048] [--vocab 128256] [--chunks 512 1024 2048]

Each variant runs in its own fresh process (tracemalloc does not see torch's allocations, and a
process's peak RSS only ever grows): the tiny model (conf/model/tiny.yaml, fp32, so the output
layer dominates) with the given vocabulary is built, one small step warms up the allocator and
libraries, then the peak resident memory of one forward + backward at --tokens is read
(VmHWM) and the resident memory just before it subtracted. Prints a table and
writes bench/results/loss_memory.json. Goal: chunked at the default chunk >= 3x less than plain.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
GIB = 2**30


def worker(loss: str, chunk: int, tokens: int, vocab: int) -> dict:
    """One forward + backward in this process: peak RSS above the RSS just before it."""
    import torch

    from zeroforge.trainer.config import compose_config
    from zeroforge.trainer.engine import causal_lm_loss
    from zeroforge.trainer.host_memory import peak_rss_bytes, rss_bytes
    from zeroforge.trainer.loss import install_loss
    from zeroforge.trainer.model import build_model

    torch.manual_seed(0)
    cfg = compose_config([f"model.max_position_embeddings={max(tokens, 1024)}"])
    model = build_model(cfg.model, vocab)
    model.config.use_cache = False
    install_loss(model, loss, chunk)
    model.train()
    causal_lm_loss(model, torch.randint(0, vocab, (1, 17))).backward()  # warm-up, and gradients allocated
    batch = torch.randint(0, vocab, (1, tokens + 1))
    before = rss_bytes()
    loss_value = causal_lm_loss(model, batch)
    loss_value.backward()
    peak = peak_rss_bytes()
    return {
        "loss": loss,
        "chunk_tokens": chunk if loss == "chunked" else None,
        "peak_bytes": peak - before,
        "loss_value": loss_value.item(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--chunks", type=int, nargs="+", default=[512, 1024, 2048])
    parser.add_argument("--worker", nargs=2, metavar=("LOSS", "CHUNK"))
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "loss_memory.json"))
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], int(args.worker[1]), args.tokens, args.vocab)))
        return

    from zeroforge.trainer.config import compose_config

    default_chunk = compose_config().train.loss_chunk_tokens
    variants = [("plain", 0)] + [("chunked", c) for c in sorted({*args.chunks, default_chunk})]
    env = {**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")}
    rows = []
    for loss, chunk in variants:
        out = subprocess.run(
            [sys.executable, __file__, "--worker", loss, str(chunk), "--tokens", str(args.tokens), "--vocab", str(args.vocab)],
            cwd=REPO,
            env=env,
            check=True,
            capture_output=True,
            text=True,
        )
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    plain = rows[0]["peak_bytes"]
    print(f"one forward + backward, tiny model (fp32), vocabulary {args.vocab:,}, {args.tokens:,} tokens")
    print(f"{'loss':<10}{'chunk':>8}{'peak GiB':>10}{'vs plain':>10}{'loss value':>13}")
    for r in rows:
        chunk = "-" if r["chunk_tokens"] is None else str(r["chunk_tokens"])
        print(f"{r['loss']:<10}{chunk:>8}{r['peak_bytes'] / GIB:>10.3f}{plain / r['peak_bytes']:>9.1f}x{r['loss_value']:>13.6f}")
    default = next(r for r in rows if r["chunk_tokens"] == default_chunk)
    ratio = plain / default["peak_bytes"]
    print(f"plain / chunked at train.loss_chunk_tokens={default_chunk}: {ratio:.1f}x (goal >= 3x): {'met' if ratio >= 3 else 'NOT met'}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(
        json.dumps(
            {
                "tokens": args.tokens,
                "vocab": args.vocab,
                "rows": rows,
                "default_chunk_tokens": default_chunk,
                "plain_vs_default_chunked": ratio,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
