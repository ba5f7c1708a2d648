"""MTViT training, finetuning, evaluation, speed/FLOPs measurement and visualisation.

Single process (``python main.py ...``), ``torchrun --nproc_per_node=N main.py ...``, or the
deprecated ``python -m torch.distributed.launch [--use_env] main.py ...``.
"""
import argparse
import json
import os
import signal
import sys
from functools import partial
from typing import Optional

import torch

import models_mtvit
from datasets import DATA_SETS, DatasetError, build_dataset
from input_pipeline import (TRAIN_INTERPOLATIONS, SMALL_INPUT_MAX, build_gpu_augment, build_loader,
                            build_worker_transform)
from engine import evaluate, keep_rate_at
from launch_env import parse_device
from losses import build_criterion
from samplers import SeededDataset, SeededSampler, ShardSampler, build_train_sampler
from checkpoints import (CheckpointError, finetune_from, load_checkpoint, load_weights,
                         model_state_dict, num_classes_of)
from training import (LR_REFERENCE_BATCH, EpochLoop, Preempted, TrainingState, build_ema,
                      build_optimizer, build_scheduler, count_parameters, fit,
                      ignore_stop_signals, scaled_lr, wrap_distributed)
from utils import (FRACTION, NON_NEGATIVE, NON_NEGATIVE_INT, POSITIVE, POSITIVE_INT, PROBABILITY,
                   MachineError, NonFiniteLossError, OneLineErrorParser, check_output_dir,
                   cleanup, init_distributed, is_main_process, machine_error_message,
                   parse_drop_loc, seed_everything)

CHECKPOINT_NAME = 'checkpoint.pth'
DEFAULT_INPUT_SIZE = 224
DEFAULT_NUM_CLASSES = 1000  # ImageNet, for --only_test_speed which loads no data
EVAL_BATCH_FACTOR = 1.5  # evaluation needs no gradients, so larger batches fit
AMP_DTYPES = {'fp16': torch.float16, 'bf16': torch.bfloat16, 'fp32': None}
# timm's, but for 'plateau', which needs a metric each epoch and does not resume exactly.
SCHEDULERS = ('cosine', 'tanh', 'step', 'multistep', 'poly', 'rsqrt', 'wsd', 'constant')
DEBUG_ENV = 'MTVIT_DEBUG'


class UsageError(Exception):
    """A command line that cannot work; the message names the flag and the problem."""


