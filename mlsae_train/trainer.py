"""The training run: set up (checking everything before touching the run directory), then loop
over steps (see step.py), logging every step and checkpointing every ``save_every_tokens``."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from mlsae_cache.atomic import atomic_write_text
from mlsae_cache.errors import MlsaeError
from mlsae_cache.integrity import RECORD_FILE, record_files, verified
from mlsae_cache.path_kinds import is_cache_dir, is_run_dir

from .checkpoint import CHECKPOINT_FILE, CONFIG_FILE, METRICS_FILE, SAE_FILE, load_checkpoint, read_progress, save_checkpoint, save_sae
from .config import RESUMABLE_CHANGES, TrainConfig, recorded_setting
from .data import ActivationDataset, BatchOrder, Prefetcher
from .dead_latents import DeadLatentTracker
from .dictionary import Dictionary
from .distributed import Distributed
from .families import FAMILIES
from .metrics_log import MetricsLog, check_loggers_available
from .screened_topk import use_screen
from .step import make_optimizer, train_step


def _run_info(config: TrainConfig, dataset: ActivationDataset, model: Dictionary, total_steps: int) -> dict:
    return {
        "config": json.loads(json.dumps(config.to_dict())),
        "sae": model.config(),
        "k_aux": model.k_aux,
        "data": dataset.identity(),
        "total_steps": total_steps,
        "total_tokens": total_steps * config.batch_tokens,
    }


def _check_run_dir(run: Path, config: TrainConfig, info: dict) -> Path | None:
    """Refuse to overwrite a run, or to resume one with other settings. Returns the checkpoint to resume from."""
    if run.exists() and not run.is_dir():
        raise MlsaeError(f"--out {run} is a file; give a directory for the run")
    if is_cache_dir(run) and not is_run_dir(run):
        raise MlsaeError(f"--out {run} is an activation cache (written by mlsae-cache), not a run directory; choose another --out")
    saved_config_file = run / CONFIG_FILE
    if not config.resume:
        if is_run_dir(run):
            raise MlsaeError(f"{run} already holds a run; pass --resume to continue it, or choose another --out")
        if run.is_dir() and any(run.iterdir()):  # the run's files would land among (and could replace) someone else's
            other = sorted(run.iterdir())[0].name
            raise MlsaeError(f"--out {run} is not empty and holds no run (it holds {other}); choose a new or empty --out")
        return None
    if not saved_config_file.exists() or not is_run_dir(run):
        raise MlsaeError(f"--resume: {run} holds no run to resume; drop --resume to start one there")
    try:
        # checked before its settings are compared: a flipped byte could otherwise pass for another setting
        verified(saved_config_file, "the run cannot be resumed; choose another --out to start afresh (or restore the file)")
        saved = json.loads(saved_config_file.read_text())
    except ValueError:
        raise MlsaeError(f"--resume: {saved_config_file} is not valid JSON; choose another --out to start afresh") from None
    for name, value in info["config"].items():
        if name in RESUMABLE_CHANGES:
            continue
        before = recorded_setting(saved.get("config", {}), name)
        if before != value:
            flag = "-k" if name == "k" else "--" + name.replace("_", "-")
            raise MlsaeError(
                f"--resume: {flag} is {value!r} here but the run in {run} was started with {before!r}; "
                "rerun with the run's settings or choose another --out"
            )
    if saved.get("data") != info["data"]:
        raise MlsaeError(
            f"--resume: the caches in --shards are not the ones the run in {run} was trained on "
            "(model, token counts, layers or width differ); pass the same caches"
        )
    checkpoint = run / CHECKPOINT_FILE
    return checkpoint if checkpoint.exists() else None


def _drop_torn_writes(run: Path) -> None:
    """Remove the temporary files (".NAME.XXXX.tmp") of the run's own atomic writes that a kill -9 cut short."""
    own = (CONFIG_FILE, SAE_FILE, CHECKPOINT_FILE, METRICS_FILE, RECORD_FILE)
    for path in run.glob(".*.tmp"):
        if path.is_file() and any(path.name.startswith(f".{name}.") for name in own):
            path.unlink(missing_ok=True)


def _count_steps(config: TrainConfig, n_tokens: int) -> int:
    total_tokens = config.epochs * n_tokens
    if config.max_tokens is not None:
        total_tokens = min(total_tokens, config.max_tokens)
    steps = total_tokens // config.batch_tokens
    if steps == 0:
        raise MlsaeError(
            f"--batch-tokens {config.batch_tokens} is more than the {total_tokens} tokens to train on; "
            "lower --batch-tokens, or raise --epochs or --max-tokens"
        )
    return steps


