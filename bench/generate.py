"""Generation throughput: tokens/s at batch 1, 8 and 32, with and without the KV cache.

    python bench/generate.py [--new-tokens 256] [--batches 1 8 32] [--model PATH] [--repeats 2] [--threads 1]

Greedy decoding through zeroforge.trainer.generate.decode (the code `zeroforge generate` runs), on
the `tiny` model randomly initialised with a fixed seed, or on an export or checkpoint (--model).
Both variants decode the same tokens (greedy, checked), so they do the same work; each keeps its
best of --repeats. Prints a table and the check the issue asks for (the cache >= 3x faster than
no cache at 256 new tokens), and writes bench/results/generate.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

PROMPT = "import os\nimport sys\n\n\ndef main(argv):\n    parser = argparse.ArgumentParser()\n"
GOAL = 3.0


def _model(path: str | None):
    import torch

    from zeroforge.data.prepare import prepare
    from zeroforge.data.tokenizer import load_tokenizer
    from zeroforge.trainer.config import compose_config
    from zeroforge.trainer.inference_model import load_model
    from zeroforge.trainer.model import build_model, resolve_vocab_size

    if path:
        loaded = load_model(path, "cpu")
        return loaded.model, loaded.tokenizer, path
    cfg = compose_config()
    tokenizer = load_tokenizer(prepare(cfg.data) / "tokenizer")
    torch.manual_seed(0)
    model = build_model(cfg.model, resolve_vocab_size(cfg.model, len(tokenizer)), tokenizer.eos_token_id)
    return model.eval(), tokenizer, "tiny (random init, seed 0)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--model", default=None, help="an export, checkpoint step_<N> or checkpoints directory")
    parser.add_argument("--repeats", type=int, default=2)
    # One thread by default: on a small shared VM, two threads that wait for each other made
    # decoding (many tiny ops) over 10x slower than one.
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "generate.json"))
    args = parser.parse_args()

    import torch

    from zeroforge.trainer.generate import decode

    torch.set_num_threads(args.threads)
    model, tokenizer, name = _model(args.model)
    prompt_tokens = len(tokenizer(PROMPT, add_special_tokens=False).input_ids)
    rows = []
    for batch in args.batches:
        result = {}
        for use_cache in (True, False):
            best, tokens = 0.0, None
            for _ in range(args.repeats):
                started = time.perf_counter()
                samples = decode(model, tokenizer, [PROMPT] * batch, args.new_tokens, use_cache=use_cache)
                seconds = time.perf_counter() - started
                best = max(best, sum(len(s.tokens) for s in samples) / seconds)
                tokens = [s.tokens for s in samples]
            result[use_cache] = (best, tokens)
        if result[True][1] != result[False][1]:
            raise SystemExit(f"batch {batch}: the cache changed the greedy tokens")
        rows.append(
            {
                "batch": batch,
                "cache_tokens_per_s": result[True][0],
                "no_cache_tokens_per_s": result[False][0],
                "speedup": result[True][0] / result[False][0],
            }
        )

    print(f"{name} | prompt {prompt_tokens} tokens + {args.new_tokens} new | {torch.get_num_threads()} threads")
    print(f"{'batch':>6}{'cache tok/s':>14}{'no cache tok/s':>17}{'speedup':>10}")
    for r in rows:
        print(f"{r['batch']:>6}{r['cache_tokens_per_s']:>14.0f}{r['no_cache_tokens_per_s']:>17.0f}{r['speedup']:>9.1f}x")
    met = all(r["speedup"] >= GOAL for r in rows)
    print(
        f"check: KV cache >= {GOAL:.0f}x faster than no cache at {args.new_tokens} new tokens at every batch size: "
        f"{'met' if met else 'NOT met'} (lowest {min(r['speedup'] for r in rows):.1f}x)"
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(
        json.dumps(
            {
                "model": name,
                "prompt_tokens": prompt_tokens,
                "new_tokens": args.new_tokens,
                "threads": torch.get_num_threads(),
                "machine": platform.processor() or platform.machine(),
                "torch": torch.__version__,
                "rows": rows,
                "goal_cache_speedup": GOAL,
                "goal_met": met,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