def get_args_parser() -> argparse.ArgumentParser:
    """Every flag of main.py (a parent parser: run_with_submitit.py and the tests build on it)."""
    parser = argparse.ArgumentParser('MTViT training and evaluation script', add_help=False)
    parser.add_argument('-h', '--help', action='help', help='show this help message and exit')
    parser.add_argument('--batch-size', default=64, type=POSITIVE_INT, help='per process')
    parser.add_argument('--epochs', default=300, type=POSITIVE_INT)

    group = parser.add_argument_group('model')
    group.add_argument('--model', default='deit_small_patch16_shrink_base', type=str,
                       help=f'MTViT: {", ".join(models_mtvit.MTVIT_MODELS)}; or any timm model '
                            f'(e.g. deit_small_patch16_224)')
    group.add_argument('--input-size', default=None, type=POSITIVE_INT,
                       help=f'images size (default {DEFAULT_INPUT_SIZE}, or the checkpoint\'s '
                            f'with --resume)')
    group.add_argument('--drop', type=FRACTION, default=0.0, help='dropout rate')
    group.add_argument('--drop-path', type=FRACTION, default=0.1, help='drop path rate')
    group.add_argument('--model-ema', action=argparse.BooleanOptionalAction, default=True)
    group.add_argument('--model-ema-decay', type=PROBABILITY, default=0.99996)
    group.add_argument('--model-ema-force-cpu', action='store_true', default=False)

    group = parser.add_argument_group('MTViT')
    group.add_argument('--base_keep_rate', type=float, default=0.7, help='at the reducing blocks')
    group.add_argument('--drop_loc', type=parse_drop_loc, default=(3, 6, 9),
                       help='blocks that reduce tokens, e.g. "(3, 6, 9)"')
    group.add_argument('--multi-scale', '--multi_scale', dest='multi_scale', action='store_true',
                       default=None, help='multi-scale front end (default: as the checkpoint '
                                          'of --resume or an MTViT --finetune source, else off)')
    group.add_argument('--merge-any', action='store_true',
                       help='token mergence (--base_keep_rate at --drop_loc) for a timm ViT model')
    group.add_argument('--no-multi-scale', dest='multi_scale', action='store_false',
                       help='single scale, also when finetuning from a multi-scale checkpoint')
    group.add_argument('--shrink_start_epoch', default=10, type=NON_NEGATIVE_INT,
                       help='epoch at which the keep rate starts to decrease from 1')
    group.add_argument('--shrink_epochs', default=0, type=NON_NEGATIVE_INT,
                       help='epochs over which it reaches --base_keep_rate (cosine)')
    group.add_argument('--flops', action='store_true', help='print FLOPs per image (fvcore)')
    group.add_argument('--test_speed', action='store_true', help='measure throughput first')
    group.add_argument('--only_test_speed', action='store_true', help='measure, then exit')
    group.add_argument('--speed-batch-size', type=POSITIVE_INT, default=None,
                       help='throughput batch (default 32 on CPU, 64 on GPU)')
    group.add_argument('--speed-iterations', type=POSITIVE_INT, default=None,
                       help='timed batches per round (default: 1 s of them on a CPU, 0.5 s on '
                            'a GPU; at least 3 and 30)')
    group.add_argument('--visualize_mask', action='store_true',
                       help='write merge-group pictures of validation images (with --resume)')
    group.add_argument('--n_visualization', default=128, type=POSITIVE_INT)

    group = parser.add_argument_group('optimizer')
    group.add_argument('--opt', default='adamw', type=str)
    group.add_argument('--opt-eps', default=1e-8, type=POSITIVE)
    group.add_argument('--opt-betas', default=None, type=FRACTION, nargs=2)
    group.add_argument('--clip-grad', type=POSITIVE, default=None, help='max gradient norm')
    group.add_argument('--momentum', type=NON_NEGATIVE, default=0.9)
    group.add_argument('--weight-decay', type=NON_NEGATIVE, default=0.05)
    group.add_argument('--no-pos-embed-decay', dest='pos_embed_decay', action='store_false',
                       help="exclude MTViT's position embeddings from weight decay (the "
                            "release's optimizer decayed them, as this script does by default)")

    group = parser.add_argument_group('learning rate schedule')
    group.add_argument('--sched', default='cosine', choices=SCHEDULERS)
    group.add_argument('--lr', type=POSITIVE, default=5e-4,
                       help=f'for a total batch of {LR_REFERENCE_BATCH}; scaled linearly')
    group.add_argument('--lr-noise', type=float, nargs='+', default=None)
    group.add_argument('--lr-noise-pct', type=NON_NEGATIVE, default=0.67)
    group.add_argument('--lr-noise-std', type=NON_NEGATIVE, default=1.0)
    group.add_argument('--warmup-lr', type=NON_NEGATIVE, default=1e-6)
    group.add_argument('--min-lr', type=NON_NEGATIVE, default=1e-5)
    group.add_argument('--decay-epochs', type=POSITIVE, default=30)
    group.add_argument('--warmup-epochs', type=NON_NEGATIVE_INT, default=5)
    group.add_argument('--cooldown-epochs', type=NON_NEGATIVE_INT, default=10)
    group.add_argument('--patience-epochs', type=NON_NEGATIVE_INT, default=10)
    group.add_argument('--decay-rate', '--dr', type=POSITIVE, default=0.1)

    group = parser.add_argument_group('augmentation')
    group.add_argument('--color-jitter', type=NON_NEGATIVE, default=0.4)
    group.add_argument('--aa', type=str, default='rand-m9-mstd0.5-inc1')
    group.add_argument('--smoothing', type=FRACTION, default=0.1, help='label smoothing')
    group.add_argument('--train-interpolation', default='bicubic', choices=TRAIN_INTERPOLATIONS)
    group.add_argument('--gpu-augment', action='store_true',
                       help='resize the crops and run RandAugment on --device, batched: the loader '
                            'workers only decode and crop (inputs above 32 pixels, --aa rand-...)')
    group.add_argument('--repeated-aug', action=argparse.BooleanOptionalAction, default=True)
    group.add_argument('--scale', type=PROBABILITY, nargs=2, default=(0.08, 1.0),
                       help='RandomResizedCrop area range')
    group.add_argument('--ratio', type=POSITIVE, nargs=2, default=(3. / 4., 4. / 3.),
                       help='RandomResizedCrop aspect ratio range')
    group.add_argument('--hflip', type=PROBABILITY, default=0.5, help='horizontal flip probability')
    group.add_argument('--vflip', type=PROBABILITY, default=0., help='vertical flip probability')
    group.add_argument('--reprob', type=PROBABILITY, default=0.25, help='random erase probability')
    group.add_argument('--remode', default='pixel', choices=('pixel', 'rand', 'const'))
    group.add_argument('--recount', type=POSITIVE_INT, default=1)
    group.add_argument('--resplit', action='store_true', help='a DeiT flag, accepted and unused')

    group = parser.add_argument_group('mixup')
    group.add_argument('--mixup', type=NON_NEGATIVE, default=0.8)
    group.add_argument('--cutmix', type=NON_NEGATIVE, default=1.0)
    group.add_argument('--cutmix-minmax', type=PROBABILITY, nargs=2, default=None)
    group.add_argument('--mixup-prob', type=PROBABILITY, default=1.0)
    group.add_argument('--mixup-switch-prob', type=PROBABILITY, default=0.5)
    group.add_argument('--mixup-mode', type=str, default='batch', choices=('batch', 'pair', 'elem'))

    group = parser.add_argument_group('distillation')
    group.add_argument('--teacher-model', default='regnety_160', type=str)
    group.add_argument('--teacher-path', type=str, default='')
    group.add_argument('--distillation-type', default='none', choices=('none', 'soft', 'hard'))
    group.add_argument('--distillation-alpha', default=0.5, type=PROBABILITY)
    group.add_argument('--distillation-tau', default=1.0, type=POSITIVE)

    group = parser.add_argument_group('finetuning and data')
    group.add_argument('--finetune', default='', help='from a checkpoint (.pth or .safetensors)')
    group.add_argument('--data-path', default='/datasets01/imagenet_full_size/061417/', type=str)
    group.add_argument('--data-set', default='IMNET', choices=DATA_SETS, type=str)
    group.add_argument('--inat-category', default='name', type=str, choices=(
        'kingdom', 'phylum', 'class', 'order', 'supercategory', 'family', 'genus', 'name'))
    group.add_argument('--use-lmdb', action='store_true',
                       help="the release's LMDB input: not supported, see --data-set ARROW")
    group.add_argument('--skip-bad-images', action='store_true',
                       help='skip (and count) unreadable images instead of stopping')

    group = parser.add_argument_group('run')
    group.add_argument('--output_dir', default='', help='where to save, empty for no saving')
    group.add_argument('--device', default='cuda', help='cuda or cpu (cuda falls back to cpu)')
    group.add_argument('--amp-dtype', default='fp16', choices=tuple(AMP_DTYPES),
                       help='precision on CUDA: fp16 autocast (with a loss scaler, as DeiT), bf16 '
                            '(no scaler, no host synchronisation per step; Ampere or newer), fp32')
    group.add_argument('--compile', action='store_true',
                       help='torch.compile the model for training and evaluation (first steps '
                            'are slower while it compiles)')
    group.add_argument('--compile-mode', choices=('default', 'reduce-overhead', 'max-autotune'),
                       help="torch.compile's mode (reduce-overhead: CUDA graphs); with --compile")
    group.add_argument('--seed', default=0, type=int)
    group.add_argument('--debug', action='store_true',
                       default=os.environ.get(DEBUG_ENV, '').lower() in ('1', 'true', 'yes'),
                       help=f'show tracebacks of machine faults (also {DEBUG_ENV}=1)')
    group.add_argument('--resume', default='', help='resume from checkpoint')
    group.add_argument('--auto-resume', action='store_true',
                       help=f'resume from output_dir/{CHECKPOINT_NAME} when it exists')
    group.add_argument('--start_epoch', default=0, type=NON_NEGATIVE_INT, metavar='N')
    group.add_argument('--eval', action='store_true', help='evaluation only')
    group.add_argument('--dist-eval', action='store_true', help='shard evaluation over processes')
    group.add_argument('--num_workers', default=10, type=NON_NEGATIVE_INT)
    group.add_argument('--pin-mem', action=argparse.BooleanOptionalAction, default=True)
    group.add_argument('--print-freq', default=10, type=POSITIVE_INT, help='log every N iterations')
    group.add_argument('--world_size', default=1, type=int,
                       help='a DeiT flag, accepted and unused: launchers set WORLD_SIZE')
    group.add_argument('--dist_url', default='env://')
    group.add_argument('--local-rank', '--local_rank', dest='local_rank', type=int, default=None,
                       help='set by the deprecated torch.distributed.launch')
    return parser


