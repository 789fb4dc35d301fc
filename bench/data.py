"""Data pipeline throughput: prepare (tokens/s) against `datasets.Dataset.map`, and the loader.

    python bench/data.py [--documents N] [--seq-len 2048] [--loader-steps 200] [--stream-steps 50]
                         [--stream-repeats 5] [--stream-files 8] [--workers 1 8 16] [--only prepare loader stream]

Prepare: the embedded corpus (the Python standard library) is written to a jsonl file, then
tokenized by `data.prepare` (reading that file, writing shards) with 1 and with all workers, and by
`Dataset.map(batched=True, num_proc=<same>)` with the same tokenizer, called the same way (the
Rust `encode_batch_fast`, as data/encode.py does), over the already-loaded dataset (so the baseline is not charged for reading). Each worker count tokenizes one copy of the
corpus per worker (the same work per worker, so fixed start-up costs weigh the same at 1 and at 16
workers). Libraries are imported before any timing. One tokenizing thread per process on both
sides (TOKENIZERS_PARALLELISM=false). Goal: prepare >= 1.5 x map. Each run also records the CPU
time of the calling process and of its (reaped) worker processes, from getrusage: CPU seconds per
million tokens show whether a side spends more per token as workers are added, and the workers'
busy share (their CPU / (wall x workers)) whether they waited.
Loader: this rank's batches from the prepared shards at seq_len 2048, with 0 and 2 workers.
Goal: >= 20M tokens/s per rank. Stream: data.mode=stream over the corpus written as --stream-files
jsonl files (data.stream_partitions of the same number, so partitioned by file), with the
validation windows taken first (as the trainer does), each rank in its own spawned process, one
tokenizing thread per process (TOKENIZERS_PARALLELISM=false: what is measured is how the pipeline
spreads tokenizing over processes, not the tokenizer's thread pool): 1 rank with 0 workers (the
baseline), 2 ranks (each tokenizing only its partitions; aggregate tokens/s: all ranks' tokens
over the slowest rank's time), and 1 rank with 2 workers, each run --stream-repeats times round
robin: the table shows each case's median run and the median of its rounds' ratios to the same
round's baseline (all runs are in the JSON). Goal: both >= 1.7 x the baseline. Their
CPU seconds per million tokens (all ranks' and workers' processes) show, whatever else the machine
runs, that no process tokenizes another's share: the old design (every rank tokenizing everything)
doubled it at 2 ranks. Prints a table and writes bench/results/data.json.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ["HF_DATASETS_OFFLINE"] = "1"


class _Measured:
    """Wall time and the CPU time of this process and of the worker processes it reaped meanwhile."""

    def __enter__(self) -> "_Measured":
        self._start = (time.perf_counter(), _cpu(resource.RUSAGE_SELF), _cpu(resource.RUSAGE_CHILDREN))
        return self

    def __exit__(self, *exc: object) -> None:
        wall, main, workers = self._start
        self.wall = time.perf_counter() - wall
        self.main_cpu = _cpu(resource.RUSAGE_SELF) - main
        self.workers_cpu = _cpu(resource.RUSAGE_CHILDREN) - workers

    def figures(self, tokens: int, workers: int) -> dict:
        return {
            "tokens_per_s": tokens / self.wall,
            "tokens": tokens,
            "wall_s": self.wall,
            "main_cpu_s": self.main_cpu,
            "workers_cpu_s": self.workers_cpu,
            "cpu_s_per_mtoken": (self.main_cpu + self.workers_cpu) / tokens * 1e6,
            "workers_busy": self.workers_cpu / (self.wall * workers) if workers > 1 else None,
        }


def _cpu(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def _machine() -> str:
    """CPU model, logical CPUs and physical cores: one tokenizing process per logical CPU shares a
    core with another where there are two threads per core."""
    model = next(
        (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")),
        platform.processor() or platform.machine(),
    )
    cores = {
        (Path(f"{cpu}/topology/physical_package_id").read_text().strip(), Path(f"{cpu}/topology/core_id").read_text().strip())
        for cpu in map(str, Path("/sys/devices/system/cpu").glob("cpu[0-9]*"))
        if Path(f"{cpu}/topology/core_id").exists()
    }
    from zeroforge.data.encode import default_workers

    return f"{model}, {default_workers()} of {os.cpu_count()} logical CPUs usable, {len(cores) or '?'} physical cores in all"


def corpus_and_tokenizer(work: Path, documents: int) -> tuple[list[str], Path]:
    """The embedded corpus's first documents, and the embedded tokenizer trained on it."""
    from zeroforge.data.corpus import iter_documents
    from zeroforge.data.prepare import prepare
    from zeroforge.trainer.config import compose_config

    embedded = compose_config([f"data.cache_dir={work / 'embedded'}"]).data
    tokenizer = prepare(embedded) / "tokenizer"
    texts = [text for _, text in itertools.islice(iter_documents(embedded), documents)]
    return texts, tokenizer


