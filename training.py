"""The training run: optimizer, learning-rate schedule, EMA and loss scaler built from explicit
settings; the run's state saved to and restored from a checkpoint, at an epoch's end or inside an
epoch; the epoch loop; and preemption by SIGTERM or SIGUSR1, which ends the run with a mid-epoch
checkpoint from which ``--resume`` continues exactly."""
import datetime
import inspect
import json
import os
import signal
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from checkpoints import CheckpointError, save_checkpoint_atomic
from engine import evaluate, train_one_epoch
from utils import (NonFiniteLossError, all_gather_object, all_reduce_min, get_rng_state,
                   is_dist_initialized, is_main_process, set_rng_state, warn_if_low_space)

LR_REFERENCE_BATCH = 512
"""The learning rate given on the command line is for this many images per step (DeiT)."""

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
"""What a scheduler sends before it kills a job (SLURM: SIGTERM, or SIGUSR1 with --signal), and
Ctrl-C (SIGINT; a second one interrupts at once, without saving)."""

POSITION_EMBEDDING_NAMES = ('pos_embed', 'pos_embed_list')


class Preempted(Exception):
    """The run stopped on a stop signal after saving its state; ``exit_status`` is 128 + the
    signal's number, the shell's convention for a process ended by that signal."""

    def __init__(self, message: str, signal_number: int):
        super().__init__(message)
        self.exit_status = 128 + signal_number


# Optimizer settings that choose how, not what, it computes.
IMPLEMENTATION_KEYS = ('fused', 'foreach')
# Fused on CUDA since PyTorch 2.0-2.2 (timm's adam, adamw, sgd, nesterov, momentum), with the
# loss scaler's overflow check taken on the device.
FUSED_OPTIMIZERS = (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD)


def count_parameters(model: nn.Module) -> int:
    """Trainable parameters of ``model``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def scaled_lr(lr: float, batch_size: int, world_size: int) -> float:
    """DeiT's linear scaling: ``lr`` is per ``LR_REFERENCE_BATCH`` images of the global batch."""
    return lr * batch_size * world_size / LR_REFERENCE_BATCH


def build_optimizer(model: nn.Module, *, opt: str, lr: float, weight_decay: float,
                    momentum: float, eps: float, betas: Optional[Sequence[float]] = None,
                    decay_position_embeddings: bool = True,
                    fused: bool = False) -> torch.optim.Optimizer:
    """timm's optimizer ``opt`` over ``model``'s parameters, with weight decay on all but the
    1-d ones (biases, norms) and those ``model.no_weight_decay()`` names.

    ``fused=True`` takes torch's fused implementation where ``opt`` is one of FUSED_OPTIMIZERS
    (others are unchanged). Besides fewer launches, it takes the GradScaler's overflow check as
    a device tensor, where the others make ``GradScaler.step`` read it on the host: with fp16
    autocast, a wait for the GPU at every step.

    ``decay_position_embeddings=True`` decays the position embeddings even where the model
    names them: the original release's MTViT excluded ``pos_embed_list``, a name that matched
    no parameter, so its optimizer decayed ``pos_embed_list.0/1`` and ``pos_embed``.
    """
    from timm.optim import create_optimizer_v2, get_optimizer_class, param_groups_weight_decay
    no_decay = set(model.no_weight_decay()) if hasattr(model, 'no_weight_decay') else set()
    if decay_position_embeddings:
        no_decay = {name for name in no_decay
                    if name.split('.')[0] not in POSITION_EMBEDDING_NAMES}
    groups = param_groups_weight_decay(model, weight_decay=weight_decay,
                                       no_weight_decay_list=sorted(no_decay))
    kwargs = dict(eps=eps)
    if betas:
        kwargs['betas'] = tuple(betas)
    if fused and issubclass(get_optimizer_class(opt, bind_defaults=False), FUSED_OPTIMIZERS):
        kwargs['fused'] = True
    return create_optimizer_v2(groups, opt=opt, lr=lr, weight_decay=weight_decay,
                               momentum=momentum, **kwargs)


