"""Check and measure every CUDA path of the toolkit in one command (issue 11, item 4).

    python scripts/gpu_check.py                              # a GPU machine: no arguments, at most ~8 minutes
    python scripts/gpu_check.py --device cpu --small --out /tmp/gpu.json   # the same code at toy sizes, < 1 min

Checks: the device's result against CPU float32 on the same inputs, each with a stated tolerance:
  sparse_decode            the sparse decoder's output and its gradients (values, W_dec projected)
  screened_topk            ``topk_encode(screen=True)`` picks the float32 kernel's top-k and AuxK top-k_aux
  bf16_training_fvu        ``train()`` on the device (bfloat16 encoder matmul on CUDA) reaches the FVU of
                           float32 training on the CPU, on a cache of planted sparse features
  cache_pythia-70m_shape,  ``build_cache`` of a GPT-NeoX built from a config (random weights, the real
  cache_pythia-410m_shape  Pythia tokenizer, Shakespeare) equal to the CPU cache to float16 rounding
  resume                   a run killed mid-way and resumed ends where an uninterrupted device run ends
  ddp_nccl                 torchrun over every visible GPU (NCCL) equals one process (skipped below 2 GPUs)
Measurements (side by side, in one run):
  cache_throughput         mlsae-cache tokens/s against the bare forward, the disk (a raw write) and the
                           tokenizer, pythia-70m shape, 32 x 2,048 a batch
  data_path                scripts/bench_data_path.py --json (writer and reader ceilings), as a subprocess
  train_throughput         training vectors/s at R=64, k=32, 131,072 vectors a step, d = 512 and 1,024, for
                           the float32, bfloat16 and screened kernels, with the encoder matmul's TFLOP/s
                           and its share of the device's dense bfloat16 peak
  analysis_encode          mlsae-analyse's encode pass, tokens/s
  splicing                 delta CE / KL splicing, sequences/s (every layer spliced)

Every check and measurement catches its own exceptions (recorded as failed with a one-line reason), so
one failure never hides the rest; the exit code is 1 when any of them failed. Once ``--budget-s``
approaches, the remaining measurements are skipped with the reason. The JSON (``--out``) holds the
date, the device, the torch / CUDA versions, the sizes, every check's error and tolerance and every
figure; a short table is printed.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(1, str(REPO / "scripts"))  # the benchmarks' shared pieces (bench_data_path.py), also when loaded by path

from mlsae_cache.atomic import atomic_write_json  # noqa: E402
from mlsae_cache.clitools import OneLineErrorParser, add_dataclass_arguments, config_from_args, run_command  # noqa: E402
from mlsae_cache.errors import MlsaeError  # noqa: E402

# Dense bfloat16 tensor-core peaks (TFLOP/s, without sparsity) from NVIDIA's data sheets, by a
# fragment of torch.cuda.get_device_name(); the first match wins. Unknown devices get null.
BF16_PEAK_TFLOPS = (
    ("NVL", None),  # H100 NVL / H200 NVL: other clocks and power, not in this table
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),  # SXM ("NVIDIA H100 80GB HBM3")
    ("A100", 312.0),
)


@dataclass
class GpuCheckConfig:
    device: Literal["auto", "cuda", "cpu"] = "auto"
    """cuda (GPU 0; DDP uses every visible GPU), cpu (the same code at CPU speed: for the tests), or auto (cuda when visible)."""

    small: bool = False
    """Toy sizes everywhere, so that a CPU run takes under a minute (the sizes are recorded in the JSON)."""

    out: str = "benchmarks/gpu.json"
    """JSON to write: date, device, versions, sizes, every check's error and tolerance, every measurement."""

    budget_s: float = 450.0
    """Seconds after which the remaining measurements are skipped, each with the reason (checks always run)."""

    only: str | None = None
    """Run only these checks and measurements (comma-separated names, as in the table; default: all)."""


# -- sizes ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NeoxShape:
    layers: int
    d_model: int
    heads: int


@dataclass(frozen=True)
class Sizes:
    decode: tuple[int, int, int, int]
    """sparse_decode: rows, k, latents, d."""
    screen: tuple[int, int, int, int]
    """screened_topk: rows, k, latents, d (half the latents dead, for AuxK's top-k_aux)."""
    learn: dict[str, int]
    """bf16_training_fvu, resume and ddp_nccl: the planted cache and the SAE trained on it."""
    neox: dict[str, NeoxShape]
    """The GPT-NeoX shapes cached by the cache checks (random weights)."""
    cache_check: tuple[int, int]
    """Cache checks: sequences, sequence length."""
    cache_bench: tuple[int, int]
    """cache_throughput: sequences of a batch (the run caches 1 and 3 batches), sequence length."""
    train: dict[str, Any]
    """train_throughput: vectors a step, widths, R, k, warm-up and timed steps."""
    encode: dict[str, int]
    """analysis_encode: tokens, layers, d, R, k, tokens a batch."""
    splice: tuple[int, int, int]
    """splicing: sequences, sequence length, sequences a batch."""


FULL = Sizes(
    decode=(16384, 32, 32768, 512),
    screen=(8192, 32, 32768, 512),
    learn={"tokens": 32768, "layers": 2, "d": 128, "features": 256, "R": 8, "k": 16, "batch": 1024, "steps": 64},
    neox={"pythia-70m": NeoxShape(6, 512, 8), "pythia-410m": NeoxShape(24, 1024, 16)},
    cache_check=(2, 512),
    cache_bench=(32, 2048),
    train={"vectors": 131072, "widths": (512, 1024), "R": 64, "k": 32, "warmup": 2, "steps": 3},
    encode={"tokens": 65536, "layers": 6, "d": 512, "R": 64, "k": 32, "batch": 4096},
    splice=(16, 2048, 4),
)
SMALL = Sizes(
    decode=(256, 8, 512, 32),
    screen=(256, 8, 1024, 32),
    learn={"tokens": 4096, "layers": 2, "d": 32, "features": 32, "R": 4, "k": 8, "batch": 256, "steps": 48},
    neox={"pythia-70m": NeoxShape(2, 32, 4), "pythia-410m": NeoxShape(3, 64, 4)},
    cache_check=(2, 64),
    cache_bench=(4, 64),
    train={"vectors": 2048, "widths": (32, 64), "R": 8, "k": 8, "warmup": 1, "steps": 2},
    encode={"tokens": 2048, "layers": 2, "d": 32, "R": 4, "k": 4, "batch": 512},
    splice=(4, 64, 2),
)