def is_mtvit(model_name: str) -> bool:
    """One of the MTViT presets registered by models_mtvit."""
    return model_name in models_mtvit.MTVIT_MODELS


def check_args(args: argparse.Namespace):
    """Rejects flag values that cannot work, naming the flag."""
    import timm.data
    import timm.optim
    if not timm.is_model(args.model):
        raise UsageError(f'unknown --model {args.model!r}; MTViT models are '
                         f'{", ".join(models_mtvit.MTVIT_MODELS)}, or give any timm model name')
    if args.visualize_mask and not args.resume:
        raise UsageError('--visualize_mask needs --resume with the checkpoint to visualise')
    if args.visualize_mask and not is_mtvit(args.model):
        raise UsageError(f'--visualize_mask needs an MTViT --model, not {args.model}')
    try:
        parse_device(args.device)
    except ValueError as error:
        raise UsageError(str(error)) from None
    if args.opt.lower().split('_')[-1] not in timm.optim.list_optimizers():
        raise UsageError(f'--opt {args.opt}: not one of timm\'s optimizers (adamw, sgd, lamb, ...)')
    if args.aa not in ('', 'none'):
        try:
            timm.data.create_transform(32, is_training=True, auto_augment=args.aa)
        except (AssertionError, ValueError, KeyError, IndexError) as error:
            raise UsageError(f'--aa {args.aa}: not a timm augmentation policy ({error})') from None
    for flag, (low, high) in (('--scale', args.scale), ('--ratio', args.ratio)):
        if low > high:
            raise UsageError(f'{flag} {low} {high}: the first must not exceed the second')
    decay_room = args.epochs - args.warmup_epochs  # timm's rsqrt and wsd decay within it
    if args.sched in ('rsqrt', 'wsd') and not 0 < args.decay_epochs <= decay_room:
        raise UsageError(f'--sched {args.sched} decays over --decay-epochs {args.decay_epochs:g}, '
                         f'which must fit in --epochs minus --warmup-epochs ({decay_room})')
    if args.auto_resume and not args.output_dir:
        raise UsageError('--auto-resume resumes from --output_dir\'s checkpoint: give --output_dir')
    if args.compile_mode and not args.compile:
        raise UsageError(f'--compile-mode {args.compile_mode} needs --compile')
    if args.merge_any and is_mtvit(args.model):
        raise UsageError(f'--merge-any is for timm ViTs; {args.model} reduces tokens already')
    if args.use_lmdb:
        raise UsageError('--use-lmdb: LMDB files are not supported; pack the ImageFolder tree once '
                         'with `python pack_arrow.py pack --src SRC --dst DST`, then train with '
                         '--data-set ARROW --data-path DST')
    if args.distillation_type != 'none' and not args.teacher_path:
        raise UsageError(f'--distillation-type {args.distillation_type} needs --teacher-path '
                         f'(teacher weights cannot be downloaded)')
    if args.batch_size % 2 and trains(args) and (args.mixup or args.cutmix or args.cutmix_minmax):
        raise UsageError(f'--batch-size {args.batch_size}: Mixup and CutMix pair the images of a '
                         f'batch; give an even one (or --mixup 0 --cutmix 0)')
    if args.gpu_augment and not args.aa.startswith('rand'):
        raise UsageError(f'--gpu-augment runs RandAugment on the device; --aa {args.aa} is not '
                         f'a RandAugment policy (rand-...)')


