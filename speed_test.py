"""Cost of a model: FLOPs per image (the paper's convention) and measured throughput.

As a command it compares models in one process, interleaving their timed runs so that both see
the same machine state, and prints throughputs and ratios to the first model::

    python speed_test.py deit_small_patch16_224 \\
        deit_small_patch16_shrink_base:multi_scale=true:base_keep_rate=0.7 --mode both

A model is ``name`` or ``name:key=value[:key=value...]`` with JSON values (``true``, ``0.7``,
``[3,6,9]``), passed to ``timm.create_model``.
"""
import argparse
import json
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, List, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

# Defaults that finish in about a minute on a 2-core CPU; on a GPU those of the original release.
CPU_DEFAULTS = dict(batch_size=32, iterations=3, warmup=1, repeats=3)
GPU_DEFAULTS = dict(batch_size=64, iterations=100, warmup=30, repeats=3)


def _sdpa_flop_handle(inputs, outputs) -> int:
    """fvcore handle for ``aten::scaled_dot_product_attention``: q @ k^T plus attn @ v, in
    multiply-adds, as fvcore counts the unfused matmuls (it would count the fused op as 0)."""
    from fvcore.nn.jit_handles import get_shape
    q_shape, k_shape, v_shape = (get_shape(value) for value in inputs[:3])
    *batch_heads, num_queries, head_dim = q_shape
    num_keys, value_dim = k_shape[-2], v_shape[-1]
    batch_heads_count = 1
    for size in batch_heads:
        batch_heads_count *= size
    return batch_heads_count * num_queries * num_keys * (head_dim + value_dim)


def count_flops(model: nn.Module, input_size: int, device: torch.device = torch.device('cpu'),
                in_chans: int = 3) -> float:
    """FLOPs of one image of ``input_size`` x ``input_size`` in the paper's convention: fvcore's
    count (one multiply-add is one FLOP), fused attention included. The model is put in eval mode."""
    from fvcore.nn import FlopCountAnalysis
    model.eval()
    image = torch.randn(1, in_chans, input_size, input_size, device=device)
    with torch.no_grad():
        analysis = FlopCountAnalysis(model, image)
        analysis.set_op_handle('aten::scaled_dot_product_attention', _sdpa_flop_handle)
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        return float(analysis.total())


def count_macs(model: nn.Module, input_size: int, device: torch.device = torch.device('cpu'),
               in_chans: int = 3) -> float:
    """torchprofile's multiply-accumulate count for one image: the cross-check of ``count_flops``."""
    from torchprofile import profile_macs
    model.eval()
    image = torch.randn(1, in_chans, input_size, input_size, device=device)
    # torchprofile warns for every op it has no handler for (sort, scatter, ...): all cost-free.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter('ignore')
        return float(profile_macs(model, image))


def synchronize(device: torch.device):
    """Waits for the device's queued work, so that the clock reads finished work only."""
    if device.type != 'cpu':
        torch.accelerator.synchronize(device)


@dataclass
class _Timed:
    """One model under measurement: a step function and the images each step processes."""
    name: str
    step: Callable[[], None]
    images_per_step: int


def _inference_step(model: nn.Module, images: torch.Tensor) -> Callable[[], None]:
    model.eval()

    def step():
        with torch.inference_mode():
            model(images)
    return step


def _training_step(model: nn.Module, images: torch.Tensor, num_classes: int) -> Callable[[], None]:
    model.train()
    labels = torch.randint(num_classes, (images.shape[0],), device=images.device)

    def step():
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(images), labels).backward()
    return step


def time_interleaved(timed: Sequence[_Timed], device: torch.device, iterations: int,
                     warmup: int, repeats: int) -> Dict[str, List[float]]:
    """Throughput (images/s) of each entry, ``repeats`` times. Every round times each entry once
    (``iterations`` steps, after ``warmup`` untimed steps in the first round), so that slow
    drifts of the machine affect all entries alike. With several entries, each timing is
    preceded by one untimed step and every other round runs them in reverse order: an entry
    timed right after another one otherwise pays for the caches and allocator state that one
    left behind, which biases the ratios by several percent. Returns name -> one value per round.
    """
    for entry in timed:
        for _ in range(warmup):
            entry.step()
    synchronize(device)
    results = {entry.name: [] for entry in timed}
    for round_index in range(repeats):
        ordered = timed if round_index % 2 == 0 else list(reversed(timed))
        for entry in ordered:
            if len(timed) > 1:
                entry.step()
            synchronize(device)
            start = time.perf_counter()
            for _ in range(iterations):
                entry.step()
            synchronize(device)
            elapsed = time.perf_counter() - start
            results[entry.name].append(entry.images_per_step * iterations / elapsed)
    return results