# Rough seconds each measurement takes at full size on an H100-class GPU (a tenth with --small): the
# budget guard skips a measurement that would not finish within --budget-s.
ESTIMATED_S = {"cache_throughput": 40, "data_path": 60, "train_throughput": 90, "analysis_encode": 30, "splicing": 30}


# -- recording --------------------------------------------------------------------------------------


class Skip(Exception):
    """Raised by a check or measurement that cannot run here; its message is the reason."""


@dataclass
class Criterion:
    what: str
    error: float
    tolerance: float

    @property
    def passed(self) -> bool:
        return math.isfinite(self.error) and self.error <= self.tolerance


@dataclass
class Entry:
    """One check or measurement as it goes into the JSON."""

    name: str
    kind: Literal["check", "measurement"]
    status: str = "skipped"
    """check: passed / failed / skipped; measurement: measured / failed / skipped."""
    reason: str | None = None
    error: float | None = None
    """The worst criterion's error (largest error / tolerance), and its tolerance."""
    tolerance: float | None = None
    criteria: list[dict] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)
    summary: str = ""
    seconds: float = 0.0


@dataclass
class Budget:
    limit_s: float
    started: float = field(default_factory=time.perf_counter)

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def left(self) -> float:
        return self.limit_s - self.elapsed()

    def refusal(self, estimate_s: float) -> str | None:
        """Why a task of about ``estimate_s`` seconds may not start now, or None."""
        if self.elapsed() + estimate_s <= self.limit_s:
            return None
        return f"time budget: {self.elapsed():.0f} s of --budget-s {self.limit_s:.0f} spent, this needs about {estimate_s:.0f} s more"