def reconcile_with_checkpoint(args: argparse.Namespace, state_dict: Optional[dict], path: str,
                              finetune_weights: Optional[dict] = None,
                              saved_args: Optional[dict] = None):
    """Takes the model's shape (multi-scale, input size) from the resumed checkpoint where the
    command line does not give it: the input size its run saved in ``saved_args``, else what its
    weights ``state_dict`` show (a flag that contradicts them is an error); and the multi-scale
    choice from an MTViT ``--finetune`` source's weights."""
    patch_size = models_mtvit.MTVIT_PRESETS.get(args.model, {}).get('patch_size', 16)
    if state_dict is not None and is_mtvit(args.model):
        checkpoint_multi_scale = 'pos_embed_list.1' in state_dict
        if args.multi_scale is not None and args.multi_scale != checkpoint_multi_scale:
            flag = '--multi-scale' if args.multi_scale else '--no-multi-scale'
            kind = 'multi-scale' if checkpoint_multi_scale else 'single-scale'
            raise UsageError(f'{flag} contradicts {path}, a {kind} checkpoint')
        args.multi_scale = checkpoint_multi_scale
    elif finetune_weights is not None and is_mtvit(args.model) and args.multi_scale is None:
        args.multi_scale = 'pos_embed_list.1' in finetune_weights
    if state_dict is not None and args.input_size is None:
        saved_size = saved_args.get('input_size') if isinstance(saved_args, dict) else None
        pos_embed = state_dict.get('pos_embed_list.1', state_dict.get('pos_embed'))
        if saved_size:
            args.input_size = int(saved_size)
        elif pos_embed is not None:
            args.input_size = int((pos_embed.shape[1] - 1) ** 0.5) * patch_size
    args.multi_scale = bool(args.multi_scale)
    if args.input_size is None:
        args.input_size = DEFAULT_INPUT_SIZE