def train(config: TrainConfig, *, stop_after_steps: int | None = None) -> Path:
    """Train the SAE described by ``config``; returns the run directory.

    ``stop_after_steps`` stops this process after that many steps WITHOUT a final checkpoint, as a
    kill would (tests use it to check that --resume reproduces an uninterrupted run).
    """
    config.check()
    check_loggers_available(config.tensorboard, config.wandb)
    dist = Distributed.from_env(config.device)
    dataset = ActivationDataset(config.shards, config.layers)
    n_latents = config.expansion_factor * dataset.d_model
    if config.k > n_latents:
        raise MlsaeError(
            f"-k {config.k} is more than the {n_latents} latents ({config.expansion_factor} x d_model "
            f"{dataset.d_model}); lower -k or raise --expansion-factor"
        )
    if config.batch_tokens % dist.world_size:
        raise MlsaeError(f"--batch-tokens {config.batch_tokens} does not split evenly over {dist.world_size} processes")
    total_steps = _count_steps(config, dataset.n_tokens)

    generator = torch.Generator().manual_seed(config.seed)
    model = FAMILIES[config.arch](dataset.d_model, n_latents, config.k, dataset.layers, generator=generator)
    info = _run_info(config, dataset, model, total_steps)
    run = Path(config.out)
    checkpoint = _check_run_dir(run, config, info)
    if config.verify:
        damaged = dataset.damaged_shards() if dist.is_main else None
        message = None
        if damaged:
            message = f"{len(damaged)} damaged shard(s): {', '.join(damaged)}; rebuild them with mlsae-cache (`mlsae-cache verify` lists them)"
        message = dist.broadcast_error(message)
        if message:
            raise MlsaeError(message)

    dist.barrier()  # every process has checked the run directory before the first one writes to it

    # Every check has passed: from here on the run directory may be written.
    device = dist.device
    model.to(device)
    optimizer = make_optimizer(model, config.lr)
    tracker = DeadLatentTracker(model.dead_shape, config.dead_tokens, device)
    order = BatchOrder(dataset.n_tokens, config.batch_tokens, config.seed)
    start_step = 0
    if checkpoint is not None:
        start_step = int(load_checkpoint(checkpoint, model, optimizer, tracker)["step"])
    else:
        _init_b_pre(model, dataset, order)
    if dist.is_main:
        run.mkdir(parents=True, exist_ok=True)
        _drop_torn_writes(run)
        if checkpoint is None:
            atomic_write_text(run / CONFIG_FILE, json.dumps(info, indent=1) + "\n")
            record_files(run, [CONFIG_FILE])  # the weights and checkpoints carry their own checksums
    dist.barrier()

    steps = range(start_step, total_steps)
    if stop_after_steps is not None:
        steps = range(start_step, min(total_steps, start_step + stop_after_steps))
    log = MetricsLog(run, start_step, config.tensorboard, config.wandb, info["config"]) if dist.is_main else None
    try:
        metrics = _train_loop(config, dist, dataset, order, model, optimizer, tracker, steps, total_steps, log)
    finally:
        if log is not None:
            log.close()
    if start_step == total_steps:  # a kill between the last checkpoint and the weights, or deleted weights
        _save_final_weights(model, run, dist)
    if dist.is_main and config.progress:
        if start_step == total_steps:
            print(f"{run} is already trained to its last step ({run / SAE_FILE})", file=sys.stderr)
        elif steps.stop == total_steps:
            tokens = total_steps * config.batch_tokens
            print(f"trained: {run / SAE_FILE} (FVU {metrics['fvu']:.4f} after {tokens:,} tokens)", file=sys.stderr)
    return run


def _train_loop(config, dist, dataset, order, model, optimizer, tracker, steps: range, total_steps: int, log) -> dict:
    """Run ``steps``, logging every step and checkpointing every ``save_every_tokens`` and at the end."""
    device = dist.device
    matmul_dtype = torch.bfloat16 if device.type == "cuda" else None  # mixed precision: the encoder matmul
    screen = use_screen(config.screen, device, auto_on_gpu=False)
    bar = tqdm(
        total=total_steps, initial=steps.start, unit="step", desc="train", disable=not (config.progress and dist.is_main),
        dynamic_ncols=True, file=sys.stderr,
    )  # fmt: skip
    metrics: dict[str, Any] = {}
    every = config.save_every_tokens
    last_saved_step = steps.start  # the checkpoint this process resumed from (0: none)
    with bar, Prefetcher(dataset, order, steps, dist.rank, dist.world_size, pin_memory=device.type == "cuda") as batches:
        batch_iter = iter(batches)
        started = time.perf_counter()
        for step in steps:
            _, x = _next_batch(batch_iter, dist)
            x = x.to(device, non_blocking=True).float()  # the stored dtype crosses to the device, float32 is made there
            metrics = train_step(
                model, optimizer, tracker, x, config.batch_tokens, config.auxk_alpha, dist, matmul_dtype,
                config.micro_batch_tokens, screen,
            )  # fmt: skip
            problem = _non_finite(metrics, model)
            if problem is not None:  # stop before this step is logged or saved: the last checkpoint stays good
                raise _diverged(config, step, total_steps, problem, last_saved_step)
            now = time.perf_counter()
            tokens = (step + 1) * config.batch_tokens
            metrics = {"step": step, "tokens": tokens, **metrics, "tokens_per_s": config.batch_tokens / (now - started)}
            started = now
            if log is not None:
                log.log(metrics)
            bar.update(1)
            bar.set_postfix(
                loss=f"{metrics['loss']:.4f}", fvu=f"{metrics['fvu']:.4f}", auxk=f"{metrics['auxk']:.3g}",
                dead=f"{metrics['dead_fraction']:.1%}", tok_s=f"{metrics['tokens_per_s']:.0f}",
            )  # fmt: skip
            if step + 1 == total_steps or tokens // every > (tokens - config.batch_tokens) // every:
                progress = {"step": step + 1, "tokens": tokens, "total_steps": total_steps,
                            "total_tokens": total_steps * config.batch_tokens, "world_size": dist.world_size}  # fmt: skip
                _save(config, model, optimizer, tracker, dist, progress)
                last_saved_step = step + 1
    return metrics