@dataclass
class Context:
    device: torch.device
    sizes: Sizes
    small: bool
    work: Path
    budget: Budget
    inject: str | None = None
    memo: dict[str, Any] = field(default_factory=dict)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def device_name(self) -> str:
        """The device as the tools' --device options spell it."""
        return "cuda" if self.cuda else "cpu"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def timed(self, fn: Callable[[], Any]) -> tuple[Any, float]:
        """(fn(), seconds), with the device synchronized on both sides."""
        self.sync()
        started = time.perf_counter()
        result = fn()
        self.sync()
        return result, time.perf_counter() - started

    def tamper(self, name: str, tensor: torch.Tensor, modulo: int | None = None) -> torch.Tensor:
        """The device's ``tensor``, deliberately corrupted when ``--inject-error name`` asks for it (to
        prove that check can fail): float tensors are shifted by 1% of their largest magnitude, index
        tensors move to the next latent (``modulo`` latents)."""
        if self.inject != name:
            return tensor
        if tensor.is_floating_point():
            return tensor + 0.01 * tensor.abs().max().clamp_min(1.0)
        return (tensor + 1) % (modulo or int(tensor.max()) + 2)

    def once(self, key: str, make: Callable[[], Any]) -> Any:
        """``make()`` the first time ``key`` is asked for, the stored result after (models, caches)."""
        if key not in self.memo:
            self.memo[key] = make()
        return self.memo[key]


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want|, in float64 on the CPU."""
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    if got.shape != want.shape:
        return math.inf
    scale = float(want.abs().max()) if want.numel() else 0.0
    return float((got - want).abs().max()) / max(scale, 1e-30) if want.numel() else 0.0


def one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300]}" if text else type(exc).__name__


def free_memory(ctx: Context) -> None:
    gc.collect()
    if ctx.cuda:
        torch.cuda.empty_cache()


# -- shared inputs ----------------------------------------------------------------------------------


def planted_cache(ctx: Context) -> Path:
    """A float16 cache of planted sparse features (an SAE can learn it: FVU well below 1), built once."""

    def make() -> Path:
        from mlsae_cache import write_array_cache

        s = ctx.sizes.learn
        rng = np.random.default_rng(0)
        features = rng.standard_normal((s["features"], s["d"]))  # [F, d]
        active = rng.random((s["tokens"], s["layers"], s["features"])) < 4 / s["features"]  # ~4 features a vector
        codes = rng.random((s["tokens"], s["layers"], s["features"])) * active  # [T, L, F]
        acts = codes @ features + 0.01 * rng.standard_normal((s["tokens"], s["layers"], s["d"]))  # [T, L, d]
        return write_array_cache(ctx.work / "planted", acts.astype(np.float32), dtype="float16", shard_tokens=8192)

    return ctx.once("planted_cache", make)


def learn_config(ctx: Context, out: Path, device: str, **overrides: Any):
    from mlsae_train import TrainConfig

    s = ctx.sizes.learn
    settings = {
        "shards": [str(planted_cache(ctx))], "out": str(out), "expansion_factor": s["R"], "k": s["k"],
        "batch_tokens": s["batch"], "max_tokens": s["batch"] * s["steps"], "epochs": 100, "lr": 2e-3, "seed": 0,
        "dead_tokens": 4 * s["batch"], "save_every_tokens": 4 * s["batch"], "device": device, "progress": False,
        "verify": False,
    }  # fmt: skip
    settings.update(overrides)
    return TrainConfig(**settings)


def tokenizer_dir(ctx: Context) -> Path:
    from mlsae_cache.assets import ensure_tokenizer

    return ctx.once("tokenizer", ensure_tokenizer)


def text_dataset(ctx: Context) -> Path:
    """A folder of Shakespeare's first works, cut to about 8 characters for each token any cache here
    needs (about twice what it takes): the caches tokenize real text without spending the run on
    tokenizing all 9 MB of it."""

    def make() -> Path:
        from mlsae_cache.assets import ensure_shakespeare
        from mlsae_cache.text import local_text_files

        n_check, len_check = ctx.sizes.cache_check
        n_bench, len_bench = ctx.sizes.cache_bench
        chars_left = 8 * max(n_check * len_check, 3 * n_bench * len_bench)
        out = ctx.work / "text"
        out.mkdir(parents=True)
        for file in local_text_files(ensure_shakespeare()):
            text = file.read_text(encoding="utf-8")[:chars_left]
            (out / file.name).write_text(text, encoding="utf-8")
            chars_left -= len(text)
            if chars_left <= 0:
                break
        return out

    return ctx.once("text", make)


def neox_model_dir(ctx: Context, name: str) -> Path:
    """A GPT-NeoX of ``name``'s shape (pythia hyper-parameters, random weights) with the real Pythia
    tokenizer, saved as a plain Hugging Face directory; built once."""

    def make() -> Path:
        from transformers import AutoModelForCausalLM, GPTNeoXConfig

        shape = ctx.sizes.neox[name]
        config = GPTNeoXConfig(vocab_size=50304, hidden_size=shape.d_model, num_hidden_layers=shape.layers,
                               num_attention_heads=shape.heads, intermediate_size=4 * shape.d_model,
                               max_position_embeddings=2048, rotary_pct=0.25, bos_token_id=0, eos_token_id=0)  # fmt: skip
        torch.manual_seed(0)
        out = ctx.work / "models" / name
        AutoModelForCausalLM.from_config(config).save_pretrained(out)
        for file in tokenizer_dir(ctx).iterdir():
            if file.is_file() and file.name != "asset.json":
                shutil.copy(file, out / file.name)
        return out

    return ctx.once(f"model:{name}", make)


# -- checks: each returns its criteria and figures, or raises Skip ----------------------------------


def check_sparse_decode(ctx: Context) -> tuple[list[Criterion], dict]:
    from mlsae_train.sparse_decode import sparse_decode

    rows, k, n, d = ctx.sizes.decode
    g = torch.Generator().manual_seed(0)
    W_dec = torch.randn(n, d, generator=g)
    W_dec /= torch.linalg.vector_norm(W_dec, dim=1, keepdim=True)  # [n, d] unit rows (the projection assumes them)
    block = n // k  # one latent from each of k blocks: distinct latents in every row, as a top-k gives
    indices = torch.randint(0, block, (rows, k), generator=g) + torch.arange(k) * block  # [rows, k]
    values = torch.rand(rows, k, generator=g)  # [rows, k] >= 0, as after ReLU
    grad_out = torch.randn(rows, d, generator=g)  # [rows, d]

    def run(device: torch.device) -> tuple[torch.Tensor, ...]:
        # fresh leaves on every run: ``.to(cpu)`` would return the very tensor, so a second run would add
        # to the first run's .grad (the two then compare equal whatever they hold)
        v = values.detach().clone().to(device).requires_grad_()
        w = W_dec.detach().clone().to(device).requires_grad_()
        out = sparse_decode(v, indices.to(device), w, project_grad=True)  # [rows, d]
        out.backward(grad_out.to(device))
        return out.detach(), v.grad, w.grad

    want = run(torch.device("cpu"))
    got = run(ctx.device)
    got = (ctx.tamper("sparse_decode", got[0]), *got[1:])
    # float32 sums in another order: ~1e-7 of the largest entry; a wrong index or gradient errs by O(1)
    names = ("output", "grad values", "grad W_dec (projected)")
    criteria = [Criterion(f"{name}: max |device - cpu| / max |cpu|", relative_error(a, b), 1e-4) for name, a, b in zip(names, got, want)]
    return criteria, {"rows": rows, "k": k, "latents": n, "d": d}


def _non_tie_mismatches(centred: torch.Tensor, W: torch.Tensor, got: torch.Tensor, want: torch.Tensor, candidates: torch.Tensor | None) -> tuple[int, int]:
    """(rows whose latent sets differ, rows where a differing latent is NOT a float32 tie).

    A device latent outside the CPU's set is a tie when its exact (float64) pre-activation is within
    1e-5 |row| of the smallest exact value of the CPU's set (float32 dot products err by ~1e-7 |row|).
    """
    differ = (got.sort(dim=1).values != want.sort(dim=1).values).any(dim=1).nonzero().flatten()
    bad = 0
    for row in differ.tolist():
        exact = centred[row].double() @ W.double().t()  # [n]
        kth = exact[want[row]].min()
        extra = got[row][~torch.isin(got[row], want[row])]
        if candidates is not None and not torch.isin(extra, candidates).all():
            bad += 1
            continue
        if (exact[extra] < kth - 1e-5 * float(centred[row].norm())).any():
            bad += 1
    return int(differ.numel()), bad


def check_screened_topk(ctx: Context) -> tuple[list[Criterion], dict]:
    from mlsae_train.model import aux_k_for
    from mlsae_train.topk_encoder import topk_encode

    rows, k, n, d = ctx.sizes.screen
    g = torch.Generator().manual_seed(1)
    z = torch.randn(rows, d, generator=g)  # [rows, d] standardized inputs
    b_pre = 0.1 * torch.randn(d, generator=g)
    W_enc = torch.randn(n, d, generator=g)
    W_enc /= torch.linalg.vector_norm(W_enc, dim=1, keepdim=True)  # [n, d]
    dead = torch.randperm(n, generator=g)[: n // 2].sort().values  # [n/2]
    k_aux = aux_k_for(d, n)

    want = topk_encode(z, b_pre, W_enc, k, dead, k_aux, screen=False)  # the float32 kernel on the CPU
    dev = ctx.device
    got = topk_encode(z.to(dev), b_pre.to(dev), W_enc.to(dev), k, dead.to(dev), k_aux, screen=True)
    got_indices = ctx.tamper("screened_topk", got.indices, modulo=n).cpu()
    centred = z - b_pre
    differ, bad = _non_tie_mismatches(centred, W_enc, got_indices, want.indices, None)
    aux_differ, aux_bad = _non_tie_mismatches(centred, W_enc, got.aux_indices.cpu(), want.aux_indices, dead)

    def sorted_values(t: torch.Tensor) -> torch.Tensor:
        return t.detach().cpu().sort(dim=1, descending=True).values

    criteria = [
        Criterion("top-k values (sorted): max |device - cpu| / max |cpu|", relative_error(sorted_values(got.values), sorted_values(want.values)), 1e-5),
        Criterion("rows whose top-k latents differ other than by a float32 tie", bad, 0),
        Criterion("AuxK values (sorted): max |device - cpu| / max |cpu|", relative_error(sorted_values(got.aux_values), sorted_values(want.aux_values)), 1e-5),
        Criterion("rows whose AuxK top-k_aux latents differ other than by a float32 tie", aux_bad, 0),
    ]  # fmt: skip
    figures = {"rows": rows, "k": k, "latents": n, "d": d, "dead": int(dead.numel()), "k_aux": k_aux,
               "rows_differing_by_ties": differ - bad, "aux_rows_differing_by_ties": aux_differ - aux_bad}  # fmt: skip
    return criteria, figures


def _fvu_of(run: Path, acts: torch.Tensor) -> float:
    """Mean over layers of the FVU of the run's SAE on acts [T, L, d], in float32 on the CPU."""
    from mlsae_train import load_sae
    from mlsae_train.loss import fvu_per_layer, total_variance_per_layer

    sae = load_sae(run)
    with torch.no_grad():
        x_hat = sae(acts)
    return float(fvu_per_layer(acts, x_hat, total_variance_per_layer(acts)).mean())


