"""Export a trained checkpoint (MTViT, or a timm ViT with token mergence) to ONNX and check it.

    python export.py --model M --resume CKPT --output model.onnx [--data-set DIGITS]

The model is exported at a fixed input size and keep rate (the token counts are constants of
the graph) with a dynamic batch dimension: ``images`` (B, 3, S, S) -> ``logits`` (B, classes).
The file is then run with onnxruntime on the CPU against PyTorch (fp32): random images at each
``--check-batch-sizes``, blank images (every patch alike, so every score ties), and with
``--data-set`` the whole validation split (same predicted class for every image); the maximal
differences and both CPU throughputs are printed. Shape flags not given come from the
checkpoint's saved ``args`` and weights, as ``main.py --eval`` takes them.
"""
import argparse
import os
import statistics
import sys
import tempfile
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn as nn

import models_mtvit
from atomic_write import replacing
from checkpoints import CheckpointError, load_checkpoint, load_weights, model_state_dict
from datasets import DATA_SETS, DatasetError
from main import (UsageError, check_model_config, create_model, is_mtvit,
                  reconcile_with_checkpoint)
from main import get_args_parser as main_args_parser
from utils import (BYTES_PER_MB, NON_NEGATIVE, NON_NEGATIVE_INT, POSITIVE_INT,
                   OneLineErrorParser, machine_error_message, parse_drop_loc)

OPSET = 18  # ScatterElements with reduction='add' (the mergence) needs 16 or later
CHECK_SEED = 0
BLANK_BATCH = 2
INPUT_NAME, OUTPUT_NAME = 'images', 'logits'


class ExportError(Exception):
    """The model could not be exported to ONNX (an unsupported model)."""


class CheckFailed(Exception):
    """onnxruntime's results differ from PyTorch's beyond the tolerance."""


