"""Training and evaluation loops, and the keep-rate schedule (SPEC 2)."""
import math
from typing import Callable, Dict, Iterable, Optional

import torch
import torch.nn as nn

from utils import MetricLogger, SmoothedValue, all_reduce_sum, amp_autocast, check_finite_losses

LOG_EVERY = 10
"""Iterations between progress lines and tensorboard points."""
TOP_K = 5
"""The second accuracy reported (acc5): a hit among the K highest logits."""
PERCENT = 100.


def keep_rate_at(iteration: int, iters_per_epoch: int, base_keep_rate: float,
                 shrink_start_epoch: int, shrink_epochs: int) -> float:
    """Keep rate in force at global training ``iteration`` (counted from epoch 0).

    1 before ``shrink_start_epoch``, ``base_keep_rate`` from ``shrink_start_epoch +
    shrink_epochs`` on, and a half-cosine from 1 down to ``base_keep_rate`` in between.
    """
    epoch = iteration // iters_per_epoch
    if epoch < shrink_start_epoch:
        return 1.
    if epoch >= shrink_start_epoch + shrink_epochs:
        return base_keep_rate
    progress = (iteration - iters_per_epoch * shrink_start_epoch) / (iters_per_epoch * shrink_epochs)
    return base_keep_rate + (1 - base_keep_rate) * (math.cos(math.pi * progress) + 1) / 2


def reduction_kwargs(keep_rate: Optional[float],
                     token_counts: Optional[Callable[[float], list]]) -> dict:
    """Keyword arguments that make the model reduce tokens at ``keep_rate``.

    None (plain timm models, the DeiT baselines, or the configured rates) gives none. With
    ``token_counts`` (``MTViT.token_counts``) the model gets its per-block token counts
    rather than the rate: under torch.compile an int becomes a dynamic size after one
    recompilation, while a float rate would be specialised, one recompilation for every value
    the keep-rate schedule takes.
    """
    if keep_rate is None:
        return {}
    if token_counts is None:
        return {'keep_rate': keep_rate}
    return {'tokens': token_counts(keep_rate)}


def train_one_epoch(
        model: nn.Module,
        criterion: nn.Module,
        data_loader: Iterable,
        optimizer: torch.optim.Optimizer,
        device: torch.device,
        epoch: int,
        loss_scaler: torch.amp.GradScaler,
        amp_dtype: Optional[torch.dtype] = None,
        clip_grad: Optional[float] = None,
        model_ema=None,
        mixup_fn: Optional[Callable] = None,
        keep_rate_schedule: Optional[Callable[[int], float]] = None,
        token_counts: Optional[Callable[[float], list]] = None,
        set_training_mode: bool = True,
        writer=None,
        print_freq: int = LOG_EVERY,
        first_iteration: int = 0,
        should_stop: Optional[Callable[[bool], int]] = None,
) -> Dict[str, float]:
    """Trains one epoch.

    The losses stay on the device between progress lines (every ``print_freq`` steps), so
    that the host does not wait for the device at every step; they are checked for NaN/inf
    there, on every process.

    Args:
        data_loader: batches of images (B, 3, H, W) and class indices (B,); ``mixup_fn`` turns
            the indices into soft targets (B, K) for the criterion.
        amp_dtype: autocast dtype (torch.float16 or torch.bfloat16), None for full precision.
        keep_rate_schedule: global iteration -> keep rate at that step; None for models
            without token reduction.
        token_counts: keep rate -> the model's ``tokens`` argument (``MTViT.token_counts``).
        set_training_mode: False keeps the model in eval mode (finetuning, as the release does).
        writer: a tensorboardX SummaryWriter (main process only) or None.
        first_iteration: steps of this epoch already taken (a run resumed inside an epoch);
            ``data_loader`` then yields only the remaining batches.
        should_stop: polled after every step but the epoch's last with whether the losses
            are being checked at this step; a non-zero answer (a signal's number) ends the
            epoch early.
    Returns:
        global averages of the meters (loss, lr) over all processes, ``keep_rate``: the rate
        reached at the end of the epoch, ``resumed_at_step`` when the epoch started there (the
        averages are of its steps from there on), and, when
        ``should_stop`` ended the epoch, ``stopped_after`` (the steps of the epoch taken) and
        ``stopped_by`` (its answer).
    Raises:
        NonFiniteLossError: the loss became NaN or infinite on any process.
    """
    model.train(set_training_mode)
    metric_logger = MetricLogger(device=device)
    metric_logger.add_meter('lr', SmoothedValue(window_size=1, fmt='{value:.6f}'))
    iters_per_epoch = first_iteration + len(data_loader)
    header = f'Epoch: [{epoch}]'
    pending_losses = []
    keep_rate = None
    stop_answer = 0
    for step, (samples, targets) in enumerate(
            metric_logger.log_every(data_loader, print_freq, header), start=first_iteration):
        iteration = epoch * iters_per_epoch + step
        samples = samples.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        if mixup_fn is not None:
            samples, targets = mixup_fn(samples, targets)
        keep_rate = keep_rate_schedule(iteration) if keep_rate_schedule else None

        with amp_autocast(device, amp_dtype):
            outputs = model(samples, **reduction_kwargs(keep_rate, token_counts))
            loss = criterion(samples, outputs, targets)
        pending_losses.append(loss.detach())

        optimizer.zero_grad(set_to_none=True)
        loss_scaler.scale(loss).backward()
        if clip_grad is not None:
            loss_scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
        loss_scaler.step(optimizer)
        loss_scaler.update()
        if model_ema is not None:
            model_ema.update(model)

        lr = optimizer.param_groups[0]['lr']
        metric_logger.update(lr=lr)
        if keep_rate is not None:
            metric_logger.update(keep_rate=keep_rate)
        last_step = step == iters_per_epoch - 1
        at_check = step % print_freq == 0 or last_step
        if should_stop is not None and not last_step:
            stop_answer = should_stop(at_check)
        if at_check or stop_answer:
            losses = check_finite_losses(torch.stack(pending_losses), epoch,
                                         step + 1 - len(pending_losses))
            pending_losses.clear()
            for loss_value in losses:
                metric_logger.update(loss=loss_value)
            if writer is not None:
                writer.add_scalar('loss', losses[-1], iteration)
                writer.add_scalar('lr', lr, iteration)
                if keep_rate is not None:
                    writer.add_scalar('keep_rate', keep_rate, iteration)
        if stop_answer:
            break
    metric_logger.synchronize_between_processes()
    print('Averaged stats:', metric_logger)
    stats = {name: meter.global_avg for name, meter in metric_logger.meters.items()}
    if keep_rate is not None:
        stats['keep_rate'] = keep_rate  # the rate reached at the end of the epoch
    if first_iteration:  # the averages are of the steps since, not of the whole epoch
        stats['resumed_at_step'] = first_iteration
    if stop_answer:
        stats.update(stopped_after=step + 1, stopped_by=stop_answer)
    return stats