def check_bf16_training_fvu(ctx: Context) -> tuple[list[Criterion], dict]:
    from mlsae_cache import open_cache
    from mlsae_train import train

    cache = open_cache(planted_cache(ctx))
    acts = torch.from_numpy(np.asarray(cache.read(np.arange(min(cache.n_tokens, 4096))), dtype=np.float32))  # [T, L, d] training tokens
    cpu_run = train(learn_config(ctx, ctx.work / "fvu_cpu", "cpu"))
    device_run = train(learn_config(ctx, ctx.work / "fvu_device", ctx.device_name))
    fvu_cpu = _fvu_of(cpu_run, acts)
    fvu_device = _fvu_of(device_run, acts)
    if ctx.inject == "bf16_training_fvu":
        fvu_device *= 1.5
    # bfloat16 pre-activations pick slightly different latents near the k-th: on the CPU (emulated
    # bfloat16, these sizes) the FVU reached differs from float32's by 0.01% to 0.1%, 20x below the
    # tolerance. The second criterion makes sure there was something to learn.
    criteria = [
        Criterion("|FVU device - FVU cpu float32| / FVU cpu", abs(fvu_device - fvu_cpu) / fvu_cpu, 0.02),
        Criterion("FVU cpu float32 (the SAE learned the planted features)", fvu_cpu, 0.5),
    ]
    matmul = "bfloat16 (the trainer's CUDA path)" if ctx.cuda else "float32 (the trainer has no bfloat16 path on CPU)"
    return criteria, {"fvu_cpu_float32": fvu_cpu, "fvu_device": fvu_device, "device_encoder_matmul": matmul, **ctx.sizes.learn}


def _cache_check(name: str) -> Callable[[Context], tuple[list[Criterion], dict]]:
    def check(ctx: Context) -> tuple[list[Criterion], dict]:
        from mlsae_cache import open_cache
        from mlsae_cache.config import CacheConfig
        from mlsae_cache.runner import build_cache

        model = neox_model_dir(ctx, name)
        n_sequences, seq_len = ctx.sizes.cache_check
        caches = {}
        for where, device in (("cpu", "cpu"), ("device", ctx.device_name)):
            out = ctx.work / f"cache-{name}-{where}"
            build_cache(CacheConfig(model=str(model), out=str(out), dataset=str(text_dataset(ctx)), tokens=n_sequences * seq_len,
                                    seq_len=seq_len, batch_size=n_sequences, device=device, dtype="float16", progress=False))  # fmt: skip
            caches[where] = open_cache(out)
        cpu, dev = caches["cpu"], caches["device"]
        same_tokens = cpu.token_table().equals(dev.token_table())
        want = torch.from_numpy(np.asarray(cpu.read(np.arange(cpu.n_tokens)), dtype=np.float32))  # [T, L, d] float16 values
        got = ctx.tamper(f"cache_{name}_shape", torch.from_numpy(np.asarray(dev.read(np.arange(dev.n_tokens)), dtype=np.float32)))
        # Two float32 results a hair apart round to float16 values at most one float16 ulp (2^-10 |x|)
        # apart; relative to |x| plus the layer's rms, so that values near 0 are not held to float32.
        rms = want.pow(2).mean(dim=(0, 2), keepdim=True).sqrt()  # [1, L, 1]
        error = float(((got - want).abs() / (want.abs() + rms)).max()) if got.shape == want.shape else math.inf
        norms = [(cpu.stats[str(layer)]["mean_norm"], dev.stats[str(layer)]["mean_norm"]) for layer in cpu.layers]
        norm_error = max(abs(b - a) / a for a, b in norms)
        shape = ctx.sizes.neox[name]
        criteria = [
            Criterion("max |device - cpu| / (|cpu| + layer rms), float16 activations", error, 2.0**-9),
            Criterion("stored tokens (sequence, position, token id) differ", 0.0 if same_tokens else 1.0, 0.0),
            Criterion("per-layer mean norm: max relative difference", norm_error, 1e-3),
        ]
        return criteria, {"model_shape": dataclasses.asdict(shape), "sequences": n_sequences, "seq_len": seq_len, "tokens": int(cpu.n_tokens)}

    return check


def _checkpoint_tensors(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / "checkpoint.safetensors"))


