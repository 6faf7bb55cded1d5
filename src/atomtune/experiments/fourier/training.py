"""Training one block of the toy: Adam under a one-cycle schedule, the L1 weight ramped up.

Both blocks see the same batches in the same order (one batch generator per seed), so their errors
and atom counts differ by the block alone.
"""

from __future__ import annotations

import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor

import torch

from atomtune.core.losses import l1_sparsity, orthogonality
from atomtune.experiments.fourier.block import FourierBlock
from atomtune.experiments.fourier.settings import KINDS, FourierSettings
from atomtune.progress import progress_bar


def train_block(
    kind: str,
    settings: FourierSettings,
    lift: torch.Tensor,
    train: tuple[torch.Tensor, torch.Tensor],
    progress: bool = True,
) -> tuple[FourierBlock, list[float]]:
    """Train one block on ``train`` (signals, masks); return it and its per-step reconstruction loss."""
    s = settings
    torch.manual_seed(s.seed * 1000 + KINDS.index(kind))
    block = FourierBlock(kind, s, lift)
    lr = s.lr_dense if kind == "dense" else s.lr_sparse
    # λ learns at lambda_lr_scale·lr: under Adam the L1 term's small but steady push on λ raises the
    # thresholds at the full rate, and on seed 2 every code died mid-run (masked NMSE back to 1.0).
    if kind == "sparse":
        others = [p for name, p in block.named_parameters() if name != "lam"]
        groups = [{"params": others, "lr": lr}, {"params": [block.lam], "lr": lr * s.lambda_lr_scale}]
    else:
        groups = [{"params": list(block.parameters()), "lr": lr}]
    opt = torch.optim.Adam(groups)
    max_lrs = [group["lr"] for group in groups]
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lrs, total_steps=s.steps, pct_start=0.1)
    batches = torch.Generator().manual_seed(s.seed * 1000 + 17)  # the same batches for both blocks
    x_all, m_all = train
    losses: list[float] = []
    bar = progress_bar(range(s.steps), desc=f"fourier {kind}", disable=not progress, dynamic_ncols=True)
    warmup = max(1, int(s.sparsity_warmup * s.steps))
    for step in bar:
        idx = torch.randint(len(x_all), (s.batch_size,), generator=batches)
        x, m = x_all[idx], m_all[idx]
        y, _, S = block(x, m)
        if s.masked_loss:  # relative error over the masked samples only (the measured error)
            rec = ((y - x) * (1 - m)).pow(2).sum() / (x * (1 - m)).pow(2).sum()
        else:
            rec = (y - x).pow(2).mean() / x.pow(2).mean()  # relative error over all 64 samples
        loss = rec
        if kind == "sparse":
            # Ramped so the codes first learn to reconstruct; at full weight from the start they die.
            loss = loss + s.sparsity_weight * min(1.0, step / warmup) * l1_sparsity(S)
            if s.orthogonality_weight:
                loss = loss + s.orthogonality_weight * orthogonality(block.D)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if s.grad_clip:
            torch.nn.utils.clip_grad_norm_(block.parameters(), s.grad_clip)
        opt.step()
        sched.step()
        losses.append(rec.item())
        if len(losses) % 50 == 0:
            bar.set_postfix(rec=f"{sum(losses[-50:]) / 50:.3f}")
    bar.close()
    return block, losses


def _train_in_worker(
    kind: str,
    settings: FourierSettings,
    lift: torch.Tensor,
    train: tuple[torch.Tensor, torch.Tensor],
    threads: int,
) -> tuple[dict[str, torch.Tensor], list[float], float, float]:
    """``train_block`` in a worker process: its state, losses, seconds and CPU seconds (a state pickles)."""
    torch.set_num_threads(threads)
    start, cpu_start = time.perf_counter(), time.process_time()
    block, losses = train_block(kind, settings, lift, train, progress=False)
    return block.state_dict(), losses, time.perf_counter() - start, time.process_time() - cpu_start


def train_blocks(
    settings: FourierSettings,
    lift: torch.Tensor,
    train: tuple[torch.Tensor, torch.Tensor],
    progress: bool = True,
    processes: int = 1,
) -> dict[str, tuple[FourierBlock, list[float], float, float]]:
    """Train both blocks; per kind, the block, its losses, its training seconds and CPU seconds.

    ``processes`` = 2 trains the two blocks at once in two worker processes, each with half of this
    process's threads (at least one): at these sizes two single-thread runs side by side finish
    sooner than one after the other on two threads. The workers show no progress bar.
    """
    if processes <= 1:
        trained = {}
        for kind in KINDS:
            start, cpu_start = time.perf_counter(), time.process_time()
            block, losses = train_block(kind, settings, lift, train, progress)
            trained[kind] = (block, losses, time.perf_counter() - start, time.process_time() - cpu_start)
        return trained
    threads = max(1, torch.get_num_threads() // 2)
    context = multiprocessing.get_context("spawn")  # a fork of a process with threads can hang
    with ProcessPoolExecutor(max_workers=2, mp_context=context) as pool:
        futures = {
            kind: pool.submit(_train_in_worker, kind, settings, lift, train, threads) for kind in KINDS
        }
        trained = {}
        for kind, future in futures.items():
            state, losses, seconds, cpu_seconds = future.result()
            block = FourierBlock(kind, settings, lift)
            block.load_state_dict(state)
            trained[kind] = (block, losses, seconds, cpu_seconds)
    return trained