class FixedTokenCounts(nn.Module):
    """A reducing model at fixed per-block token counts: the exported graph has static shapes
    everywhere but the batch."""

    def __init__(self, model: nn.Module, tokens: Sequence[Optional[int]]):
        super().__init__()
        self.model = model
        self.tokens = list(tokens)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, classes)."""
        return self.model(images, tokens=self.tokens)


def _stable_sort_to_onnx(self, *, dim: int = -1, descending: bool = False, stable=None):
    """ONNX for ``aten.sort.stable`` (the mergence's ranking), which the exporter lacks: TopK
    over the whole axis. ONNX's TopK puts the lower index first among equal values, which is
    what ``stable=True`` asks for."""
    from onnxscript import opset18 as op
    size = op.Reshape(op.Gather(op.Shape(self), dim, axis=0), op.Constant(value_ints=[1]))
    return op.TopK(self, size, axis=dim, largest=descending, sorted=True)


def export_onnx(model: nn.Module, path: str, input_size: int, in_chans: int = 3,
                opset: int = OPSET) -> None:
    """Writes ``model`` (images (B, C, S, S) -> logits (B, classes), eval mode, on the CPU) to
    ``path`` as ONNX with a dynamic batch dimension; weights over 2 GB go to ``path.data``.

    Raises:
        ExportError: the exporter could not translate the model (first line of its reason).
        OSError: the file could not be written; an earlier file at ``path`` is as it was.
    """
    example = torch.randn(BLANK_BATCH, in_chans, input_size, input_size)
    try:
        program = torch.onnx.export(
            model.eval(), (example,), dynamo=True, verbose=False, opset_version=opset,
            input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_shapes=({0: torch.export.Dim('batch')},),
            custom_translation_table={torch.ops.aten.sort.stable: _stable_sort_to_onnx})
    except Exception as error:  # the exporter raises many types; all mean "cannot export"
        reason = next((line.strip() for line in str(error).splitlines() if line.strip()),
                      type(error).__name__)
        raise ExportError(f'{type(error).__name__}: {reason}') from None
    with replacing(path) as staged:
        program.save(staged)


def ort_session(path: str, threads: int):
    """An onnxruntime CPU session of ``path`` using ``threads`` threads, as PyTorch does."""
    import onnxruntime
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    return onnxruntime.InferenceSession(path, sess_options=options,
                                        providers=['CPUExecutionProvider'])


def compare(session, model: nn.Module, images: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Runs images (B, 3, S, S) through onnxruntime and PyTorch; returns both logits (B, K)."""
    with torch.inference_mode():
        expected = model(images)
    got = torch.from_numpy(session.run([OUTPUT_NAME], {INPUT_NAME: images.numpy()})[0])
    return {'torch': expected, 'onnx': got}


def check_random(session, model: nn.Module, input_size: int, batch_sizes: Sequence[int],
                 in_chans: int = 3) -> Dict[str, float]:
    """Max |onnxruntime - PyTorch| of the logits on random images of each batch size, and on a
    blank batch (all patches equal, so the mergence's scores all tie)."""
    gen = torch.Generator().manual_seed(CHECK_SEED)
    batches = {f'batch {size}': torch.randn(size, in_chans, input_size, input_size,
                                            generator=gen) for size in batch_sizes}
    batches['blank'] = torch.zeros(BLANK_BATCH, in_chans, input_size, input_size)
    differences = {}
    for name, images in batches.items():
        logits = compare(session, model, images)
        differences[name] = (logits['onnx'] - logits['torch']).abs().max().item()
    return differences


def check_dataset(session, model: nn.Module, loader) -> Dict[str, float]:
    """Both runtimes on every image of ``loader``: images, same predicted class, correct by
    each, and the max logit difference."""
    stats = dict(images=0, same_class=0, correct_torch=0, correct_onnx=0, max_difference=0.)
    for images, targets in loader:
        logits = compare(session, model, images)
        classes = {name: value.argmax(dim=-1) for name, value in logits.items()}
        stats['images'] += len(targets)
        stats['same_class'] += (classes['torch'] == classes['onnx']).sum().item()
        stats['correct_torch'] += (classes['torch'] == targets).sum().item()
        stats['correct_onnx'] += (classes['onnx'] == targets).sum().item()
        stats['max_difference'] = max(stats['max_difference'],
                                      (logits['onnx'] - logits['torch']).abs().max().item())
    return stats


def measure_speed(session, model: nn.Module, input_size: int, batch_size: int,
                  iterations: int, in_chans: int = 3) -> Dict[str, float]:
    """CPU throughput (images/s, median of the rounds) of PyTorch and onnxruntime on the same
    random batch, timed interleaved as speed_test.py does."""
    from speed_test import CPU_DEFAULTS, TimedStep, inference_step, time_interleaved
    images = torch.randn(batch_size, in_chans, input_size, input_size)
    feed = {INPUT_NAME: images.numpy()}
    timed = [TimedStep('PyTorch', inference_step(model, images), batch_size),
             TimedStep('onnxruntime', lambda: session.run([OUTPUT_NAME], feed), batch_size)]
    runs = time_interleaved(timed, torch.device('cpu'), iterations=iterations,
                            warmup=CPU_DEFAULTS['warmup'], repeats=CPU_DEFAULTS['repeats'])
    return {name: statistics.median(values) for name, values in runs.items()}


def get_args_parser() -> argparse.ArgumentParser:
    """export.py's flags (a parent parser, as main.py's)."""
    parser = argparse.ArgumentParser('Export an MTViT or merged timm ViT checkpoint to ONNX',
                                     add_help=False)
    parser.add_argument('-h', '--help', action='help', help='show this help message and exit')
    parser.add_argument('--resume', required=True, help='the checkpoint to export')
    parser.add_argument('--output', required=True, help='the ONNX file to write')
    parser.add_argument('--model', default=None,
                        help='MTViT or timm ViT name (default: the checkpoint\'s)')
    parser.add_argument('--input-size', default=None, type=POSITIVE_INT,
                        help='image size (default: the checkpoint\'s)')
    parser.add_argument('--base_keep_rate', default=None, type=float,
                        help='keep rate of the exported graph (default: the checkpoint\'s; for a '
                             'timm model 1, no mergence, unless it was trained with --merge-any)')
    parser.add_argument('--drop_loc', default=None, type=parse_drop_loc,
                        help='reducing blocks (default: the checkpoint\'s, else main.py\'s)')
    parser.add_argument('--multi-scale', '--multi_scale', dest='multi_scale', action='store_true',
                        default=None, help='multi-scale MTViT (default: as the checkpoint)')
    parser.add_argument('--data-set', default=None, choices=DATA_SETS,
                        help='also compare on this validation split (e.g. DIGITS)')
    parser.add_argument('--data-path', default='', help='as main.py\'s')
    parser.add_argument('--batch-size', default=64, type=POSITIVE_INT, help='for --data-set')
    parser.add_argument('--num_workers', default=0, type=NON_NEGATIVE_INT, help='for --data-set')
    parser.add_argument('--check-batch-sizes', default=[1, 7], type=POSITIVE_INT, nargs='+',
                        help='random-image batches compared')
    parser.add_argument('--atol', default=1e-4, type=NON_NEGATIVE,
                        help='largest logit difference accepted')
    parser.add_argument('--speed-batch-size', default=32, type=POSITIVE_INT)
    parser.add_argument('--speed-iterations', default=3, type=POSITIVE_INT,
                        help='timed batches a round')
    parser.add_argument('--no-speed', dest='speed', action='store_false',
                        help='skip the throughput measurement')
    return parser


def resolve_config(args: argparse.Namespace, saved: dict, weights: dict) -> argparse.Namespace:
    """The model's shape: the command line's, else the checkpoint's saved ``args``, else what
    its weights show (main.reconcile_with_checkpoint), else main.py's defaults."""
    model_name = args.model or saved.get('model')
    if not model_name:
        raise UsageError(f'--model is needed: {args.resume} does not name its model')
    import timm
    if not timm.is_model(model_name):
        raise UsageError(f'unknown --model {model_name!r}')
    # main.py's defaults for what is given nowhere, and for all else its model helpers read.
    config = main_args_parser().parse_args([])
    keep_rate = args.base_keep_rate
    if keep_rate is None:
        # A timm model trained or evaluated without mergence runs at keep 1 (unmodified).
        merged = is_mtvit(model_name) or saved.get('merge_any')
        keep_rate = saved.get('base_keep_rate', config.base_keep_rate) if merged else 1.
    config.__dict__.update(
        model=model_name, input_size=args.input_size or saved.get('input_size'),
        multi_scale=args.multi_scale, base_keep_rate=keep_rate,
        drop_loc=tuple(args.drop_loc or saved.get('drop_loc') or config.drop_loc),
        drop=0., drop_path=0.)
    reconcile_with_checkpoint(config, weights, args.resume)
    check_model_config(config)
    return config


def build_model(config: argparse.Namespace, weights: dict, path: str) -> nn.Module:
    """The checkpoint's model in eval mode on the CPU; a timm model gets mergence."""
    num_classes = weights['head.weight'].shape[0] if 'head.weight' in weights else 0
    model = create_model(config, num_classes)
    if not is_mtvit(config.model):
        try:
            models_mtvit.apply_mergence(model, keep_rate=config.base_keep_rate,
                                        drop_loc=config.drop_loc)
        except ValueError as error:
            raise UsageError(f'--model {config.model}: {error}') from None
    load_weights(model, weights, path, chosen_by=f'--model {config.model}')
    return model.eval()


def _check_output(path: str, checkpoint: str):
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UsageError(f'--output {path}: folder {folder} does not exist')
    if os.path.isdir(path):
        raise UsageError(f'--output {path} is a folder, not a file name')
    try:  # before the export, which takes a while
        os.rmdir(tempfile.mkdtemp(dir=folder, prefix='.export-probe-'))
    except OSError as error:
        raise UsageError(f'--output {path}: cannot write in {folder} ({error.strerror})') from None
    if os.path.exists(path) and os.path.exists(checkpoint) and os.path.samefile(path, checkpoint):
        raise UsageError(f'--output {path} is the --resume checkpoint: the export would replace it')


def main(args: argparse.Namespace) -> dict:
    """Exports, checks and measures; returns the figures printed."""
    _check_output(args.output, args.resume)
    checkpoint = load_checkpoint(args.resume)
    weights = model_state_dict(checkpoint, args.resume)  # refuses what is not a checkpoint
    saved = checkpoint.get('args') if isinstance(checkpoint.get('args'), dict) else {}
    config = resolve_config(args, saved, weights)
    model = build_model(config, weights, args.resume)
    # Built before the export, so that a bad --data-set or --data-path stops it first.
    dataset = _validation_set(args, config.input_size) if args.data_set else None
    fixed = FixedTokenCounts(model, model.token_counts(config.base_keep_rate)).eval()
    try:
        export_onnx(fixed, args.output, config.input_size)
    except ExportError as error:
        raise ExportError(f'--model {config.model} could not be exported to ONNX: {error}') from None
    shape = (f'multi_scale={config.multi_scale} ' if is_mtvit(config.model) else '')
    print(f'exported {config.model} ({shape}keep rate {config.base_keep_rate} at blocks '
          f'{config.drop_loc}, input {config.input_size}) to {args.output} '
          f'({os.path.getsize(args.output) / BYTES_PER_MB:.1f} MB), dynamic batch, opset {OPSET}')

    session = ort_session(args.output, torch.get_num_threads())
    report = {'random': check_random(session, fixed, config.input_size, args.check_batch_sizes)}
    print('max |onnxruntime - PyTorch| of the logits: ' + ', '.join(
        f'{name} {value:.2e}' for name, value in report['random'].items()))
    failures = [f'{name} differs by {value:.2e}' for name, value in report['random'].items()
                if not value <= args.atol]
    if args.data_set:
        report['dataset'] = _check_data_set(session, fixed, dataset, args)
        stats = report['dataset']
        if stats['same_class'] != stats['images'] or not stats['max_difference'] <= args.atol:
            failures.append(f'{args.data_set}: {stats["images"] - stats["same_class"]} images '
                            f'classified differently, logits differ by '
                            f'{stats["max_difference"]:.2e}')
    if args.speed:
        report['speed'] = measure_speed(session, fixed, config.input_size, args.speed_batch_size,
                                        args.speed_iterations)
        speed = report['speed']
        print(f'CPU throughput, batch {args.speed_batch_size}, {torch.get_num_threads()} threads: '
              f'PyTorch {speed["PyTorch"]:.1f} images/s, onnxruntime {speed["onnxruntime"]:.1f} '
              f'images/s ({speed["onnxruntime"] / speed["PyTorch"]:.2f}x)')
    if failures:
        raise CheckFailed(f'onnxruntime disagrees with PyTorch beyond --atol {args.atol}: '
                          f'{"; ".join(failures)} ({args.output} is written)')
    return report


def _validation_set(args: argparse.Namespace, input_size: int):
    """--data-set's validation split at ``input_size`` (DatasetError naming what is wrong)."""
    from datasets import build_dataset
    from input_pipeline import build_transform
    return build_dataset(False, data_set=args.data_set, data_path=args.data_path,
                         transform=build_transform(False, input_size=input_size))[0]


def _check_data_set(session, model: nn.Module, dataset, args: argparse.Namespace
                    ) -> Dict[str, float]:
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size,
                                         num_workers=args.num_workers)
    stats = check_dataset(session, model, loader)
    images = stats['images']
    print(f'{args.data_set} validation: {images} images, same class for {stats["same_class"]}; '
          f'top-1 PyTorch {100 * stats["correct_torch"] / images:.1f}%, onnxruntime '
          f'{100 * stats["correct_onnx"] / images:.1f}%; max |difference| '
          f'{stats["max_difference"]:.2e}')
    return stats


def cli(argv: Optional[List[str]] = None) -> int:
    """Command-line entry: one line and a non-zero exit for bad input or a failed check."""
    parser = OneLineErrorParser(description='Export an MTViT or merged timm ViT checkpoint to ONNX',
                                command='export.py', parents=[get_args_parser()], add_help=False)
    args = parser.parse_args(argv)
    try:
        main(args)
        return 0
    except (UsageError, CheckpointError, DatasetError, ExportError) as error:
        message, status = str(error), 2
    except CheckFailed as error:
        message, status = str(error), 1
    except OSError as error:  # a fault of the machine: a full disk, an unreadable file
        message = machine_error_message(error)
        if message is None:
            raise
        status = 1
    print(f'export.py: error: {message}', file=sys.stderr, flush=True)
    return status


if __name__ == '__main__':
    sys.exit(cli())