def _step_fvus(run: Path) -> list[float]:
    return [json.loads(line)["fvu"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def check_resume(ctx: Context) -> tuple[list[Criterion], dict]:
    from mlsae_train import train

    s = ctx.sizes.learn
    settings = {"max_tokens": 8 * s["batch"], "save_every_tokens": 2 * s["batch"], "dead_tokens": 2 * s["batch"], "lr": 1e-4}
    full = train(learn_config(ctx, ctx.work / "resume_full", ctx.device_name, **settings))
    resumed = ctx.work / "resume_killed"
    train(learn_config(ctx, resumed, ctx.device_name, **settings), stop_after_steps=5)  # "killed" after step 5
    train(learn_config(ctx, resumed, ctx.device_name, resume=True, **settings))
    want, got = _checkpoint_tensors(full), _checkpoint_tensors(resumed)
    if ctx.inject == "resume":
        got["model.W_enc"] = ctx.tamper("resume", got["model.W_enc"])
    bit_exact = want.keys() == got.keys() and all(torch.equal(want[name], got[name]) for name in want)
    floats = [name for name in want if want[name].is_floating_point() and name in got]
    weights_error = max(relative_error(got[name], want[name]) for name in floats) if want.keys() == got.keys() else math.inf
    fvus_want, fvus_got = _step_fvus(full), _step_fvus(resumed)
    fvu_error = max(abs(a - b) for a, b in zip(fvus_got, fvus_want)) if len(fvus_got) == len(fvus_want) else math.inf
    # On CUDA index_add_ sums with atomics in a varying order, so a resumed run (or a second run) may
    # differ in the last bits; on the CPU it is bit for bit. Anything real (a lost optimizer state, RNG
    # or data position) errs by the size of an update or more.
    criteria = [
        Criterion("checkpoint tensors: max |resumed - uninterrupted| / max |uninterrupted|", weights_error, 1e-3),
        Criterion("per-step FVU: max |resumed - uninterrupted|", fvu_error, 1e-4),
    ]
    return criteria, {"bit_exact": bit_exact, "steps": len(fvus_want), "killed_after_step": 5}


def check_ddp_nccl(ctx: Context) -> tuple[list[Criterion], dict]:
    if not ctx.cuda:
        raise Skip("NCCL needs CUDA GPUs; this run is on the CPU (tests/test_train_ddp.py covers DDP with gloo)")
    n_gpus = torch.cuda.device_count()
    if n_gpus < 2:
        raise Skip(f"one GPU visible: NCCL DDP needs at least 2 (torch.cuda.device_count() = {n_gpus})")
    return ddp_against_one_process(ctx, "cuda", n_gpus)


def ddp_against_one_process(ctx: Context, device: str, n_processes: int) -> tuple[list[Criterion], dict]:
    """mlsae-train under torchrun with ``n_processes`` processes (NCCL on cuda, one GPU each; gloo on
    cpu, which the tests use) against one process on the same global batch."""
    from mlsae_train import load_sae, train
    from mlsae_train.checkpoint import read_progress

    s = ctx.sizes.learn
    # the exact screen on both sides: the float32 top-k does not depend on how rows are split over GPUs
    settings = {"max_tokens": 8 * s["batch"], "dead_tokens": 2 * s["batch"], "lr": 1e-4, "seed": 1, "screen": "on"}
    batch = s["batch"] // n_processes * n_processes
    one = train(learn_config(ctx, ctx.work / "ddp_one", device, batch_tokens=batch, **settings))
    config = learn_config(ctx, ctx.work / "ddp_many", device, batch_tokens=batch, **settings)
    flags = ["--shards", *config.shards, "--out", config.out, "--device", device, "--no-progress", "--no-verify"]
    for name in ("expansion_factor", "k", "batch_tokens", "max_tokens", "epochs", "lr", "seed", "dead_tokens", "save_every_tokens", "screen"):
        flags.append(f"--{name.replace('_', '-')}={getattr(config, name)}")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n_processes), "-m", "mlsae_train.cli", *flags]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    timeout = max(60.0, min(300.0, ctx.budget.left()))
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    if result.returncode != 0:
        lines = result.stderr.strip().splitlines() or ["(no output)"]
        reason = next((line for line in lines if line.startswith("error:")), lines[-1])  # a rank's own error first
        raise RuntimeError(f"torchrun exited with {result.returncode}: {reason}")
    many = Path(config.out)
    world = read_progress(many / "checkpoint.safetensors")["world_size"]
    a, b = load_sae(many), load_sae(one)
    weights_error = max(relative_error(getattr(a, name), getattr(b, name)) for name in ("W_enc", "W_dec", "b_pre"))
    if ctx.inject == "ddp_nccl":
        weights_error += 1.0
    fvus_many, fvus_one = _step_fvus(many), _step_fvus(one)
    fvu_error = max(abs(x - y) for x, y in zip(fvus_many, fvus_one)) if len(fvus_many) == len(fvus_one) else math.inf
    criteria = [
        Criterion("weights: max |DDP - one process| / max |one process|", weights_error, 1e-3),
        Criterion("per-step FVU: max |DDP - one process|", fvu_error, 1e-4),
        Criterion("processes that trained (world size) differ from those started", float(world != n_processes), 0.0),
    ]
    return criteria, {"processes": n_processes, "backend": "nccl" if device == "cuda" else "gloo", "batch_tokens": batch,
                      "steps": len(fvus_one), "screen": "on"}  # fmt: skip


CHECKS: dict[str, Callable[[Context], tuple[list[Criterion], dict]]] = {
    "sparse_decode": check_sparse_decode,
    "screened_topk": check_screened_topk,
    "bf16_training_fvu": check_bf16_training_fvu,
    "cache_pythia-70m_shape": _cache_check("pythia-70m"),
    "cache_pythia-410m_shape": _cache_check("pythia-410m"),
    "resume": check_resume,
    "ddp_nccl": check_ddp_nccl,
}


# -- measurements: each returns (figures, one-line summary), or raises Skip -------------------------


def measure_cache_throughput(ctx: Context) -> tuple[dict, str]:
    from mlsae_cache.config import CacheConfig
    from mlsae_cache.lm import load_model, load_tokenizer
    from mlsae_cache.runner import build_cache
    from mlsae_cache.text import iter_dataset_sequences

    model_dir = neox_model_dir(ctx, "pythia-70m")
    n_sequences, seq_len = ctx.sizes.cache_bench
    text = str(text_dataset(ctx))
    model_dtype = "float16" if ctx.cuda else "float32"  # the README's GPU recipe caches with --model-dtype float16
    tokenizer = load_tokenizer(str(model_dir))
    sequences = [s for _, s in zip(range(n_sequences), iter_dataset_sequences(text, tokenizer, seq_len))]
    ids = torch.as_tensor(np.stack(sequences).astype(np.int64), device=ctx.device)  # [B, S]
    model = load_model(str(model_dir), device=str(ctx.device), dtype=getattr(torch, model_dtype))

    def forward() -> None:
        with torch.inference_mode():
            model.base_model(input_ids=ids, output_hidden_states=True, use_cache=False)

    forward()  # warm-up
    forward_s = min(ctx.timed(forward)[1] for _ in range(3))
    del model
    free_memory(ctx)

    shape = ctx.sizes.neox["pythia-70m"]
    batch_mib = n_sequences * seq_len * shape.layers * shape.d_model * 2 / 2**20  # float16 activations of one batch
    tokens = n_sequences * seq_len

    def cache(batches: int) -> float:
        out = ctx.work / f"bench-cache-{batches}"
        # one batch a shard (shards hold whole batches), so that the writer can overlap the next forward
        config = CacheConfig(model=str(model_dir), out=str(out), dataset=text, tokens=batches * tokens, seq_len=seq_len,
                             batch_size=n_sequences, device=ctx.device_name, dtype="float16", model_dtype=model_dtype,
                             shard_mb=batch_mib * 1.01, progress=False)  # fmt: skip
        _, seconds = ctx.timed(lambda: build_cache(config))
        shutil.rmtree(out, ignore_errors=True)
        return seconds

    # the same fixed costs (loading the model, the tokenizer), two batches more; taking turns, twice, and the
    # best of each: one pair alone swung 3x on a GPU machine whose disk absorbs writes in bursts
    runs = [(cache(1), cache(3)) for _ in range(2)]
    one_s, three_s = min(r[0] for r in runs), min(r[1] for r in runs)
    marginal = 2 * tokens / (three_s - one_s) if three_s > one_s else None
    forward_rate = tokens / forward_s
    # the two ceilings a fast device leaves: the disk (a raw contiguous write of one batch's float16
    # activations, fsynced) and the tokenizer (one thread, as the cache's read-ahead runs it)
    batch_bytes = np.random.default_rng(0).standard_normal((tokens, shape.layers * shape.d_model), dtype=np.float32).astype(np.float16)
    from bench_data_path import run_raw_write  # scripts/: bench_data_path.py's raw write, the writer's ceiling

    disk_s = min(run_raw_write(ctx.work / "raw", [batch_bytes]) for _ in range(2))
    shutil.rmtree(ctx.work / "raw")
    _, tokenize_s = ctx.timed(lambda: sum(1 for _ in zip(range(3 * n_sequences), iter_dataset_sequences(text, tokenizer, seq_len))))
    figures = {
        "forward_tokens_per_s": forward_rate,
        "cache_tokens_per_s_marginal": marginal,
        "cache_tokens_per_s_whole_run": 3 * tokens / three_s,
        "cache_over_forward": marginal / forward_rate if marginal else None,
        "disk_ceiling_tokens_per_s": tokens / disk_s,
        "raw_write_MBps": batch_bytes.nbytes / disk_s / 1e6,
        "cache_over_disk_ceiling": marginal * disk_s / tokens if marginal else None,
        "tokenizer_tokens_per_s": 3 * tokens / tokenize_s,
        "cache_run_s": {"1 batch": one_s, "3 batches": three_s},
        "batch": [n_sequences, seq_len], "model_shape": "pythia-70m", "model_dtype": model_dtype, "storage_dtype": "float16",
        "note": "marginal = two batches' tokens over the extra time of a 3-batch build_cache over a 1-batch one "
                "(loading the model and tokenizer cancels out; best of 2 each), one batch a shard; forward = the bare "
                "base-model forward of one batch with all hidden states (best of 3); disk = a raw contiguous h5py write "
                "of one batch's float16 activations with fsync (best of 2); tokenizer = one thread over the same text",
    }  # fmt: skip
    ratio = f"{marginal / forward_rate:.2f}" if marginal else "n/a"
    rate = f"{marginal:,.0f}" if marginal else "n/a"
    return figures, (f"cache {rate} tok/s (marginal) vs forward {forward_rate:,.0f} tok/s: {ratio}; "
                     f"disk {tokens / disk_s:,.0f} tok/s, tokenizer {3 * tokens / tokenize_s:,.0f} tok/s")  # fmt: skip