CONFIG_FLAGS = {'img_size': '--input-size', 'base_keep_rate': '--base_keep_rate',
                'drop_loc': '--drop_loc', 'multi_scale': '--multi-scale'}


def check_model_config(args: argparse.Namespace):
    """Rejects an MTViT shape that cannot be built (the model's own check), naming the flag,
    before any data is read (the input size is final here: the command line's or the resumed
    checkpoint's)."""
    if not is_mtvit(args.model):
        return
    preset = models_mtvit.MTVIT_PRESETS[args.model]
    try:
        models_mtvit.check_config(
            img_size=(args.input_size, args.input_size), patch_size=preset['patch_size'],
            depth=preset['depth'], base_keep_rate=args.base_keep_rate, drop_loc=args.drop_loc,
            multi_scale=args.multi_scale)
    except models_mtvit.ConfigError as error:
        raise UsageError(f'{CONFIG_FLAGS[error.setting]}: {error} ({args.model})') from None


def create_model(args: argparse.Namespace, num_classes: int) -> torch.nn.Module:
    """The --model, with the MTViT keyword arguments only for MTViT models and the image size
    only for models that take one (a ResNet takes any). A distilled DeiT trained with
    distillation returns both heads' logits, for DistillationLoss to use each."""
    import timm
    kwargs = dict(num_classes=num_classes, drop_rate=args.drop, drop_path_rate=args.drop_path,
                  img_size=args.input_size)
    if is_mtvit(args.model):
        kwargs.update(base_keep_rate=args.base_keep_rate, drop_loc=args.drop_loc,
                      multi_scale=args.multi_scale)
    elif args.multi_scale:
        raise UsageError(f'--multi-scale needs an MTViT --model, not {args.model}')
    try:
        try:
            model = timm.create_model(args.model, pretrained=False, **kwargs)
        except TypeError as error:
            if 'img_size' not in str(error):
                raise
            del kwargs['img_size']
            model = timm.create_model(args.model, pretrained=False, **kwargs)
        if args.merge_any:
            models_mtvit.apply_mergence(model, keep_rate=args.base_keep_rate,
                                        drop_loc=args.drop_loc)
    except (TypeError, ValueError) as error:
        raise UsageError(f'--model {args.model}: {error}') from None
    if hasattr(model, 'set_distilled_training'):
        if args.finetune and args.distillation_type != 'none':
            # Finetuning runs in eval mode, where the two heads' logits come averaged.
            raise UsageError(f'--distillation-type {args.distillation_type} with --finetune: '
                             f'{args.model} trains its distillation head only in train mode, '
                             f'which finetuning does not use')
        model.set_distilled_training(args.distillation_type != 'none')
    return model