def write_jsonl(texts: list[str], copies: int, path: Path) -> Path:
    with open(path, "w") as f:
        for _ in range(copies):
            for text in texts:
                f.write(json.dumps({"text": text}) + "\n")
    return path


def prepare_rate(corpus: Path, tokenizer: Path, work: Path, workers: int) -> dict:
    from zeroforge.data.prepare import prepare
    from zeroforge.data.shards import load_manifest
    from zeroforge.trainer.config import compose_config

    cfg = compose_config(
        [
            "data.name=bench",
            "data.source=json",
            f"data.data_files=[{corpus}]",
            f"data.tokenizer={tokenizer}",
            f"data.cache_dir={work / f'prepare-{workers}'}",
            f"data.prepare_workers={workers}",
        ]
    ).data
    with _Measured() as run:
        out = prepare(cfg)
    splits = load_manifest(out)["splits"]
    return run.figures(splits["train"]["tokens"] + splits["validation"]["tokens"], workers)


def _map_rate(corpus: Path, tokenizer: Path, workers: int) -> dict:
    import datasets
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer))
    dataset = datasets.load_dataset("json", data_files=str(corpus), split="train", cache_dir=str(corpus.parent / "hf"))
    with _Measured() as run:
        # prepare's own call (data/encode.py): the Rust encoder without offsets, so that the
        # ratio measures the pipeline around the tokenizer, not two ways of calling it.
        mapped = dataset.map(
            lambda batch: {"input_ids": [e.ids for e in tok.backend_tokenizer.encode_batch_fast(batch["text"], add_special_tokens=False)]},
            batched=True,
            num_proc=workers if workers > 1 else None,
            remove_columns=["text"],
            load_from_cache_file=False,
        )
    return run.figures(sum(len(ids) for ids in mapped["input_ids"]) + len(mapped), workers)  # + prepare's EOS


PARTS = ("prepare", "loader", "stream")
GLOBAL_BATCH, MICRO_BATCH = 32, 8  # one rank's loader: samples per step, per micro-batch


def _tokens_per_s(loader, seq_len: int, steps: int) -> float:
    """Tokens/s of a loader's steps after its first: start-up (workers, permutation, opening the
    source) is not throughput."""
    loader.next_batch()
    start = time.perf_counter()
    for _ in range(steps):
        loader.next_batch()
    return steps * GLOBAL_BATCH * seq_len / (time.perf_counter() - start)


def _loader_rate(prepared: Path, seq_len: int, steps: int, workers: int) -> float:
    from zeroforge.data.loader import BatchLoader
    from zeroforge.data.mixture import open_split

    loader = BatchLoader(
        open_split(prepared, "train"),
        seq_len,
        seed=0,
        global_batch=GLOBAL_BATCH,
        micro_batch=MICRO_BATCH,
        dp_rank=0,
        dp_size=1,
        num_workers=workers,
    )
    return _tokens_per_s(loader, seq_len, steps)


