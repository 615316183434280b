"""Cache throughput vs the bare model forward on the same tokens, in one run (issues 2 and 11).

    python scripts/bench_cache.py [--sequences 8] [--seq-len 2048] [--device cpu] [--repeats 2] [--json PATH]

A pythia-70m-shaped GPT-NeoX (random weights, real architecture) with the real Pythia tokenizer runs
over real text. "forward" is the bare base-model forward with output_hidden_states (what any cache
must at least compute); "cache" is mlsae-cache's whole shard loop (text streaming, tokenization,
forward, float16 conversion, writing, checksums, statistics). Prints tokens/s, the overhead ratio and
bytes on disk per token against n_layers * d_model * itemsize + token identity, and where each cache run's
time went: before its first forward, in its forwards, between them, and its tail (from its last forward's
end to its return: the part of its overhead that no forward hides).

``mlsae-cache`` starts tokenizing before it loads the model (``runner.open_sequences``), so each cache
run here opens its token stream, then waits as long as loading the model took in this process, and
only then starts its clock: the head start a real run has, no more.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mlsae_cache import lm, open_cache  # noqa: E402
from mlsae_cache import shard_format as sf  # noqa: E402
from mlsae_cache.assets import ensure_shakespeare, ensure_tokenizer  # noqa: E402
from mlsae_cache.config import CacheConfig  # noqa: E402
from mlsae_cache.distributed import Distributed  # noqa: E402
from mlsae_cache.runner import _write_shards, open_sequences, shard_sequences_for  # noqa: E402
from mlsae_cache.text import iter_texts, iter_token_sequences  # noqa: E402
from mlsae_cache.writer import check_or_claim_directory, finalize_cache  # noqa: E402


def pythia_70m_shaped(tokenizer_dir: Path, out: Path) -> Path:
    from transformers import AutoModelForCausalLM, GPTNeoXConfig

    config = GPTNeoXConfig(vocab_size=50304, hidden_size=512, num_hidden_layers=6, num_attention_heads=8,
                           intermediate_size=2048, max_position_embeddings=2048, rotary_pct=0.25,
                           bos_token_id=0, eos_token_id=0)  # fmt: skip
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    for f in tokenizer_dir.iterdir():
        if f.is_file() and f.name != "asset.json":
            shutil.copy(f, out / f.name)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sequences", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-cache-"))
    try:
        model_dir = pythia_70m_shaped(ensure_tokenizer(), work / "model")
        text = str(ensure_shakespeare())
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        load_started = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(model_dir).to(args.device).eval()
        load_s = time.perf_counter() - load_started  # the head start mlsae-cache's tokenizer gets
        sequences = list(iter_token_sequences(iter_texts(text), tokenizer, args.seq_len, limit=args.sequences))
        n_tokens = len(sequences) * args.seq_len

        def bare_forward() -> float:
            started = time.perf_counter()
            with torch.inference_mode():
                for i in range(0, len(sequences), args.batch_size):
                    ids = torch.as_tensor(np.stack(sequences[i : i + args.batch_size]), device=args.device)
                    model.base_model(input_ids=ids, output_hidden_states=True, use_cache=False)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            return time.perf_counter() - started

        # where a cache run's time goes, from when each forward (ResidualReader.read_each) starts and returns:
        # "start" until the first forward (the first tokens), "forwards" in them, "between" them (staging,
        # statistics, handing batches to the writer), and the "tail" from the last one's end to the return
        # (writing what is left, checksum, fsync, sidecar, manifest), which no later forward hides
        reads: list[tuple[float, float]] = []
        real_read = lm.ResidualReader.read_each

        def timed_read(self, *args, **kwargs):
            began = time.perf_counter()
            result = real_read(self, *args, **kwargs)
            reads.append((began, time.perf_counter()))
            return result

        lm.ResidualReader.read_each = timed_read
        parts: list[dict[str, float]] = []

        def cache_run(i: int) -> float:
            config = CacheConfig(model=str(model_dir), out=str(work / f"cache{i}"), dataset=text, tokens=n_tokens,
                                 seq_len=args.seq_len, batch_size=args.batch_size, device=args.device,
                                 dtype="float16", progress=False)  # fmt: skip
            layers = list(range(6))
            identity = {"format_version": sf.FORMAT_VERSION, "model": str(model_dir), "layers": layers, "d_model": 512,
                        "dtype": "float16", "format": "hdf5", "lens": None, "seq_len": args.seq_len,
                        "shard_sequences": shard_sequences_for(config, 6, 512), "token_filter": None}  # fmt: skip
            check_or_claim_directory(Path(config.out), identity, overwrite=True)
            stream = open_sequences(config, tokenizer)
            time.sleep(load_s)  # as build_cache: tokenizing while the model loads
            reads.clear()
            started = time.perf_counter()
            n_shards, n_seq = _write_shards(config, identity, tokenizer, model, layers, None, Distributed(), stream)
            finalize_cache(Path(config.out), identity, n_shards, {"n_sequences": n_seq})
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            ended = time.perf_counter()
            inside = sum(end - began for began, end in reads)
            parts.append({"start": reads[0][0] - started, "forwards": inside, "between": reads[-1][1] - reads[0][0] - inside, "tail": ended - reads[-1][1]})
            return ended - started

        bare_forward()  # warm-up
        forward_s, cache_s = [], []
        for i in range(args.repeats):  # interleaved so that machine noise hits both alike
            forward_s.append(bare_forward())
            cache_s.append(cache_run(i))
        fwd, cache = min(forward_s), min(cache_s)
        stored = open_cache(work / "cache0")
        disk = sum((stored.root / sf.SHARD_DIR / s["file"]).stat().st_size for s in stored.manifest["shards"])
        ideal = 6 * 512 * 2 + sf.IDENTITY_BYTES
        per_token = disk / stored.n_tokens
        print(f"device {args.device}, torch threads {torch.get_num_threads()}, {n_tokens:,} tokens ({args.sequences} x {args.seq_len}), pythia-70m shape, float16 shards")
        print(f"bare forward : {n_tokens / fwd:10,.0f} tokens/s  ({fwd:.2f} s)")
        print(f"mlsae-cache  : {n_tokens / cache:10,.0f} tokens/s  ({cache:.2f} s)")
        print(f"overhead     : {cache / fwd - 1:+.1%} over the bare forward (target <= +10%)")
        print(f"bytes/token  : {per_token:,.1f} on disk vs {ideal:,} ideal ({per_token / ideal - 1:+.2%}; target within 2%)")
        for name, what in (("start", "until the first forward"), ("forwards", "in the forwards (with the staging of each block)"),
                           ("between", "between forwards (staging, statistics)"), ("tail", "from the last forward's end to the return")):  # fmt: skip
            runs = [run[name] for run in parts]
            print(f"{name:13s}: {min(runs):.3f} s {what} (runs: {', '.join(f'{t:.3f}' for t in runs)})")
        print(f"model load   : {load_s:.2f} s (the tokenizer's head start in each cache run, as in mlsae-cache)")
        print(f"runs (s)     : forward {', '.join(f'{s:.2f}' for s in forward_s)}; cache {', '.join(f'{s:.2f}' for s in cache_s)}")
        if args.json:
            figures = {"device": args.device, "torch_threads": torch.get_num_threads(), "tokens": n_tokens, "sequences": args.sequences,
                       "seq_len": args.seq_len, "batch_size": args.batch_size, "forward_tokens_per_s": n_tokens / fwd,
                       "cache_tokens_per_s": n_tokens / cache, "overhead": cache / fwd - 1, "forward_s": forward_s, "cache_s": cache_s,
                       "bytes_per_token": per_token, "ideal_bytes_per_token": ideal, "model_load_s": load_s, "cache_parts_s": parts}  # fmt: skip
            Path(args.json).write_text(json.dumps(figures, indent=1) + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