def build_loaders(args: argparse.Namespace, dist_state, train: bool):
    """Data loaders of the splits this run needs; returns (train_loader or None, val_loader,
    num_classes). They yield normalised float batches on the device (``input_pipeline``)."""
    transform_args = dict(input_size=args.input_size, color_jitter=args.color_jitter,
                          auto_augment=args.aa, interpolation=args.train_interpolation,
                          scale=tuple(args.scale), ratio=tuple(args.ratio), hflip=args.hflip,
                          vflip=args.vflip)
    dataset_args = dict(data_set=args.data_set, data_path=args.data_path, tensor_images=True,
                        inat_category=args.inat_category, skip_bad_images=args.skip_bad_images)
    dataset_val, num_classes = build_dataset(
        False, transform=build_worker_transform(False, **transform_args), **dataset_args)
    # The loaders' own generator draws the worker seeds (once with persistent workers, so a
    # resumed run would draw where an uninterrupted one does not), not the process's stream.
    loader_args = dict(device=dist_state.device, num_workers=args.num_workers,
                       pin_memory=args.pin_mem and dist_state.device.type == 'cuda',
                       generator=torch.Generator().manual_seed(args.seed),
                       worker_init_fn=ignore_stop_signals)
    world_size, rank = dist_state.world_size, dist_state.rank
    if args.dist_eval and dist_state.distributed:
        val_sampler = ShardSampler(len(dataset_val), num_replicas=world_size, rank=rank)
    else:
        val_sampler = torch.utils.data.SequentialSampler(dataset_val)
    val_loader = build_loader(dataset_val, sampler=val_sampler,
                              batch_size=int(EVAL_BATCH_FACTOR * args.batch_size), **loader_args)
    if not train:
        return None, val_loader, num_classes
    device_augment = None
    if args.gpu_augment:
        if args.input_size <= SMALL_INPUT_MAX:
            raise UsageError(f'--gpu-augment needs --input-size above {SMALL_INPUT_MAX}, '
                             f'not {args.input_size}')
        del transform_args['color_jitter']  # timm applies no colour jitter with RandAugment
        train_transform, device_augment = build_gpu_augment(**transform_args)
    else:
        train_transform = build_worker_transform(True, **transform_args)
    dataset_train, _ = build_dataset(True, transform=train_transform, **dataset_args)
    train_sampler = build_train_sampler(dataset_train, num_replicas=world_size, rank=rank,
                                        repeated_aug=args.repeated_aug, seed=args.seed)
    if len(train_sampler) < args.batch_size:
        raise UsageError(f'--batch-size {args.batch_size} exceeds the {len(train_sampler)} '
                         f'training images each process sees: no full batch')
    # Per-sample seeds: augmentations independent of the (persistent) workers, exact on resume.
    train_loader = build_loader(
        SeededDataset(dataset_train), sampler=SeededSampler(train_sampler, args.seed, rank),
        batch_size=args.batch_size, drop_last=True, re_prob=args.reprob, re_mode=args.remode,
        re_count=args.recount, device_augment=device_augment, **loader_args)
    return train_loader, val_loader, num_classes


def main(args: argparse.Namespace):
    """Runs what the flags ask for; returns the last evaluation's stats (or None)."""
    check_args(args)
    dist_state = init_distributed(args.device, args.dist_url, args.local_rank)
    try:
        return run(args, dist_state)
    finally:
        cleanup()


def run(args: argparse.Namespace, dist_state):
    """Everything after the process group exists: one of speed only, visualisation, evaluation
    or training, each after the optional FLOPs and speed measurements."""
    device = dist_state.device
    checkpoint, resumed_weights, finetune_weights = prepare(args, dist_state)
    training = trains(args)
    train_loader = val_loader = None
    if args.only_test_speed:
        num_classes = num_classes_of(resumed_weights, args.model, DEFAULT_NUM_CLASSES)
    else:
        train_loader, val_loader, num_classes = build_loaders(args, dist_state, training)

    model = create_model(args, num_classes)
    if finetune_weights is not None:
        finetune_from(model, args.finetune, finetune_weights)
    if resumed_weights is not None:
        saved_args = (checkpoint or {}).get('args')
        saved_model = saved_args.get('model') if isinstance(saved_args, dict) else None
        load_weights(model, resumed_weights, args.resume, chosen_by=f'--model {args.model}',
                     saved_model=saved_model if saved_model != args.model else None)
    model.to(device)
    print(f'model {args.model}: {count_parameters(model) / 1e6:.2f} M parameters')
    amp_dtype = AMP_DTYPES[args.amp_dtype] if device.type == 'cuda' else None
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = True
    if is_main_process():  # the release measured on the main process only
        measure(args, model, device, amp_dtype)
    if args.only_test_speed:
        return None
    if args.visualize_mask:
        from visualize_mask import visualize
        from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
        # The whole validation set, even when --dist-eval shards the loader: visualize shares
        # the chosen images out over the processes itself.
        written = visualize(model, val_loader.dataset, device, args.output_dir or '.',
                            n_visualization=args.n_visualization, mean=IMAGENET_DEFAULT_MEAN,
                            std=IMAGENET_DEFAULT_STD, batch_size=val_loader.batch_size,
                            num_workers=args.num_workers, rank=dist_state.rank,
                            world_size=dist_state.world_size)
        print(f'visualisation: {len(written)} files written to {args.output_dir or "."}')
        return None
    if args.eval:
        # At the model's configured keep rates (the schedule's end), as the release evaluates.
        sharded = args.dist_eval and dist_state.distributed
        if args.compile:
            model = torch.compile(model, mode=args.compile_mode)
        test_stats = evaluate(val_loader, model, device, amp_dtype=amp_dtype, sharded=sharded)
        print(f'Accuracy of the network on the {test_stats["num_samples"]} test images: '
              f'{test_stats["acc1"]:.1f}%')
        return test_stats
    return train(args, dist_state, model, train_loader, val_loader, num_classes, checkpoint,
                 amp_dtype)