def build_scheduler(optimizer: torch.optim.Optimizer, *, sched: str, epochs: int,
                    warmup_epochs: int, warmup_lr: float, min_lr: float, cooldown_epochs: int,
                    decay_epochs: float = 30, decay_rate: float = 0.1, patience_epochs: int = 10,
                    noise: Optional[Sequence[float]] = None, noise_pct: float = 0.67,
                    noise_std: float = 1.0, seed: int = 0):
    """timm's per-epoch learning-rate scheduler (warm-up, then ``sched``, then cool-down); it is
    stepped with the epoch just finished."""
    from timm.scheduler import create_scheduler_v2
    scheduler, _ = create_scheduler_v2(
        optimizer, sched=sched, num_epochs=epochs, decay_epochs=decay_epochs,
        cooldown_epochs=cooldown_epochs, patience_epochs=patience_epochs, decay_rate=decay_rate,
        min_lr=min_lr, warmup_lr=warmup_lr, warmup_epochs=warmup_epochs, noise=noise,
        noise_pct=noise_pct, noise_std=noise_std, noise_seed=seed)
    return scheduler


def build_ema(model: nn.Module, *, decay: float, force_cpu: bool = False):
    """timm's ModelEmaV3 of ``model``: it updates all weights in a few fused (foreach) kernels,
    not one per tensor."""
    from timm.utils import ModelEmaV3
    return ModelEmaV3(model, decay=decay, device=torch.device('cpu') if force_cpu else None)