def measure_data_path(ctx: Context) -> tuple[dict, str]:
    script = REPO / "scripts" / "bench_data_path.py"
    if not script.exists():
        raise Skip(f"{script.relative_to(REPO)} does not exist yet")
    out = ctx.work / "data_path.json"
    cmd = [sys.executable, str(script), "--json", str(out)] + (["--small"] if ctx.small else [])
    # at most 3 minutes (30 s with --small), and never the time the measurements after it need
    scale = 0.1 if ctx.small else 1.0
    after = list(MEASUREMENTS)[list(MEASUREMENTS).index("data_path") + 1 :]
    timeout = min(30.0 if ctx.small else 180.0, ctx.budget.left() - scale * sum(ESTIMATED_S[name] for name in after))
    if timeout < 5:
        raise Skip(f"time budget: {ctx.budget.elapsed():.0f} s of --budget-s {ctx.budget.limit_s:.0f} spent, too little left for {script.name}")
    try:
        result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise Skip(f"{script.name} ran past its limit of {timeout:.0f} s here and was stopped") from None
    if result.returncode != 0:
        tail = (result.stderr.strip().splitlines() or result.stdout.strip().splitlines() or ["(no output)"])[-1]
        raise Skip(f"{script.name} exited with {result.returncode}: {tail[:300]}")
    try:
        figures = json.loads(out.read_text())
    except (OSError, ValueError) as exc:
        raise Skip(f"{script.name} wrote no readable --json ({one_line(exc)})") from None
    return {"bench_data_path": figures}, _data_path_summary(figures) or f"{script.name} figures recorded"


def _data_path_summary(figures: Any) -> str | None:
    """The ratios to the disk at the most cores bench_data_path measured, when its JSON has them."""
    try:
        by_cores = figures["by_cores"]
        cores = max(by_cores, key=int)
        row = by_cores[cores]
        return (f"{cores} core(s): writer {row['writer_over_raw_write']:.2f} of the raw write, "
                f"reader {row['reader_over_plain_read']:.2f} of the plain read")  # fmt: skip
    except (KeyError, TypeError, ValueError):
        return None


def bf16_peak_tflops(ctx: Context) -> float | None:
    if not ctx.cuda:
        return None
    name = torch.cuda.get_device_name(ctx.device)
    return next((peak for fragment, peak in BF16_PEAK_TFLOPS if fragment in name), None)