def prepare(args: argparse.Namespace, dist_state):
    """Checks the output folder, reads the checkpoints (the resumed one, or with --auto-resume
    output_dir's, and the --finetune source unless a resume makes it moot), completes the model's
    shape from them, and seeds; returns (checkpoint, its weights, the finetune weights)."""
    if args.output_dir:
        check_output_dir(args.output_dir)
    checkpoint_path = checkpoint_path_of(args)
    if args.auto_resume and not args.resume and checkpoint_path and os.path.exists(checkpoint_path):
        args.resume = checkpoint_path
    if args.eval and not (args.resume or args.finetune):
        raise UsageError('--eval needs the weights to evaluate: give --resume CHECKPOINT')
    if (trains(args) and os.path.isfile(checkpoint_path)
            and os.path.realpath(args.resume) != os.path.realpath(checkpoint_path)):
        raise UsageError(f'--output_dir holds another run\'s {checkpoint_path}, which training '
                         f'would overwrite: continue it with --auto-resume, or change --output_dir')
    checkpoint = load_checkpoint(args.resume) if args.resume else None
    resumed_weights = model_state_dict(checkpoint, args.resume) if args.resume else None
    finetune_weights = None
    if args.finetune and args.resume:  # a finetuning run resumed: its own weights go on
        print(f'--resume {args.resume}: the run continues from it, --finetune {args.finetune} '
              f'is not loaded')
    elif args.finetune:
        finetune_weights = model_state_dict(load_checkpoint(args.finetune), args.finetune)
    reconcile_with_checkpoint(args, resumed_weights, args.resume, finetune_weights,
                              saved_args=(checkpoint or {}).get('args'))
    check_model_config(args)
    print(json.dumps(vars(args), default=str))
    seed_everything(args.seed, dist_state.rank)
    return checkpoint, resumed_weights, finetune_weights


def measure(args: argparse.Namespace, model: torch.nn.Module, device: torch.device,
            amp_dtype: Optional[torch.dtype]) -> None:
    """--flops and --test_speed (also written to output_dir/speed_macs.txt)."""
    if args.flops:
        from speed_test import report_flops
        report_flops(model, args.input_size, device)
    if args.test_speed or args.only_test_speed:
        from speed_test import report_throughput
        n_parameters = count_parameters(model)
        report_throughput(
            model, args.input_size, device, batch_size=args.speed_batch_size,
            iterations=args.speed_iterations, amp_dtype=amp_dtype,
            note=f'{n_parameters / 1e6:.2f} M parameters',
            label=f'{args.model} multi_scale={args.multi_scale} '
                  f'base_keep_rate={args.base_keep_rate}',
            log_path=os.path.join(args.output_dir, 'speed_macs.txt') if args.output_dir else None)