# An FVU this large means the error is a million times the data's variance: float32 has not overflowed
# yet (--lr 1e6 sits at FVU ~1e25 for ever), but the weights are lost. Healthy runs stay below ~10
# even when a large learning rate makes them jump.
DIVERGED_FVU = 1e6


def _non_finite(metrics: dict[str, Any], model: Dictionary) -> str | None:
    """What went non-finite (or diverged past DIVERGED_FVU) in this step: its loss terms, then the
    weights after it; None when all is well.

    Every process holds the same summed loss and the same weights, so all of them stop together.
    """
    for name in ("loss", "fvu", "auxk"):
        if not math.isfinite(metrics[name]):
            return f"the {'AuxK loss' if name == 'auxk' else name} is {metrics[name]}"
    if metrics["fvu"] > DIVERGED_FVU:
        return f"the FVU is {metrics['fvu']:.3g}, over {DIVERGED_FVU:.0e} (an error that large only grows towards inf)"
    with torch.no_grad():  # a float64 sum is NaN or inf exactly when some entry is (float32 entries cannot overflow it)
        sums = torch.stack([getattr(model, name).sum(dtype=torch.float64) for name in ("W_enc", "W_dec", "b_pre")])
        if not torch.isfinite(sums).all():
            bad = [name for name, total in zip(("W_enc", "W_dec", "b_pre"), sums.tolist()) if not math.isfinite(total)]
            return f"the weights {', '.join(bad)} hold NaN or infinite values after it"
    return None


def _diverged(config: TrainConfig, step: int, total_steps: int, problem: str, last_saved_step: int) -> MlsaeError:
    kept = (
        f"the last good checkpoint (step {last_saved_step}) is kept"
        if last_saved_step > 0
        else "no checkpoint had been written yet"
    )
    return MlsaeError(
        f"training diverged at step {step + 1} of {total_steps}: {problem}; the learning rate (--lr {config.lr:g}) is "
        f"likely too high (or the cache holds extreme values); stopped without saving this step, {kept}; "
        "train again with a lower --lr in a new --out"
    )


def _next_batch(batch_iter, dist: Distributed) -> tuple[int, torch.Tensor]:
    """The next batch; if any process hit a data error, every process stops with an error."""
    error: MlsaeError | None = None
    item = None
    try:
        item = next(batch_iter)
    except MlsaeError as exc:
        error = exc
    if dist.world_size > 1:
        failed = dist.all_reduce_max_(torch.tensor([int(error is not None)], dtype=torch.int32, device=dist.device))
        if failed.item() and error is None:
            error = MlsaeError("another training process stopped on a data error (see its message); fix the data and --resume")
    if error is not None:
        raise error
    return item


@torch.no_grad()
def _init_b_pre(model: Dictionary, dataset: ActivationDataset, order: BatchOrder) -> None:
    """b_pre = geometric median of the first global batch, standardized, as the family takes it (every
    process computes the same)."""
    indices = order.global_batch(0)
    first = dataset.read(indices)
    dataset.check_finite(first, indices)
    model.init_b_pre_(torch.from_numpy(first).to(model.b_pre.device))  # [N, L, d]


def _save_final_weights(model: Dictionary, run: Path, dist: Distributed) -> None:
    """The weights of a run resumed at its last step, with the progress of the (verified) checkpoint they come from."""
    if dist.is_main:
        save_sae(model, run / SAE_FILE, read_progress(run / CHECKPOINT_FILE))
    dist.barrier()


def _save(config: TrainConfig, model, optimizer, tracker, dist: Distributed, progress: dict) -> None:
    run = Path(config.out)
    if dist.is_main:
        # weights first, recording their progress: a run killed between the two files has final weights
        # (run_is_finished), and an older checkpoint that --resume redoes the last steps from
        save_sae(model, run / SAE_FILE, progress)
        save_checkpoint(run / CHECKPOINT_FILE, model, optimizer, tracker, progress)
    dist.barrier()