def measure_throughput(model: nn.Module, input_size: int, device: torch.device,
                       batch_size: int, iterations: int, warmup: int, repeats: int,
                       in_chans: int = 3) -> List[float]:
    """Inference throughput (images/s) of ``model`` on random (B, 3, H, W) input, in eval mode
    without gradients, one value per repeat (each of ``iterations`` batches, after ``warmup``)."""
    images = torch.randn(batch_size, in_chans, input_size, input_size, device=device)
    timed = [_Timed('model', _inference_step(model, images), batch_size)]
    return time_interleaved(timed, device, iterations, warmup, repeats)['model']


def parse_model_spec(spec: str) -> Tuple[str, dict]:
    """``name[:key=value...]`` with JSON values -> (name, kwargs). Never evaluates code."""
    name, *assignments = spec.split(':')
    kwargs = {}
    for assignment in assignments:
        key, sep, value = assignment.partition('=')
        if not sep or not key:
            raise ValueError(f'model argument {assignment!r} in {spec!r} is not key=value')
        try:
            kwargs[key] = json.loads(value)
        except json.JSONDecodeError:
            raise ValueError(f'value of {key} in {spec!r} is not JSON (true, 0.7, [3,6,9]): '
                             f'{value!r}') from None
    return name, kwargs


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser('Compare the cost of models in one process', add_help=True)
    parser.add_argument('models', nargs='+', help='name[:key=value...]; ratios are to the first')
    parser.add_argument('--mode', choices=('inference', 'train', 'both'), default='inference')
    parser.add_argument('--input-size', type=int, default=224)
    parser.add_argument('--num-classes', type=int, default=1000)
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--batch-size', type=int, default=None,
                        help=f'default {CPU_DEFAULTS["batch_size"]} on CPU, '
                             f'{GPU_DEFAULTS["batch_size"]} on GPU')
    parser.add_argument('--iterations', type=int, default=None, help='timed batches per round')
    parser.add_argument('--warmup', type=int, default=None, help='untimed batches first')
    parser.add_argument('--repeats', type=int, default=None, help='rounds; the best is reported')
    parser.add_argument('--threads', type=int, default=None, help='torch CPU threads')
    parser.add_argument('--flops', action='store_true', help='also print fvcore FLOPs per image')
    return parser


def main(args: argparse.Namespace) -> Dict[str, Dict[str, float]]:
    """Runs the comparison; returns {mode: {model spec: best images/s}}."""
    import timm
    import models_mtvit  # noqa: F401  registers the MTViT models with timm

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    defaults = CPU_DEFAULTS if device.type == 'cpu' else GPU_DEFAULTS
    settings = {key: getattr(args, key) if getattr(args, key) is not None else value
                for key, value in defaults.items()}
    models = {}
    for spec in args.models:
        name, kwargs = parse_model_spec(spec)
        torch.manual_seed(0)
        models[spec] = timm.create_model(name, num_classes=args.num_classes,
                                         img_size=args.input_size, **kwargs).to(device)
    if args.flops:
        for spec, model in models.items():
            print(f'{spec}: {count_flops(model, args.input_size, device) / 1e9:.3f} GFLOPs '
                  f'(fvcore), {count_macs(model, args.input_size, device) / 1e9:.3f} GMACs '
                  f'(torchprofile)')
    images = torch.randn(settings['batch_size'], 3, args.input_size, args.input_size,
                         device=device)
    modes = ('inference', 'train') if args.mode == 'both' else (args.mode,)
    best = {}
    for mode in modes:
        timed = [_Timed(spec, _inference_step(model, images) if mode == 'inference'
                        else _training_step(model, images, args.num_classes),
                        settings['batch_size']) for spec, model in models.items()]
        results = time_interleaved(timed, device, settings['iterations'], settings['warmup'],
                                   settings['repeats'])
        best[mode] = {spec: max(values) for spec, values in results.items()}
        reference = best[mode][args.models[0]]
        print(f'{mode} ({device.type}, batch {settings["batch_size"]}, '
              f'{settings["iterations"]} iterations x {settings["repeats"]} rounds, best):')
        for spec, values in results.items():
            runs = ', '.join(f'{value:.1f}' for value in values)
            print(f'  {spec}: {best[mode][spec]:.1f} images/s [{runs}]  '
                  f'ratio {best[mode][spec] / reference:.3f}')
    return best


if __name__ == '__main__':
    cli_args = get_args_parser().parse_args()
    try:
        main(cli_args)
    except (ValueError, RuntimeError) as error:
        print(f'speed_test.py: error: {error}', file=sys.stderr)
        sys.exit(2)
