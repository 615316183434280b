"""The data path with the model and the SAE taken out: cache writer and trainer reader against the disk.

    python scripts/bench_data_path.py [--sequences 80] [--batch 4] [--repeats 3] [--json PATH] [--small]

Side by side, in one run, on the same disk (the folder of --dir, default a temporary one):

(a) writer path: what ``mlsae-cache`` does after each forward (cast to float16, per-layer float64
    statistics, the copy to the shard's buffer and its write to the shard file in the shard's writing
    thread; then checksum + fsync once the shard is whole), fed float32 tensors of pythia-70m batches [B, 2048, 6, 512] with one special token per
    sequence left out; against
(b) raw write: h5py writing the same float16 arrays contiguously, the same files, then fsync.
(c) reader: the trainer's ``Prefetcher`` (``ActivationDataset`` + ``BatchOrder``), random batches of
    16,384 tokens over the shards (a) wrote; against
(d) plain read: reading the same shard files sequentially, whole.

Each pair runs with the process pinned to 1 core, 2 cores and all usable cores (when the machine lets
it), with as many worker threads (writer threads, reader threads, torch threads), so the figure for a machine with
more cores can be predicted. Figures are MB/s of stored float16 activations (1 MB = 10^6 bytes); the
ratios (a)/(b) and (c)/(d) are what carries over between machines. Reads are warm (from the page cache)
on both sides unless --cold, which drops each shard file's pages (posix_fadvise DONTNEED) before each
read, on both sides alike. Contenders take turns; each figure is the best of --repeats.
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import json
import os
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import h5py
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mlsae_cache import shard_format as sf  # noqa: E402
from mlsae_cache.staging import HostBuffers, ShardStager  # noqa: E402
from mlsae_cache.writer import CacheWriter, check_or_claim_directory, finalize_cache  # noqa: E402
from mlsae_train.data import ActivationDataset, BatchOrder, Prefetcher  # noqa: E402

N_LAYERS, D_MODEL = 6, 512  # pythia-70m
MB = 1e6
# shard buffers handed round again across runs, as across the shards of one long mlsae-cache run
BUFFERS = HostBuffers()


# -- cores -----------------------------------------------------------------------------------------


def usable_cpus() -> list[int]:
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))


@contextmanager
def on_cores(n: int):
    """Run the body with every thread of this process pinned to the first ``n`` usable CPUs and torch using
    ``n`` threads (threads started inside inherit the pinning); yields whether the pinning took."""
    cpus = usable_cpus()
    threads_before = torch.get_num_threads()
    pinned = False
    try:
        for tid in os.listdir("/proc/self/task"):
            os.sched_setaffinity(int(tid), set(cpus[:n]))
        pinned = True
    except (OSError, AttributeError, FileNotFoundError):
        pass
    torch.set_num_threads(n)
    try:
        yield pinned
    finally:
        torch.set_num_threads(threads_before)
        if pinned:
            for tid in os.listdir("/proc/self/task"):
                try:
                    os.sched_setaffinity(int(tid), set(cpus))
                except OSError:
                    pass


# -- data ------------------------------------------------------------------------------------------


def synthetic_batch(batch: int, seq_len: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """acts [B, S, L, d] float32, keep [B, S] (one special token per sequence left out), input ids [B, S]."""
    gen = torch.Generator().manual_seed(seed)
    acts = torch.randn((batch, seq_len, N_LAYERS, D_MODEL), generator=gen) * 3
    keep = torch.ones((batch, seq_len), dtype=torch.bool)
    keep[torch.arange(batch), torch.randint(0, seq_len, (batch,), generator=gen)] = False
    return acts, keep, np.zeros((batch, seq_len), np.int64)


def cache_config(seq_len: int, shard_sequences: int) -> dict:
    return {"format_version": sf.FORMAT_VERSION, "model": "synthetic-pythia-70m", "revision": None, "tokenizer": None,
            "dataset": "synthetic", "split": None, "text_column": None, "seq_len": seq_len, "tokens": 0,
            "layers": list(range(N_LAYERS)), "d_model": D_MODEL, "dtype": "float16", "format": "hdf5", "lens": None,
            "shard_sequences": shard_sequences}  # fmt: skip


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def drop_pages(paths: list[Path]) -> None:
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


# -- the four contenders ---------------------------------------------------------------------------


def run_writer(root: Path, args, data, threads: int) -> tuple[float, int]:
    """(seconds, stored bytes) of the writer path over ``args.sequences`` sequences into ``root``."""
    acts, keep, input_ids = data
    shutil.rmtree(root, ignore_errors=True)
    config = cache_config(args.seq_len, args.shard_sequences)
    check_or_claim_directory(root, config, overwrite=False)
    started = time.perf_counter()
    writer = CacheWriter(root, config, threads=threads)
    stager, shard, n_shards, stored = None, None, 0, 0
    for first in range(0, args.sequences, args.batch):
        if first % args.shard_sequences == 0:
            if stager is not None:
                stored += stager.n_tokens
                shard.finish(*stager.finish(), done=lambda host=stager.host: BUFFERS.give_back(host))
                n_shards += 1
            shard = writer.open_shard(n_shards)  # as mlsae-cache: each batch is written once staged
            stager = ShardStager(args.shard_sequences * args.seq_len, N_LAYERS, D_MODEL, "float16", "cpu", BUFFERS, sink=shard.append)
        stager.add(acts, keep, first, input_ids)
    stored += stager.n_tokens
    shard.finish(*stager.finish(), done=lambda host=stager.host: BUFFERS.give_back(host))
    writer.close()
    seconds = time.perf_counter() - started
    finalize_cache(root, config, n_shards + 1, {"n_sequences": args.sequences, "n_model_tokens": args.sequences * args.seq_len, "world_size": 1})
    return seconds, stored * N_LAYERS * D_MODEL * 2


def raw_arrays(args, data) -> list[np.ndarray]:
    """The float16 arrays the writer stores, shard by shard (prepared outside the timing)."""
    acts, keep, _ = data
    batch_rows = acts.reshape(-1, N_LAYERS, D_MODEL)[keep.reshape(-1)].half().numpy()  # [n_kept, L, d]
    per_shard = args.shard_sequences // args.batch
    n_batches = -(-args.sequences // args.batch)
    return [np.concatenate([batch_rows] * min(per_shard, n_batches - i)) for i in range(0, n_batches, per_shard)]


def run_raw_write(folder: Path, arrays: list[np.ndarray]) -> float:
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    started = time.perf_counter()
    for i, array in enumerate(arrays):
        path = folder / f"raw-{i:06d}.h5"
        with h5py.File(path, "w", libver="latest") as f:
            f.create_dataset("activations", data=array)
        fsync_path(path)
    return time.perf_counter() - started


def shard_files(root: Path) -> list[Path]:
    return sorted((root / sf.SHARD_DIR).glob("shard-*.h5"))


def run_reader(root: Path, args, workers: int, cold: bool) -> tuple[float, int]:
    """(seconds, stored bytes delivered) of the trainer's Prefetcher over ``args.steps`` random batches, start-up
    included (opening the cache, first page mappings and buffers: about as much as a few batches, which a
    real run of thousands of steps pays once; ``--steps`` sets how far it is amortised)."""
    dataset = ActivationDataset([root])
    order = BatchOrder(dataset.n_tokens, args.batch_tokens, seed=0)
    kwargs = {"workers": workers} if "workers" in inspect.signature(Prefetcher).parameters else {}
    if cold:
        drop_pages(shard_files(root))
    started = time.perf_counter()
    prefetcher = Prefetcher(dataset, order, range(args.steps), rank=0, world_size=1, depth=2, pin_memory=False, **kwargs)
    checksum = 0.0
    try:
        for _, x in prefetcher:
            checksum += float(x[0, 0, 0])  # touch the batch, as a consumer would
    finally:
        prefetcher.close()
    return time.perf_counter() - started, args.steps * args.batch_tokens * N_LAYERS * D_MODEL * 2


def run_plain_read(files: list[Path], cold: bool) -> tuple[float, int]:
    if cold:
        drop_pages(files)
    buffer = bytearray(max(p.stat().st_size for p in files))
    view = memoryview(buffer)
    started = time.perf_counter()
    total = 0
    for path in files:
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(view):  # the whole file in one read, into one reused buffer
                total += n
    return time.perf_counter() - started, total


# -- main --------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sequences", type=int, default=80, help="sequences of 2,048 tokens the writer writes (6 KiB a token; 4 shards)")
    parser.add_argument("--batch", type=int, default=4, help="sequences per forward batch")
    parser.add_argument("--shard-sequences", type=int, default=20, help="sequences per shard (20 = mlsae-cache's 256 MiB for pythia-70m)")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch-tokens", type=int, default=16384, help="tokens per training batch")
    parser.add_argument("--steps", type=int, default=40, help="training batches the reader reads (its start-up included)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cores", default=None, help="core counts to measure at, e.g. 1,2 (default: 1, 2, 4 and all usable CPUs)")
    parser.add_argument("--cold", action="store_true", help="drop the shard files' pages before each read (both sides)")
    parser.add_argument("--dir", default=None, help="folder on the disk to measure (default: a temporary folder)")
    parser.add_argument("--json", default=None, help="write the figures to this JSON file")
    parser.add_argument("--small", action="store_true", help="a few seconds: 4 sequences of 512, 2 per shard, batches of 2,048 tokens")
    args = parser.parse_args()
    if args.small:
        args.sequences, args.batch, args.shard_sequences, args.seq_len = 4, 1, 2, 512
        args.batch_tokens, args.steps, args.repeats = 512, 4, 1
    args.shard_sequences = max(args.batch, args.shard_sequences - args.shard_sequences % args.batch)
    wanted = args.cores.split(",") if args.cores else [1, 2, 4, len(usable_cpus())]  # 4: the cache writer's threads at most
    cores = sorted({max(1, min(int(c), len(usable_cpus()))) for c in wanted})

    work = Path(tempfile.mkdtemp(prefix="bench-data-path-", dir=args.dir))
    try:
        data = synthetic_batch(args.batch, args.seq_len)
        arrays = raw_arrays(args, data)
        results: dict = {}
        for n in cores:
            with on_cores(n) as pinned:
                best = {"writer": np.inf, "raw_write": np.inf, "reader": np.inf, "plain_read": np.inf}
                for _ in range(args.repeats):  # taking turns, so that noise from other work hits both alike
                    seconds, stored = run_writer(work / "cache", args, data, threads=n)
                    best["writer"] = min(best["writer"], seconds)
                    best["raw_write"] = min(best["raw_write"], run_raw_write(work / "raw", arrays))
                    raw_bytes = sum(a.nbytes for a in arrays)
                    if not args.cold:
                        run_plain_read(shard_files(work / "cache"), cold=False)  # warm: both sides read from memory
                    seconds, delivered = run_reader(work / "cache", args, workers=n, cold=args.cold)
                    best["reader"] = min(best["reader"], seconds)
                    seconds, read_bytes = run_plain_read(shard_files(work / "cache"), cold=args.cold)
                    best["plain_read"] = min(best["plain_read"], seconds)
                rates = {
                    "writer_MBps": stored / best["writer"] / MB,
                    "raw_write_MBps": raw_bytes / best["raw_write"] / MB,
                    "reader_MBps": delivered / best["reader"] / MB,
                    "plain_read_MBps": read_bytes / best["plain_read"] / MB,
                }
                rates["writer_over_raw_write"] = rates["writer_MBps"] / rates["raw_write_MBps"]
                rates["reader_over_plain_read"] = rates["reader_MBps"] / rates["plain_read_MBps"]
                rates["pinned"] = pinned
                results[str(n)] = rates
        report = {
            "date": datetime.date.today().isoformat(),
            "cpus_usable": len(usable_cpus()),
            "reads": "cold (posix_fadvise DONTNEED before each read)" if args.cold else "warm (page cache), both sides",
            "shape": {"batch": [args.batch, args.seq_len, N_LAYERS, D_MODEL], "sequences": args.sequences,
                      "shard_sequences": args.shard_sequences, "reader_batch_tokens": args.batch_tokens, "reader_steps": args.steps},
            "prefetcher_workers_kwarg": "workers" in inspect.signature(Prefetcher).parameters,
            "by_cores": results,
            "targets": {"writer_over_raw_write": 0.5, "reader_over_plain_read": 0.5},
        }  # fmt: skip
        print(f"data path, MB/s of stored float16, best of {args.repeats}; reads {report['reads']}; {len(usable_cpus())} usable CPUs")
        print(f"{'cores':>5} {'writer':>9} {'raw write':>10} {'ratio':>6} {'reader':>9} {'plain read':>11} {'ratio':>6}")
        for n, r in results.items():
            pin = "" if r["pinned"] else " (not pinned)"
            print(f"{n:>5} {r['writer_MBps']:9.0f} {r['raw_write_MBps']:10.0f} {r['writer_over_raw_write']:6.2f} "
                  f"{r['reader_MBps']:9.0f} {r['plain_read_MBps']:11.0f} {r['reader_over_plain_read']:6.2f}{pin}")  # fmt: skip
        print("targets (issue 11, on its 2-core machine): writer/raw write >= 0.5, reader/plain read >= 0.5")
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