def wrap_distributed(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` under DistributedDataParallel (one device per process on CUDA). Buffers a
    checkpoint saves can change in training (a CNN's BatchNorm statistics): rank 0's go to
    every process at each training forward, as in DeiT. MTViT's buffers are constants of its
    grid, not saved, and not broadcast at each forward."""
    saved = model.state_dict()
    ddp = torch.nn.parallel.DistributedDataParallel
    # PyTorch 2.14 renamed the option (the old name warns at every start); 2.11 knows the old one.
    option = ('forward_sync_buffers' if 'forward_sync_buffers' in inspect.signature(ddp).parameters
              else 'broadcast_buffers')
    return ddp(model, device_ids=[device.index] if device.type == 'cuda' else None,
               **{option: any(name in saved for name, _ in model.named_buffers())})


def without_ddp(model: nn.Module, compile_mode: Optional[str] = None) -> nn.Module:
    """The model a DDP wrapper holds, for evaluation: a DDP forward after training broadcasts
    the buffers, a collective that hangs when a process has no evaluation batch (a validation
    set smaller than the processes under --dist-eval). A compiled DDP model gives the held
    model compiled in ``compile_mode``, the wrapper's (its own graphs: evaluation is traced
    apart from training anyway)."""
    ddp = torch.nn.parallel.DistributedDataParallel
    compiled = getattr(model, '_orig_mod', None)  # what torch.compile wrapped
    if isinstance(compiled, ddp):
        return torch.compile(compiled.module, mode=compile_mode)
    return model.module if isinstance(model, ddp) else model


@dataclass
class TrainingState:
    """Everything a training step changes, which a checkpoint must hold to continue exactly."""

    model: nn.Module  # not wrapped by DDP or torch.compile
    optimizer: torch.optim.Optimizer
    lr_scheduler: Any
    loss_scaler: torch.amp.GradScaler
    model_ema: Any = None

    def checkpoint_bytes(self) -> int:
        """Size of a checkpoint before the first save: the weights, the EMA and two moments per
        weight (Adam-like optimizers; SGD with momentum needs less)."""
        weight_bytes = sum(p.numel() * p.element_size() for p in self.model.parameters())
        return (3 + (self.model_ema is not None)) * weight_bytes

    def save(self, path: str, *, epoch: int, iteration: int, run_args: Dict[str, Any]) -> None:
        """Writes the state to ``path`` (atomically, by the main process; every process must call
        it, since each one's random state is gathered).

        ``epoch`` is the last epoch finished and ``iteration`` the number of steps of the next
        epoch already taken (0 at an epoch's end).
        """
        rng_states = all_gather_object(get_rng_state())
        state = {'model': self.model.state_dict(), 'optimizer': self.optimizer.state_dict(),
                 'lr_scheduler': self.lr_scheduler.state_dict(), 'epoch': epoch,
                 'iteration': iteration, 'scaler': self.loss_scaler.state_dict(),
                 'args': run_args, 'rng_states': rng_states}
        if self.model_ema is not None:
            state['model_ema'] = self.model_ema.module.state_dict()
        non_finite = [name for name, tensor in state['model'].items()
                      if tensor.is_floating_point() and not torch.isfinite(tensor).all()]
        if non_finite:
            raise NonFiniteLossError(f'weights became non-finite at epoch {epoch + bool(iteration)} '
                                     f'({", ".join(non_finite[:4])}); not saving, {path} is kept')
        save_checkpoint_atomic(state, path)

    def restore(self, checkpoint: dict, *, rank: int, world_size: int, batch_size: int,
                path: str = 'the checkpoint') -> Tuple[int, int]:
        """Loads the optimizer, schedule, scaler, EMA and (when the checkpoint has one per
        process of this run) the random state from ``checkpoint`` (the model's weights are
        loaded before); returns ``(start_epoch, first_iteration)``.

        Raises:
            CheckpointError: the optimizer state does not fit this model's parameters (another
                optimizer, parameter order or weight-decay grouping), or a run stopped inside an
                epoch is resumed with another batch size or number of processes (its place in
                the epoch's order would be another).
        """
        iteration = checkpoint.get('iteration', 0)
        rng_states = checkpoint.get('rng_states') or []
        if iteration:
            saved_batch = (checkpoint.get('args') or {}).get('batch_size', batch_size)
            saved_world = len(rng_states) or world_size
            where = f'{path} stopped after {iteration} steps of epoch {checkpoint["epoch"] + 1}'
            if saved_batch != batch_size:
                raise CheckpointError(f'{where} with --batch-size {saved_batch}: resume it with '
                                      f'the same (not {batch_size})')
            if saved_world != world_size:
                raise CheckpointError(f'{where} in {saved_world} processes: resume it with as '
                                      f'many (not {world_size})')
        check_optimizer_state(self.optimizer, checkpoint['optimizer'], path)
        # The saved groups carry their run's implementation (fused or foreach, chosen for its
        # device); this run keeps the one chosen for its own. Set before loading: torch places
        # the loaded state by it (a fused Adam's step counts on the parameters' device).
        saved = checkpoint['optimizer']
        self.optimizer.load_state_dict({**saved, 'param_groups': [
            {**group, **{key: own[key] for key in IMPLEMENTATION_KEYS if key in own}}
            for group, own in zip(saved['param_groups'], self.optimizer.param_groups)]})
        self.lr_scheduler.load_state_dict(checkpoint['lr_scheduler'])
        if checkpoint.get('scaler'):  # empty when saved without fp16 AMP: nothing to restore
            self.loss_scaler.load_state_dict(checkpoint['scaler'])
        if self.model_ema is not None and 'model_ema' in checkpoint:
            self.model_ema.module.load_state_dict(checkpoint['model_ema'])
        if len(rng_states) == world_size:
            set_rng_state(rng_states[rank])
        return checkpoint['epoch'] + 1, iteration


def check_optimizer_state(optimizer: torch.optim.Optimizer, saved: dict, path: str) -> None:
    """Raises CheckpointError unless ``saved`` (an optimizer's state_dict) has this optimizer's
    groups and, for every parameter, per-parameter tensors of that parameter's shape; torch would
    load a mismatch silently and fail at the first step."""
    saved_groups = saved.get('param_groups', [])
    sizes = [len(group['params']) for group in optimizer.param_groups]
    saved_sizes = [len(group['params']) for group in saved_groups]
    if sizes != saved_sizes:
        raise CheckpointError(f'{path}: its optimizer state has parameter groups of '
                              f'{saved_sizes} parameters, this run {sizes} (another model, '
                              f'optimizer or weight-decay grouping)')
    for group, saved_group in zip(optimizer.param_groups, saved_groups):
        for parameter, key in zip(group['params'], saved_group['params']):
            for name, value in saved.get('state', {}).get(key, {}).items():
                if torch.is_tensor(value) and value.dim() and value.shape != parameter.shape:
                    raise CheckpointError(
                        f'{path}: optimizer state {name!r} of parameter {key} has shape '
                        f'{tuple(value.shape)}, the parameter {tuple(parameter.shape)}')


class StopSignals:
    """While active, the ``STOP_SIGNALS`` only set a flag, which the training loop polls between
    steps; the previous handlers come back on exit. Outside the main thread (where Python
    cannot install handlers) it does nothing."""

    def __init__(self, device: torch.device):
        self.device = device
        self.received = 0
        self._previous = {}

    def _handle(self, signal_number, _frame):
        if signal_number == signal.SIGINT and self.received == signal.SIGINT:
            raise KeyboardInterrupt  # Ctrl-C twice: stop now, without saving
        self.received = signal_number

    def __enter__(self) -> 'StopSignals':
        try:
            for signal_number in STOP_SIGNALS:
                self._previous[signal_number] = signal.signal(signal_number, self._handle)
        except ValueError:  # not the main thread
            pass
        return self

    def __exit__(self, *exc_info):
        for signal_number, handler in self._previous.items():
            signal.signal(signal_number, handler)

    def agreed(self, at_sync_point: bool = True) -> int:
        """The stop signal's number when the run must stop now, else 0.

        With several processes a signal reaches each at a different step, so they decide
        together, only at ``at_sync_point`` steps (where the losses are checked anyway: no extra
        wait for the device): every process stops if one received a signal.
        """
        if not is_dist_initialized():
            return self.received
        if not at_sync_point:
            return 0
        flag = torch.tensor([-self.received], dtype=torch.int64, device=self.device)
        return -int(all_reduce_min(flag).item())


def ignore_stop_signals(_worker_id: int) -> None:
    """Data-loader ``worker_init_fn``: a scheduler signals every process of a job, and a worker
    killed by SIGTERM would end the run before it could save; the loader still shuts its
    workers down."""
    for signal_number in STOP_SIGNALS:
        signal.signal(signal_number, signal.SIG_IGN)


@dataclass
class EpochLoop:
    """How the epochs run: the settings of ``fit`` that stay the same for every epoch."""

    device: torch.device
    epochs: int
    amp_dtype: Optional[torch.dtype] = None
    clip_grad: Optional[float] = None
    keep_rate_schedule: Optional[Callable[[int], float]] = None
    token_counts: Optional[Callable[[float], list]] = None
    set_training_mode: bool = True
    sharded_eval: bool = False
    print_freq: int = 10
    checkpoint_path: str = ''
    output_dir: str = ''
    n_parameters: int = 0
    compile_mode: Optional[str] = None  # torch.compile's, where the model is compiled


def fit(model: nn.Module, state: TrainingState, loop: EpochLoop, *, criterion: nn.Module,
        train_loader: Iterable, val_loader: Iterable, mixup_fn: Optional[Callable] = None,
        start_epoch: int = 0, first_iteration: int = 0,
        run_args: Optional[Dict[str, Any]] = None) -> Optional[Dict[str, float]]:
    """Trains ``model`` (``state.model``, possibly wrapped by DDP or torch.compile) from
    ``start_epoch`` (its ``first_iteration``-th step) to ``loop.epochs``, evaluating,
    checkpointing and logging after every epoch; returns the last evaluation's stats.

    Raises:
        Preempted: a stop signal arrived; the state was saved to ``loop.checkpoint_path``.
    """
    writer = None
    if loop.output_dir and is_main_process():
        from tensorboardX import SummaryWriter
        warn_if_low_space(loop.output_dir, state.checkpoint_bytes())
        writer = SummaryWriter(logdir=os.path.join(loop.output_dir, 'runs'))
    if hasattr(val_loader, 'start_workers'):
        val_loader.start_workers()  # before any collective is in flight
    print(f'Start training for {loop.epochs} epochs')
    start_time = time.time()
    test_stats = None
    eval_model = without_ddp(model, loop.compile_mode)
    try:
        with StopSignals(loop.device) as stop:
            for epoch in range(start_epoch, loop.epochs):
                _set_epoch(train_loader, epoch, first_iteration)
                train_stats = train_one_epoch(
                    model, criterion, train_loader, state.optimizer, loop.device, epoch,
                    state.loss_scaler, amp_dtype=loop.amp_dtype, clip_grad=loop.clip_grad,
                    model_ema=state.model_ema, mixup_fn=mixup_fn,
                    keep_rate_schedule=loop.keep_rate_schedule, token_counts=loop.token_counts,
                    set_training_mode=loop.set_training_mode, writer=writer,
                    print_freq=loop.print_freq, first_iteration=first_iteration,
                    should_stop=stop.agreed)
                first_iteration = 0
                if 'stopped_after' in train_stats:
                    _stop(state, loop, train_stats['stopped_by'], epoch,
                          train_stats['stopped_after'], run_args)
                state.lr_scheduler.step(epoch)
                test_stats = evaluate(val_loader, eval_model, loop.device,
                                      keep_rate=train_stats.get('keep_rate'),
                                      amp_dtype=loop.amp_dtype, sharded=loop.sharded_eval,
                                      token_counts=loop.token_counts)
                print(f'Accuracy of the network on the {test_stats["num_samples"]} test images: '
                      f'{test_stats["acc1"]:.1f}%')
                if loop.checkpoint_path:
                    state.save(loop.checkpoint_path, epoch=epoch, iteration=0, run_args=run_args)
                _log_epoch(writer, loop, epoch, train_stats, test_stats)
                signal_number = stop.agreed()
                if signal_number and epoch + 1 < loop.epochs:
                    _stop(state, loop, signal_number, epoch + 1, 0, run_args, saved=True)
    finally:  # also when training stops on an error: flushes the events, ends the thread
        if writer is not None:
            writer.close()
    print(f'Training time {datetime.timedelta(seconds=int(time.time() - start_time))}')
    return test_stats


def _set_epoch(train_loader, epoch: int, first_iteration: int) -> None:
    """Selects the epoch's order and seeds (a ``SeededSampler``), starting after the batches of
    ``first_iteration`` steps (resuming inside an epoch, which needs a ``SeededSampler``); at
    an epoch's start a loader whose sampler has no epochs is left as it is."""
    sampler = train_loader.sampler
    if first_iteration:
        sampler.set_epoch(epoch, start=first_iteration * train_loader.batch_size)
    elif hasattr(sampler, 'set_epoch'):
        sampler.set_epoch(epoch)


def _stop(state: TrainingState, loop: EpochLoop, signal_number: int, epoch: int,
          iteration: int, run_args: Optional[Dict[str, Any]], saved: bool = False):
    """Saves the state after ``iteration`` steps of ``epoch`` (unless ``saved``) and raises
    Preempted."""
    where = f'stopped by {signal.Signals(signal_number).name} at epoch {epoch} iteration {iteration}'
    if not loop.checkpoint_path:
        raise Preempted(f'{where}; nothing saved (no --output_dir)', signal_number)
    if not saved:
        state.save(loop.checkpoint_path, epoch=epoch - 1, iteration=iteration, run_args=run_args)
    raise Preempted(f'{where}; resume with --resume {loop.checkpoint_path}', signal_number)


def _log_epoch(writer, loop: EpochLoop, epoch: int, train_stats: Dict[str, float],
               test_stats: Dict[str, float]) -> None:
    """One line of ``output_dir/log.txt`` and the epoch's tensorboard points (main process)."""
    if writer is not None:
        writer.add_scalar('test_acc1', test_stats['acc1'], epoch)
        writer.add_scalar('test_acc5', test_stats['acc5'], epoch)
        writer.flush()
    if loop.output_dir and is_main_process():
        log_stats = {**{f'train_{k}': v for k, v in train_stats.items()},
                     **{f'test_{k}': v for k, v in test_stats.items()},
                     'epoch': epoch, 'n_parameters': loop.n_parameters}
        with open(os.path.join(loop.output_dir, 'log.txt'), 'a') as handle:
            handle.write(json.dumps(log_stats) + '\n')