def _stream_rank(
    corpus: list[Path], tokenizer: Path, seq_len: int, steps: int, rank: int, ranks: int, workers: int, barrier, results
) -> None:
    """One rank of a streamed job, in its own process: its tokens and seconds over `steps` steps
    after the first (which starts the workers and opens the partitions)."""
    from zeroforge.data.stream import StreamData
    from zeroforge.trainer.config import compose_config

    files = ",".join(str(f) for f in corpus)
    data = StreamData(
        compose_config(
            [
                "data.mode=stream",
                "data.source=json",
                f"data.data_files=[{files}]",
                f"data.tokenizer={tokenizer}",
                f"data.seq_len={seq_len}",
                f"data.num_workers={workers}",
                f"data.stream_partitions={len(corpus)}",
            ]
        ).data
    )
    data.validation_batches(batch_size=1, num_batches=1)
    loader = data.loader(seed=0, global_batch=GLOBAL_BATCH, micro_batch=MICRO_BATCH, dp_rank=rank, dp_size=ranks)
    loader.next_batch()
    barrier.wait()
    start, cpu = time.perf_counter(), _rank_cpu()
    for _ in range(steps):
        loader.next_batch()
    results.put((steps * GLOBAL_BATCH // ranks * seq_len, time.perf_counter() - start, _rank_cpu() - cpu))


def _rank_cpu() -> float:
    """CPU seconds of this process and of its live dataloader workers (getrusage counts only
    children that were reaped)."""
    import multiprocessing

    tick = os.sysconf("SC_CLK_TCK")
    workers = 0.0
    for child in multiprocessing.active_children():
        fields = Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()
        workers += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return _cpu(resource.RUSAGE_SELF) + workers


def _stream_rate(corpus: list[Path], tokenizer: Path, seq_len: int, steps: int, ranks: int, workers: int) -> dict:
    """Aggregate tokens/s of `ranks` processes, each one rank of the same streamed job."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(ranks), context.Queue()
    processes = [
        context.Process(target=_stream_rank, args=(corpus, tokenizer, seq_len, steps, rank, ranks, workers, barrier, results))
        for rank in range(ranks)
    ]
    for process in processes:
        process.start()
    measured = [results.get() for _ in processes]
    for process in processes:
        process.join()
        if process.exitcode:
            raise RuntimeError(f"a stream rank failed with exit code {process.exitcode}")
    tokens, wall, cpu = sum(t for t, _, _ in measured), max(w for _, w, _ in measured), sum(c for _, _, c in measured)
    return {
        "tokens_per_s": tokens / wall,
        "tokens": tokens,
        "wall_s": wall,
        "cpu_s_per_mtoken": cpu / tokens * 1e6,
        "ranks": ranks,
        "workers": workers,
        "seq_len": seq_len,
        "partitions": len(corpus),
    }


def write_jsonl_files(texts: list[str], files: int, directory: Path) -> list[Path]:
    """The texts dealt round robin into `files` jsonl files."""
    directory.mkdir()
    paths = [directory / f"part-{i:03d}.jsonl" for i in range(files)]
    for i, path in enumerate(paths):
        write_jsonl(texts[i::files], 1, path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--documents", type=int, default=1500)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--loader-steps", type=int, default=200)
    parser.add_argument("--stream-steps", type=int, default=50)
    parser.add_argument("--stream-repeats", type=int, default=5, help="rounds of the stream cases; medians are kept")
    parser.add_argument("--stream-files", type=int, default=8, help="jsonl files, and partitions, of the streamed corpus")
    parser.add_argument("--workers", type=int, nargs="*", help="prepare worker counts (default: 1 and all cores)")
    parser.add_argument("--only", nargs="*", choices=PARTS, default=list(PARTS), help="which measurements (default: all)")
    args = parser.parse_args()

    import datasets  # here, so that no timing below pays for the import

    datasets.disable_progress_bars()

    from zeroforge.data.encode import default_workers
    from zeroforge.data.prepare import prepare
    from zeroforge.trainer.config import compose_config

    cores = default_workers()
    rows, cpu_rows, results = [], [], {"machine": _machine(), "prepare": {}, "loader": {}, "stream": {}}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        texts, tokenizer = corpus_and_tokenizer(work, args.documents)
        for workers in sorted(set(args.workers or {1, cores})) if "prepare" in args.only else ():
            corpus = write_jsonl(texts, workers, work / f"corpus-{workers}.jsonl")
            ours, theirs = prepare_rate(corpus, tokenizer, work, workers), _map_rate(corpus, tokenizer, workers)
            ratio = ours["tokens_per_s"] / theirs["tokens_per_s"]
            results["prepare"][workers] = {"zeroforge": ours, "datasets_map": theirs, "ratio": ratio}
            rows.append((f"prepare, {workers} worker(s) (vs Dataset.map)", ours["tokens_per_s"], theirs["tokens_per_s"], ratio))
            cpu_rows.append((workers, ours, theirs))
        prepared = prepare(compose_config([f"data.cache_dir={work / 'embedded'}"]).data) if "loader" in args.only else None
        for workers in (0, 2) if prepared is not None else ():
            rate = _loader_rate(prepared, args.seq_len, args.loader_steps, workers)
            results["loader"][workers] = {"tokens_per_s": rate, "seq_len": args.seq_len}
            rows.append((f"loader, seq_len {args.seq_len}, {workers} workers", rate, None, None))
        corpus = write_jsonl_files(texts, args.stream_files, work / "stream")
        cases = {"1 rank, 0 workers": (1, 0), "2 ranks": (2, 0), "1 rank, 2 workers": (1, 2)}
        # Round robin, so that a slower stretch of a shared machine falls on every case alike.
        rounds = [
            {
                what: _stream_rate(corpus, tokenizer, args.seq_len, args.stream_steps, ranks, workers)
                for what, (ranks, workers) in cases.items()
            }
            for _ in range(args.stream_repeats if "stream" in args.only else 0)
        ]
        for what in cases if rounds else ():
            measured = [r[what] for r in rounds]
            # Each round's ratio to that round's baseline, then their median: the machine's slow and
            # fast stretches cancel within a round.
            ratios = [r[what]["tokens_per_s"] / r["1 rank, 0 workers"]["tokens_per_s"] for r in rounds]
            results["stream"][what] = {
                **sorted(measured, key=lambda m: m["tokens_per_s"])[len(measured) // 2],
                "repeats_tokens_per_s": [m["tokens_per_s"] for m in measured],
                "round_ratios": ratios,
                "vs_1_rank_0_workers": statistics.median_low(ratios),
            }
        base = results["stream"].get("1 rank, 0 workers", {}).get("tokens_per_s")
        for what, figures in results["stream"].items():
            rows.append((f"stream, {what} (vs 1 rank, 0 workers)", figures["tokens_per_s"], base, figures["vs_1_rank_0_workers"]))

    print(f"\n{'what':<40} {'tokens/s':>14} {'baseline':>14} {'ratio':>7}")
    for what, ours, theirs, ratio in rows:
        print(f"{what:<40} {ours:>14,.0f} {'' if theirs is None else f'{theirs:,.0f}':>14} {'' if ratio is None else f'{ratio:.2f}':>7}")
    print(f"\n{'CPU s per M tokens (workers busy)':<40} {'prepare':>14} {'Dataset.map':>14}   on {results['machine']}")
    for workers, ours, theirs in cpu_rows:
        print(f"{f'{workers} worker(s)':<40} {_cpu_cell(ours):>14} {_cpu_cell(theirs):>14}")
    for what, figures in results["stream"].items():
        print(f"{f'stream, {what}':<40} {figures['cpu_s_per_mtoken']:>14.2f}   (all its processes' CPU, timed steps)")
    out = REPO / "bench" / "results" / "data.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")


def _cpu_cell(figures: dict) -> str:
    busy = figures["workers_busy"]
    return f"{figures['cpu_s_per_mtoken']:.2f}" + ("" if busy is None else f" ({busy:.0%})")


if __name__ == "__main__":
    main()
