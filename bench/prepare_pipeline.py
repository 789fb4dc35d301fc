"""How much of the workers' time `prepare`'s pipeline can keep busy, on any machine.

    python bench/prepare_pipeline.py [--workers 1 4 16] [--copies 1] [--rate 700000]

`data.prepare` runs as usual (one process reads the jsonl and hands out batches, workers send the
tokens back in order, shards are written and hashed) except that each worker sleeps as long as a
tokenizer of --rate tokens/s would take (a document of n bytes counts as n/4 tokens) instead of
tokenizing. Sleeping workers take little CPU (the workers' CPU column says how little: unpickling
texts, pickling zeros), so many of them measure on a few cores what the pipeline would do on many.
The baseline is the ideal rate, workers x --rate. The table shows the share of it reached end to
end, and in the steady state: the tokens of the results between the one that arrives when every
batch of the first full queue (4 per worker) is back and the one from which only a full queue is
left to drain, over the time between them. As in bench/data.py, N workers get N copies of the
corpus (N x --copies: longer runs weigh start-up less). Writes bench/results/prepare_pipeline.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


class SleepingEncoder:
    """Takes a tokenizer's time but no CPU; returns zeros of the length it pretends to produce."""

    def __init__(self, dtype: np.dtype, rate: float):
        self.dtype, self.rate = dtype, rate

    def __call__(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        lengths = np.fromiter((len(t) // 4 + 1 for t in texts), dtype=np.int64, count=len(texts))
        time.sleep(lengths.sum() / self.rate)
        return np.zeros(int(lengths.sum()), dtype=self.dtype), lengths


def _run(corpus: Path, tokenizer: Path, work: Path, workers: int, rate: float) -> dict:
    import zeroforge.data.prepare as prepare_module
    from bench.data import prepare_rate
    from zeroforge.data.encode import IN_FLIGHT_PER_WORKER

    results: list[tuple[float, int]] = []  # (arrival, tokens) of each batch
    real_encode, real_encoder = prepare_module.encode_batches, prepare_module.DocumentEncoder

    def timed(*args: object) -> Iterator:
        for tag, (tokens, lengths) in real_encode(*args):
            results.append((time.perf_counter(), len(tokens)))
            yield tag, (tokens, lengths)

    prepare_module.encode_batches = timed
    prepare_module.DocumentEncoder = lambda tokenizer, dtype: SleepingEncoder(dtype, rate)
    try:
        start = time.perf_counter()
        figures = prepare_rate(corpus, tokenizer, work, workers)
    finally:
        prepare_module.encode_batches, prepare_module.DocumentEncoder = real_encode, real_encoder
    queue = workers * IN_FLIGHT_PER_WORKER
    first, last = queue - 1, len(results) - 1 - queue
    steady = None
    if last > first:
        steady = sum(n for _, n in results[first + 1 : last + 1]) / (results[last][0] - results[first][0])
    return {
        "workers": workers,
        "tokens": figures["tokens"],
        "ideal_tokens_per_s": workers * rate,
        "tokens_per_s": figures["tokens_per_s"],
        "first_result_s": results[0][0] - start,
        "steady_tokens_per_s": steady,
        "main_cpu_s": figures["main_cpu_s"],
        "workers_cpu_s": figures["workers_cpu_s"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, nargs="*", default=[1, 4, 16])
    parser.add_argument("--copies", type=int, default=1, help="copies of the corpus per worker")
    parser.add_argument("--rate", type=float, default=700_000, help="tokens/s a sleeping worker pretends")
    args = parser.parse_args()

    import datasets  # before any timing, as in bench/data.py

    from bench.data import corpus_and_tokenizer, write_jsonl

    datasets.disable_progress_bars()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        texts, tokenizer = corpus_and_tokenizer(work, 1500)
        for workers in args.workers:
            corpus = write_jsonl(texts, workers * args.copies, work / f"corpus-{workers}.jsonl")
            rows.append(_run(corpus, tokenizer, work / f"run-{workers}", workers, args.rate))

    print(
        f"\n{'workers':>7} {'ideal tokens/s':>15} {'tokens/s':>12} {'of ideal':>9} {'first result':>13} "
        f"{'steady of ideal':>16} {'main CPU':>9} {'workers CPU':>12}"
    )
    for r in rows:
        steady = "" if r["steady_tokens_per_s"] is None else f"{r['steady_tokens_per_s'] / r['ideal_tokens_per_s']:.0%}"
        print(
            f"{r['workers']:>7} {r['ideal_tokens_per_s']:>15,.0f} {r['tokens_per_s']:>12,.0f} "
            f"{r['tokens_per_s'] / r['ideal_tokens_per_s']:>9.0%} {r['first_result_s']:>12.2f}s "
            f"{steady:>16} {r['main_cpu_s']:>8.2f}s {r['workers_cpu_s']:>11.2f}s"
        )
    out = REPO / "bench" / "results" / "prepare_pipeline.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(rows, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    # Run as the module bench.prepare_pipeline, not as __main__: spawned workers unpickle the
    # SleepingEncoder by its module's name, and prepare hides __main__ from them.
    from bench import prepare_pipeline

    prepare_pipeline.main()