def _bare_matmul_tflops(ctx: Context, vectors: int, d: int, n: int, dtype: torch.dtype) -> float:
    """TFLOP/s of the encoder matmul alone ([vectors, d] x [d, n]) in the chunks the kernel uses."""
    from mlsae_train.topk_encoder import CHUNK_ELEMENTS_CPU, CHUNK_ELEMENTS_GPU

    chunk = max(1, min(vectors, (CHUNK_ELEMENTS_GPU if ctx.cuda else CHUNK_ELEMENTS_CPU) // n))
    x = torch.randn(chunk, d, device=ctx.device, dtype=dtype)
    w = torch.randn(n, d, device=ctx.device, dtype=dtype)
    out = torch.empty(chunk, n, device=ctx.device, dtype=dtype)

    def run() -> None:
        for _ in range(math.ceil(vectors / chunk)):
            torch.mm(x, w.t(), out=out)

    run()
    seconds = min(ctx.timed(run)[1] for _ in range(2))
    return 2 * math.ceil(vectors / chunk) * chunk * d * n / seconds / 1e12


def measure_train_throughput(ctx: Context) -> tuple[dict, str]:
    from mlsae_train.dead_latents import DeadLatentTracker
    from mlsae_train.model import MultiLayerSAE
    from mlsae_train.step import make_optimizer, train_step

    s = ctx.sizes.train
    vectors, R, k = s["vectors"], s["R"], s["k"]
    peak = bf16_peak_tflops(ctx)
    kernels = {"float32": (None, False), "bfloat16": (torch.bfloat16, False), "screen": (None, True)}
    rows, skipped = [], []
    summary = []
    per_config_s = 0.0
    for d in s["widths"]:
        n = R * d
        for kernel, (matmul_dtype, screen) in kernels.items():
            reason = ctx.budget.refusal(per_config_s)
            if reason:
                skipped.append({"d": d, "kernel": kernel, "reason": reason})
                continue
            started = time.perf_counter()
            g = torch.Generator().manual_seed(0)
            model = MultiLayerSAE(d, n, k, layers=[0], generator=g).to(ctx.device)
            optimizer = make_optimizer(model, 1e-4)
            tracker = DeadLatentTracker(n, 10**12, ctx.device)  # nothing dies while timing: no AuxK
            x = (torch.randn(vectors, 1, d, generator=g) + 2 * torch.randn(1, 1, d, generator=g)).to(ctx.device)  # [V, 1, d]

            def step() -> None:
                train_step(model, optimizer, tracker, x, vectors, 1 / 32, None, matmul_dtype, None, screen)

            for _ in range(s["warmup"]):
                step()
            seconds = statistics.median(ctx.timed(step)[1] for _ in range(s["steps"]))
            tflops = 2 * vectors * d * n / seconds / 1e12  # the encoder matmul's FLOPs over the whole step
            rows.append({
                "d": d, "latents": n, "kernel": kernel, "vectors_per_s": vectors / seconds, "step_s": seconds,
                "encoder_tflops_in_step": tflops, "encoder_share_of_bf16_peak": tflops / peak if peak else None,
            })  # fmt: skip
            summary.append(f"d{d}/{kernel} {vectors / seconds:,.0f}")
            del model, optimizer, tracker, x
            free_memory(ctx)
            per_config_s = time.perf_counter() - started
    matmuls = []
    for d in s["widths"]:
        for dtype in (torch.float32, torch.bfloat16):
            if ctx.budget.refusal(5 if ctx.cuda else 1) is None:
                tflops = _bare_matmul_tflops(ctx, vectors, d, R * d, dtype)
                matmuls.append({"d": d, "dtype": str(dtype).removeprefix("torch."), "tflops": tflops,
                                "share_of_bf16_peak": tflops / peak if peak else None})  # fmt: skip
            free_memory(ctx)
    figures = {
        "steps": rows, "skipped": skipped, "bare_encoder_matmul": matmuls, "bf16_peak_tflops": peak,
        "vectors_per_step": vectors, "R": R, "k": k, "layers": 1, "timed_steps": s["steps"], "warmup_steps": s["warmup"],
        "note": "one train_step (encode, decode, AuxK off: no dead latents, backward, Adam) per timing, median; "
                "encoder_tflops_in_step = 2 x vectors x d x latents / step time",
    }  # fmt: skip
    if skipped:
        summary.append(f"{len(skipped)} skipped (budget)")
    return figures, "vectors/s " + ", ".join(summary)


def measure_analysis_encode(ctx: Context) -> tuple[dict, str]:
    from mlsae_analysis.encode import encode_cache
    from mlsae_analysis.inputs import open_run_and_cache
    from mlsae_analysis.metrics import ReconstructionMetrics
    from mlsae_analysis.residual import ResidualStatistics
    from mlsae_cache import write_array_cache
    from mlsae_train import MultiLayerSAE, save_sae
    from mlsae_train.screened_topk import use_screen

    s = ctx.sizes.encode
    rng = np.random.default_rng(0)
    acts = rng.standard_normal((s["tokens"], s["layers"], s["d"]), dtype=np.float32)  # [T, L, d]
    acts += 2 * rng.standard_normal((1, s["layers"], s["d"]), dtype=np.float32)
    cache = write_array_cache(ctx.work / "encode-cache", acts, dtype="float16", seq_len=1024, shard_tokens=16384)
    del acts
    sae = MultiLayerSAE(s["d"], s["R"] * s["d"], s["k"], layers=list(range(s["layers"])), generator=torch.Generator().manual_seed(0))
    save_sae(sae, ctx.work / "encode-sae.safetensors")
    data = open_run_and_cache(ctx.work / "encode-sae.safetensors", cache)
    screen = use_screen("auto", ctx.device)  # what mlsae-analyse --screen auto picks on this device

    def encode(n_tokens: int, out: Path) -> None:
        consumers = [ReconstructionMetrics(s["layers"], s["d"], sae.n_latents), ResidualStatistics(list(range(s["layers"])), data.cache.layer_means())]
        encode_cache(data, out, n_tokens, consumers, s["batch"], ctx.device_name, progress=False, screen=screen)

    encode(s["batch"], ctx.work / "encode-warmup")  # warm-up: one batch
    _, seconds = ctx.timed(lambda: encode(s["tokens"], ctx.work / "encode-out"))
    rate = s["tokens"] / seconds
    figures = {"tokens_per_s": rate, "seconds": seconds, "screen": screen, **s,
               "note": "encode_cache as mlsae-analyse runs it: read the float16 cache, encode, metrics and residual statistics, write parquet"}  # fmt: skip
    return figures, f"{rate:,.0f} tok/s ({'screen' if screen else 'float32 kernel'})"


def measure_splicing(ctx: Context) -> tuple[dict, str]:
    from mlsae_analysis.downstream import downstream_metrics, make_reconstructor
    from mlsae_cache.lm import load_model, n_layers_of
    from mlsae_train import MultiLayerSAE

    n_sequences, seq_len, batch = ctx.sizes.splice
    model = load_model(str(neox_model_dir(ctx, "pythia-70m")), device=str(ctx.device))  # float32, as mlsae-analyse loads it
    layers = list(range(n_layers_of(model)))
    d = model.config.hidden_size
    R, k = ctx.sizes.train["R"], ctx.sizes.train["k"]
    sae = MultiLayerSAE(d, R * d, k, layers=layers, generator=torch.Generator().manual_seed(0)).to(ctx.device).eval()
    reconstruct = make_reconstructor(sae, layers, None)
    ids = torch.randint(0, 50000, (n_sequences, seq_len), generator=torch.Generator().manual_seed(0))  # [N, S]
    kept = torch.ones_like(ids, dtype=torch.bool)
    downstream_metrics(model, ids[:batch], kept[:batch], layers, reconstruct, batch, progress=False)  # warm-up
    _, seconds = ctx.timed(lambda: downstream_metrics(model, ids, kept, layers, reconstruct, batch, progress=False))
    rate = n_sequences / seconds
    figures = {"sequences_per_s": rate, "seconds": seconds, "sequences": n_sequences, "seq_len": seq_len, "batch": batch,
               "layers_spliced": len(layers), "model_shape": "pythia-70m", "sae": {"R": R, "k": k},
               "note": "downstream_metrics as mlsae-analyse runs it: a clean pass, then every layer spliced, delta CE and KL"}  # fmt: skip
    return figures, f"{rate:,.2f} seq/s ({len(layers)} layers x {seq_len} tokens each)"


MEASUREMENTS: dict[str, Callable[[Context], tuple[dict, str]]] = {
    "cache_throughput": measure_cache_throughput,
    "data_path": measure_data_path,
    "train_throughput": measure_train_throughput,
    "analysis_encode": measure_analysis_encode,
    "splicing": measure_splicing,
}


# -- running and reporting --------------------------------------------------------------------------


def run_check(ctx: Context, name: str, check: Callable) -> Entry:
    entry = Entry(name, "check")
    started = time.perf_counter()
    try:
        criteria, entry.figures = check(ctx)
        worst = max(criteria, key=lambda c: math.inf if not c.passed else c.error / c.tolerance if c.tolerance else 0.0)
        entry.error, entry.tolerance = float(worst.error), float(worst.tolerance)
        entry.criteria = [{**dataclasses.asdict(c), "passed": c.passed} for c in criteria]
        entry.status = "passed" if all(c.passed for c in criteria) else "failed"
        if entry.status == "failed":
            entry.reason = "; ".join(f"{c.what}: {c.error:.3g} > {c.tolerance:.3g}" for c in criteria if not c.passed)
    except Skip as skip:
        entry.status, entry.reason = "skipped", str(skip)
    except Exception as exc:  # one failure must not hide the rest
        entry.status, entry.reason = "failed", one_line(exc)
    finally:
        free_memory(ctx)
    entry.seconds = time.perf_counter() - started
    return entry


def run_measurement(ctx: Context, name: str, measure: Callable) -> Entry:
    entry = Entry(name, "measurement")
    estimate = ESTIMATED_S[name] * (0.1 if ctx.small else 1.0)
    reason = ctx.budget.refusal(estimate)
    if reason:
        entry.reason = reason
        return entry
    started = time.perf_counter()
    try:
        entry.figures, entry.summary = measure(ctx)
        entry.status = "measured"
    except Skip as skip:
        entry.status, entry.reason = "skipped", str(skip)
    except Exception as exc:
        entry.status, entry.reason = "failed", one_line(exc)
    finally:
        free_memory(ctx)
    entry.seconds = time.perf_counter() - started
    return entry


def device_info(device: torch.device) -> dict:
    info: dict[str, Any] = {
        "type": device.type, "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
    }  # fmt: skip
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update({
            "name": props.name, "count": torch.cuda.device_count(), "memory_gib": props.total_memory / 2**30,
            "capability": f"{props.major}.{props.minor}", "multiprocessors": props.multi_processor_count,
            "cudnn": torch.backends.cudnn.version(), "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        })  # fmt: skip
    else:
        info["name"] = platform.processor() or platform.machine()
    return info


def print_table(report: dict) -> None:
    device = report["device"]
    print(f"gpu_check on {device['name']} ({device['type']}; torch {device['torch']}, CUDA {device['cuda']}), "
          f"{'small' if report['small'] else 'full'} sizes, {report['elapsed_s']:.0f} s")  # fmt: skip
    width = max([len(e["name"]) for e in report["checks"] + report["measurements"]] + [10])
    print(f"{'check':<{width}}  {'status':<8}  {'error':>9}  {'tolerance':>9}  seconds")
    for e in report["checks"]:
        error = "" if e["error"] is None else f"{e['error']:.2e}"
        tolerance = "" if e["tolerance"] is None else f"{e['tolerance']:.2e}"
        line = f"{e['name']:<{width}}  {e['status']:<8}  {error:>9}  {tolerance:>9}  {e['seconds']:7.1f}"
        print(line + (f"  {e['reason']}" if e["reason"] else ""))
    print(f"{'measurement':<{width}}  {'status':<8}  figures")
    for e in report["measurements"]:
        print(f"{e['name']:<{width}}  {e['status']:<8}  {e['summary'] or e['reason'] or ''}")
    print(f"{'all checks passed' if report['passed'] else 'FAILED'}; figures in {report['out']}")


def resolve_device(choice: str) -> torch.device:
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda":
        if not torch.cuda.is_available():
            raise MlsaeError("--device cuda was asked for but torch sees no CUDA GPU; install the CUDA build of torch, or use --device cpu")
        torch.cuda.set_device(0)
        return torch.device("cuda", 0)
    return torch.device("cpu")


def selected(only: str | None) -> tuple[list[str], list[str]]:
    """The checks and measurements to run, in order."""
    if only is None:
        return list(CHECKS), list(MEASUREMENTS)
    names = [name.strip() for name in only.split(",") if name.strip()]
    unknown = [name for name in names if name not in CHECKS and name not in MEASUREMENTS]
    if unknown or not names:
        raise MlsaeError(f"--only names no check or measurement {unknown[0] if unknown else only!r}; choose from {', '.join([*CHECKS, *MEASUREMENTS])}")
    return [n for n in CHECKS if n in names], [n for n in MEASUREMENTS if n in names]


def _main(argv: list[str] | None) -> int:
    parser = OneLineErrorParser(prog="gpu_check.py", description=__doc__.splitlines()[0])
    add_dataclass_arguments(parser, GpuCheckConfig)
    parser.add_argument("--inject-error", dest="inject_error", default=None, help=argparse.SUPPRESS)  # proves a check can fail
    args = parser.parse_args(argv)
    config = config_from_args(GpuCheckConfig, args)
    out = Path(config.out)
    if out.is_dir():
        raise MlsaeError(f"--out {out} is a directory; give the path of a JSON file to write")
    if not config.budget_s >= 0:
        raise MlsaeError(f"--budget-s must be >= 0, got {config.budget_s}")
    checks, measurements = selected(config.only)
    if args.inject_error is not None and args.inject_error not in CHECKS:
        raise MlsaeError(f"--inject-error names no check {args.inject_error!r}; choose from {', '.join(CHECKS)}")
    device = resolve_device(config.device)
    sizes = SMALL if config.small else FULL
    work = Path(tempfile.mkdtemp(prefix="mlsae-gpu-check-"))
    ctx = Context(device, sizes, config.small, work, Budget(config.budget_s), args.inject_error)
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    try:
        check_entries = [run_check(ctx, name, CHECKS[name]) for name in checks]
        measurement_entries = [run_measurement(ctx, name, MEASUREMENTS[name]) for name in measurements]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    failed = [e.name for e in check_entries + measurement_entries if e.status == "failed"]
    report = {
        "date": date, "command": [Path(sys.argv[0]).name, *(sys.argv[1:] if argv is None else argv)],
        "device": device_info(device), "bf16_peak_tflops": bf16_peak_tflops(ctx), "small": config.small,
        "budget_s": config.budget_s, "elapsed_s": ctx.budget.elapsed(), "out": str(out), "passed": not failed, "failed": failed,
        "sizes": json.loads(json.dumps(dataclasses.asdict(sizes))),
        "checks": [dataclasses.asdict(e) for e in check_entries],
        "measurements": [dataclasses.asdict(e) for e in measurement_entries],
    }  # fmt: skip
    atomic_write_json(out, report)
    print_table(report)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    return run_command(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