def train(args: argparse.Namespace, dist_state, model: torch.nn.Module, train_loader, val_loader,
          num_classes: int, checkpoint: Optional[dict], amp_dtype: Optional[torch.dtype]) -> dict:
    """Builds the optimizer, schedule, EMA, scaler and criterion from the flags, restores them
    from a resumed checkpoint, and trains under ``amp_dtype`` autocast; returns the last
    evaluation's stats."""
    device = dist_state.device
    optimizer = build_optimizer(
        model, opt=args.opt, lr=scaled_lr(args.lr, args.batch_size, dist_state.world_size),
        weight_decay=args.weight_decay, momentum=args.momentum, eps=args.opt_eps,
        betas=args.opt_betas,
        decay_position_embeddings=is_mtvit(args.model) and args.pos_embed_decay,
        fused=device.type == 'cuda')
    state = TrainingState(
        model=model, optimizer=optimizer,
        lr_scheduler=build_scheduler(
            optimizer, sched=args.sched, epochs=args.epochs, warmup_epochs=args.warmup_epochs,
            warmup_lr=args.warmup_lr, min_lr=args.min_lr, cooldown_epochs=args.cooldown_epochs,
            decay_epochs=args.decay_epochs, decay_rate=args.decay_rate,
            patience_epochs=args.patience_epochs, noise=args.lr_noise,
            noise_pct=args.lr_noise_pct, noise_std=args.lr_noise_std, seed=args.seed),
        # bf16 has float32's range: only fp16 needs its loss scaled.
        loss_scaler=torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16),
        model_ema=(build_ema(model, decay=args.model_ema_decay,
                             force_cpu=args.model_ema_force_cpu) if args.model_ema else None))
    start_epoch, first_iteration = args.start_epoch, 0
    if checkpoint is not None and 'optimizer' in checkpoint:
        start_epoch, first_iteration = state.restore(checkpoint, rank=dist_state.rank,
                                                     world_size=dist_state.world_size,
                                                     batch_size=args.batch_size, path=args.resume)
        inside = f' iteration {first_iteration}' if first_iteration else ''
        print(f'resumed {args.resume} at epoch {start_epoch}{inside}')
    if start_epoch >= args.epochs:
        print(f'nothing to train: the run is at epoch {start_epoch}, --epochs is {args.epochs}')
    mixup_fn, criterion = build_criterion(
        num_classes, device, mixup=args.mixup, cutmix=args.cutmix,
        cutmix_minmax=args.cutmix_minmax, mixup_prob=args.mixup_prob,
        mixup_switch_prob=args.mixup_switch_prob, mixup_mode=args.mixup_mode,
        smoothing=args.smoothing, distillation_type=args.distillation_type,
        teacher_model=args.teacher_model, teacher_path=args.teacher_path,
        distillation_alpha=args.distillation_alpha, distillation_tau=args.distillation_tau)
    if dist_state.distributed:
        model = wrap_distributed(model, device)
    reduces_tokens = is_mtvit(args.model) or args.merge_any  # the model takes keep rates
    loop = EpochLoop(
        device=device, epochs=args.epochs, amp_dtype=amp_dtype, clip_grad=args.clip_grad,
        keep_rate_schedule=(partial(keep_rate_at, iters_per_epoch=len(train_loader),
                                    base_keep_rate=args.base_keep_rate,
                                    shrink_start_epoch=args.shrink_start_epoch,
                                    shrink_epochs=args.shrink_epochs)
                            if reduces_tokens else None),
        token_counts=state.model.token_counts if reduces_tokens else None,
        set_training_mode=not args.finetune, sharded_eval=args.dist_eval and dist_state.distributed,
        print_freq=args.print_freq, checkpoint_path=checkpoint_path_of(args),
        compile_mode=args.compile_mode,  # check_args: only with --compile
        output_dir=args.output_dir, n_parameters=count_parameters(state.model))
    model = torch.compile(model, mode=args.compile_mode) if args.compile else model
    return fit(model, state, loop, criterion=criterion,
               train_loader=train_loader, val_loader=val_loader, mixup_fn=mixup_fn,
               start_epoch=start_epoch, first_iteration=first_iteration, run_args=vars(args).copy())


def trains(args: argparse.Namespace) -> bool:
    """Whether the flags ask for training (not evaluation, visualisation or speed only)."""
    return not (args.eval or args.visualize_mask or args.only_test_speed)


def checkpoint_path_of(args: argparse.Namespace) -> str:
    """output_dir/checkpoint.pth, or '' when nothing is saved."""
    return os.path.join(args.output_dir, CHECKPOINT_NAME) if args.output_dir else ''


def cli(argv=None) -> int:
    """Command-line entry: one line and a non-zero exit for bad input and machine faults."""
    parser = OneLineErrorParser('MTViT training and evaluation script', command='main.py',
                                parents=[get_args_parser()], add_help=False)
    args = parser.parse_args(argv)
    try:
        main(args)
        return 0
    except (UsageError, DatasetError, CheckpointError) as error:
        message, status = str(error), 2
    except NonFiniteLossError as error:
        message, status = str(error), 1
    except Preempted as stopped:  # not an error: the run saved its state and can go on
        print(f'main.py: {stopped}', file=sys.stderr, flush=True)
        return stopped.exit_status
    except KeyboardInterrupt:  # outside training, or a second Ctrl-C (the first saves and stops)
        print('main.py: interrupted', file=sys.stderr, flush=True)
        return 128 + signal.SIGINT
    except (MachineError, OSError, RuntimeError) as error:  # faults of the machine
        message = str(error) if isinstance(error, MachineError) else machine_error_message(error)
        if message is None or args.debug:
            raise
        status = getattr(error, 'exit_status', 1)
    print(f'main.py: error: {message}', file=sys.stderr, flush=True)
    return status


if __name__ == '__main__':
    sys.exit(cli())
