"""The training loop every training script here runs: shuffled epochs of fixed-size batches, scheduled learning
rate, clipped AdamW steps, a running loss, and an evaluation every `eval_every` steps and at the end.

Random draws, in order: torch.manual_seed(seed) for the model's own randomness, then one generator seeded with
`seed` that draws each epoch's permutation and whatever the script's `losses` draws from it per batch (flips).
The bundled models depend on this order; keep it."""
from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch

log = logging.getLogger(__name__)

CALIBRATION_STEPS = 10  # with `minutes`: steps timed before the step count is fixed

# (indices of this batch's examples, the order generator) -> named losses; "loss" is the one minimized.
Losses = Callable[[torch.Tensor, torch.Generator], dict[str, torch.Tensor]]


@dataclass(frozen=True)
class Loop:
    desc: str  # the progress bar's label
    seed: int
    batch_size: int
    epochs: float
    steps: int | None = None  # None: from epochs (or from minutes)
    minutes: float | None = None  # with steps None: as many steps as fit, timed over CALIBRATION_STEPS
    clip: float = 1.0  # gradient-norm clip
    eval_every: int | None = None  # steps between evaluations; None: once per epoch
    progress: bool = True


def run(model: torch.nn.Module, opt: torch.optim.Optimizer, n: int, loop: Loop, lr_at: Callable[[int, int], float],
        losses: Losses, evaluate: Callable[[], dict] | None = None) -> tuple[list[dict], int]:
    """Train `model` in place on `n` examples; returns (one record per evaluation, steps taken). lr_at(step, total)
    is the scheduled rate, scaled per group by its "lr_scale" (train/optim.py)."""
    from tqdm import tqdm

    torch.manual_seed(loop.seed)
    order = torch.Generator().manual_seed(loop.seed)
    batch = min(loop.batch_size, n)
    steps_per_epoch = n // batch
    total = loop.steps or max(round(loop.epochs * steps_per_epoch), 1)
    calibrate = bool(loop.minutes) and not loop.steps
    eval_every = loop.eval_every or steps_per_epoch
    history: list[dict] = []
    step, seen = 0, 0
    running: dict[str, float] = {}
    started = 0.0
    bar = tqdm(total=None if calibrate else total, desc=loop.desc, unit="step", file=sys.stderr,
               disable=not loop.progress)
    while step < total:
        perm = torch.randperm(n, generator=order)
        for start in range(0, steps_per_epoch * batch, batch):
            if step >= total:
                break
            index = perm[start:start + batch]
            for group in opt.param_groups:
                group["lr"] = lr_at(step, total) * group["lr_scale"]
            model.train()
            named = losses(index, order)
            opt.zero_grad(set_to_none=True)
            named["loss"].backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), loop.clip)
            opt.step()
            step += 1
            seen += len(index)
            for key, value in named.items():
                running[key] = value.item() if step == 1 else 0.98 * running[key] + 0.02 * value.item()
            bar.update(1)
            bar.set_postfix({**{k: f"{v:.3f}" for k, v in running.items()}, "lr": f"{lr_at(step - 1, total):.1e}"})
            if step == 1:
                started = time.time()  # the first step pays one-time costs
            if calibrate and step == 1 + CALIBRATION_STEPS:
                per_step = (time.time() - started) / CALIBRATION_STEPS
                total = max(int(loop.minutes * 60 / per_step), step)
                bar.total = total
                log.info("%.2f s/step: %d steps fit in %.1f minutes (--steps %d repeats this run)", per_step, total,
                         loop.minutes, total)
            if step % eval_every == 0 or step == total:
                record = {"step": step, "epoch": round(seen / n, 2), **{k: round(v, 4) for k, v in running.items()}}
                if evaluate is not None:
                    record.update(evaluate())
                history.append(record)
                log.info("%s", json.dumps(record))
    bar.close()
    model.eval()
    return history, step