@torch.no_grad()
def evaluate(data_loader: Iterable, model: nn.Module, device: torch.device,
             keep_rate: Optional[float] = None, amp_dtype: Optional[torch.dtype] = None,
             sharded: bool = False, token_counts: Optional[Callable[[float], list]] = None,
             print_freq: int = LOG_EVERY) -> Dict[str, float]:
    """Top-1/top-5 accuracy (%) and cross-entropy of ``model`` on the loader's samples: images
    (B, 3, H, W) and class indices (B,), the model's logits (B, K); top-5 is top-K below 5 classes.

    The counts are accumulated on the device; the host reads them only for progress lines.
    With ``sharded`` (each process holds a disjoint part of the data), correct counts and loss
    sums are added up over the processes, so the result equals a single-process evaluation.
    ``keep_rate`` None uses the model's configured rates; see ``reduction_kwargs``.
    """
    criterion = nn.CrossEntropyLoss(reduction='sum')
    model.eval()
    metric_logger = MetricLogger(device=device)
    model_kwargs = reduction_kwargs(keep_rate, token_counts)
    # [samples, top-1 correct, top-5 correct, loss sum]
    totals = torch.zeros(4, dtype=torch.float64, device=device)
    for step, (images, targets) in enumerate(
            metric_logger.log_every(data_loader, print_freq, 'Test:')):
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        with amp_autocast(device, amp_dtype):
            outputs = model(images, **model_kwargs)
        outputs = outputs.float()
        top5 = outputs.topk(min(TOP_K, outputs.shape[1]), dim=1).indices
        hits = top5 == targets.unsqueeze(1)
        totals += torch.stack([torch.tensor(float(len(targets)), device=device),
                               hits[:, 0].sum(), hits.any(dim=1).sum(),
                               criterion(outputs, targets)]).double()
        if step % print_freq == 0 or step == len(data_loader) - 1:
            seen, correct1, _, loss_sum = totals.tolist()
            metric_logger.update(loss=loss_sum / seen, acc1=PERCENT * correct1 / seen)
    if sharded:
        totals = all_reduce_sum(totals)
    num_samples, correct1, correct5, loss_sum = totals.tolist()
    stats = {'acc1': PERCENT * correct1 / num_samples, 'acc5': PERCENT * correct5 / num_samples,
             'loss': loss_sum / num_samples, 'num_samples': int(num_samples)}
    print(f'* Acc@1 {stats["acc1"]:.3f} Acc@5 {stats["acc5"]:.3f} loss {stats["loss"]:.3f}')
    return stats
