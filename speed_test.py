"""Cost of a model: FLOPs per image (the paper's convention) and measured throughput.

As a command it compares models in one process, interleaving their timed runs so that all see
the same machine state, and prints the median throughput of the rounds and ratios to the first
model::

    python speed_test.py deit_small_patch16_224 \\
        deit_small_patch16_shrink_base:multi_scale=true:base_keep_rate=0.7 --mode both

    python speed_test.py --suite gpu --json gpu.json    # the README's GPU table, on any CUDA card

A model is ``name`` or ``name:key=value[:key=value...]`` with JSON values (``true``, ``0.7``,
``[3,6,9]``), passed to ``timm.create_model``. ``--json`` records every figure with the device,
the library versions and the settings; ``--count-ops`` and ``--roofline`` count what a forward
would launch on a GPU and estimate its eager time on an H100, on any device (``op_costs``).
"""
import argparse
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from functools import partial
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from atomic_write import replacing
from launch_env import parse_device
from op_costs import count_flops, count_macs, print_op_counts, print_roofline, profile_step
from utils import POSITIVE_INT, OneLineErrorParser, amp_autocast, synchronize

# Defaults that finish in about a minute on a 2-core CPU; on a GPU, short rounds (a GPU's speed
# drifts with its clock: several rounds and their median say more than one long one).
CPU_DEFAULTS = dict(batch_size=32, iterations=3, warmup=1, repeats=3)
GPU_DEFAULTS = dict(batch_size=64, iterations=30, warmup=10, repeats=5)
# main.py --test_speed: rounds of at least this many seconds (and `iterations` batches), so that a
# small model's figure is not a few milliseconds of timer noise; the median of SPEED_ROUNDS.
ROUND_SECONDS = {'cpu': 1.0, 'cuda': 0.5}
SPEED_ROUNDS = 5
# --roofline's batch, as the README's GPU table.
ROOFLINE_BATCH = 256
AMP_DTYPES = {'none': None, 'fp32': None, 'fp16': torch.float16, 'bf16': torch.bfloat16}
"""--amp's choices; 'fp32' (main.py's name) is 'none', no autocast."""
GIB = 2 ** 30
PROFILE_NAME_WIDTH = 100  # characters of an op's or kernel's name on a --profile line
# Steps profiled per model and row (--profile, --trace), after the row's timed rounds (whether
# the profiler leaves later launches slower is untried: .ci/gpu profiles one row per process).
PROFILED_STEPS = 3

DEIT_S = 'deit_small_patch16_224'
MTVIT_S_MULTI = 'deit_small_patch16_shrink_base:multi_scale=true:base_keep_rate=0.7'
MTVIT_S_SINGLE = 'deit_small_patch16_shrink_base:base_keep_rate=0.7'
MTVIT_S_KEEP_1 = 'deit_small_patch16_shrink_base:base_keep_rate=1.0'
SUITE_MODELS = (DEIT_S, MTVIT_S_MULTI, MTVIT_S_SINGLE, MTVIT_S_KEEP_1)
# The README's GPU table: (part, mode, amp, batch sizes); the parts other than 'eager' compile
# each model, in SUITE_COMPILE_MODES's mode (torch.compile's default where it names none).
GPU_SUITE = (
    ('eager', 'inference', 'fp16', (1, 256, 1024)),
    ('eager', 'inference', 'none', (256,)),
    ('eager', 'train', 'bf16', (256,)),
    ('eager', 'train', 'fp16', (128,)),
    ('compiled-inference', 'inference', 'fp16', (256,)),
    ('compiled-train', 'train', 'bf16', (256,)),
    ('cuda-graphs', 'inference', 'fp16', (256,)),
    ('cuda-graphs', 'train', 'bf16', (256,)),
)
# The compiled MTViT-S's hosts never got far ahead of the H200: CUDA graphs launch a step at once.
SUITE_COMPILE_MODES = {'cuda-graphs': 'reduce-overhead'}
# --suite NAME: its parts ('compile-time': COMPILE_TIME_MODELS, each in a fresh process).
SUITES = {'gpu': ('compile-time', 'eager', 'compiled-inference', 'compiled-train', 'cuda-graphs'),
          'gpu-eager': ('eager',),
          'gpu-compiled': ('compile-time', 'compiled-inference', 'compiled-train', 'cuda-graphs'),
          'gpu-cuda-graphs': ('cuda-graphs',),
          'gpu-compiled-inference': ('compile-time', 'compiled-inference'),
          'gpu-compiled-train': ('compiled-train',)}
# Where a compilation's time goes (torch._dynamo's timers), as --suite prints it.
COMPILE_PHASES = {'bytecode_tracing': 'Dynamo tracing',
                  'create_aot_dispatcher_function': 'AOT autograd and inductor',
                  'async_compile.wait': 'waiting for kernels'}
COMPILE_TIME_MODELS = (DEIT_S, MTVIT_S_MULTI)  # compile time measured, each in a fresh process


@dataclass
class TimedStep:
    """One model under measurement: a step function and the images each step processes."""
    name: str
    step: Callable[[], None]
    images_per_step: int


def inference_step(model: nn.Module, images: torch.Tensor,
                   amp_dtype: Optional[torch.dtype] = None) -> Callable[[], None]:
    """An eval-mode forward of ``images`` (B, 3, H, W) under inference mode and autocast."""
    model.eval()

    def step():
        with torch.inference_mode(), amp_autocast(images.device, amp_dtype):
            model(images)
    return step


def training_step(model: nn.Module, images: torch.Tensor, num_classes: int,
                  amp_dtype: Optional[torch.dtype] = None) -> Callable[[], None]:
    """Forward and backward of ``images`` (B, 3, H, W) with random labels (no optimizer)."""
    model.train()
    labels = torch.randint(num_classes, (images.shape[0],), device=images.device)

    def step():
        model.zero_grad(set_to_none=True)
        with amp_autocast(images.device, amp_dtype):
            loss = F.cross_entropy(model(images), labels)
        loss.backward()
    return step


def _host_usage() -> Tuple[float, float, int]:
    """This process's CPU seconds (user, system) and minor page faults (zeros: no getrusage)."""
    try:
        import resource
    except ImportError:  # Windows
        return 0., 0., 0
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime, usage.ru_stime, usage.ru_minflt


def time_interleaved(timed: Sequence[TimedStep], device: torch.device, iterations: int,
                     warmup: int, repeats: int, peak_memory: Optional[Dict[str, float]] = None,
                     host_costs: Optional[Dict[str, dict]] = None) -> Dict[str, List[float]]:
    """Throughput (images/s) of each entry, ``repeats`` times. Every round times each entry once
    (``iterations`` steps, after ``warmup`` untimed steps in the first round), so that slow
    drifts of the machine affect all entries alike. With several entries, each timing is
    preceded by one untimed step and every other round runs them in reverse order: an entry
    timed right after another one otherwise pays for the caches and allocator state that one
    left behind, which biases the ratios by several percent. Returns name -> one value per round.

    ``peak_memory`` (CUDA only), when given, receives name -> the most device memory (bytes)
    one step held above what was allocated before it (the resident weights, and the gradients
    of the step before, which a step frees as it starts).

    ``host_costs``, when given, receives name -> the minor page faults per timed step and the
    share of the host's CPU time spent in the kernel: with glibc's default allocator, each
    activation over its mmap threshold (at most 32 MiB) is mapped afresh and zeroed page by page
    by the kernel at every step (and so is the heap's trimmed top), which can take a quarter of a
    CPU model's time and so move the ratios between models; ``MALLOC_MMAP_THRESHOLD_`` and
    ``MALLOC_TRIM_THRESHOLD_`` set above the largest activation (4294967296) remove both. On
    CUDA a host far ahead of the device blocks in the driver once its queue of launches is full:
    a share near 0 says the host never got far ahead, not which side set the time.
    """
    for entry in timed:
        for _ in range(warmup):
            entry.step()
    synchronize(device)
    results = {entry.name: [] for entry in timed}
    usage = {entry.name: (0., 0., 0) for entry in timed}
    for round_index in range(repeats):
        ordered = timed if round_index % 2 == 0 else list(reversed(timed))
        for entry in ordered:
            if len(timed) > 1:
                entry.step()
            synchronize(device)
            before, start = _host_usage(), time.perf_counter()
            for _ in range(iterations):
                entry.step()
            synchronize(device)
            elapsed = time.perf_counter() - start
            results[entry.name].append(entry.images_per_step * iterations / elapsed)
            usage[entry.name] = tuple(total + end - begin for total, end, begin
                                      in zip(usage[entry.name], _host_usage(), before))
    if host_costs is not None:
        for name, (user, system, faults) in usage.items():
            host_costs[name] = dict(page_faults_per_step=faults / (repeats * iterations),
                                    kernel_time_share=system / max(user + system, 1e-9))
    if peak_memory is not None and device.type == 'cuda':
        for entry in timed:
            synchronize(device)
            resident = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            entry.step()
            synchronize(device)
            peak_memory[entry.name] = torch.cuda.max_memory_allocated(device) - resident
    return results


def measure_throughput(model: nn.Module, input_size: int, device: torch.device,
                       batch_size: int, iterations: int, warmup: int, repeats: int,
                       in_chans: int = 3, amp_dtype: Optional[torch.dtype] = None) -> List[float]:
    """Inference throughput (images/s) of ``model`` on random (B, 3, H, W) input, in eval mode
    without gradients (under autocast to ``amp_dtype`` if given), one value per repeat (each of
    ``iterations`` batches, after ``warmup``)."""
    images = torch.randn(batch_size, in_chans, input_size, input_size, device=device)
    timed = [TimedStep('model', inference_step(model, images, amp_dtype), batch_size)]
    return time_interleaved(timed, device, iterations, warmup, repeats)['model']


def report_flops(model: nn.Module, input_size: int, device: torch.device, label: str = ''):
    """``label``, then FLOPs per image (fvcore: the paper's convention) and torchprofile's MACs."""
    flops = count_flops(model, input_size, device)
    macs = count_macs(model, input_size, device)
    print(f'{label}FLOPs: {flops / 1e9:.3f} G per image at {input_size}x{input_size} (fvcore); '
          f'torchprofile: {macs / 1e9:.3f} G MACs')


def report_throughput(model: nn.Module, input_size: int, device: torch.device, label: str,
                      batch_size: Optional[int] = None, iterations: Optional[int] = None,
                      amp_dtype: Optional[torch.dtype] = None, note: str = '',
                      log_path: Optional[str] = None) -> float:
    """Measures inference throughput (``measure_throughput``; the batch defaults to the
    device's, the batches per round to as many as fill ``ROUND_SECONDS``), prints it
    as ``main.py --test_speed`` does and appends the line to ``log_path`` if given. Returns the
    median images/s."""
    defaults = CPU_DEFAULTS if device.type == 'cpu' else GPU_DEFAULTS
    batch_size = batch_size or defaults['batch_size']
    measure = partial(measure_throughput, model, input_size, device, batch_size=batch_size,
                      amp_dtype=amp_dtype)
    warmup = max(defaults['warmup'], 2)
    if iterations is None:  # one round of one batch to size the rounds
        [estimate] = measure(iterations=1, warmup=warmup, repeats=1)
        round_seconds = ROUND_SECONDS.get(device.type, ROUND_SECONDS['cuda'])
        iterations = max(defaults['iterations'], math.ceil(round_seconds * estimate / batch_size))
    runs = measure(iterations=iterations, warmup=warmup, repeats=SPEED_ROUNDS)
    median = statistics.median(runs)
    precision = 'fp32' if amp_dtype is None else f'amp {str(amp_dtype).replace("torch.", "")}'
    line = (f'{label} input {input_size} batch {batch_size} on {device} ({precision}): '
            f'{median:.1f} images/s (median of {", ".join(f"{run:.1f}" for run in runs)}); {note}')
    print(f'throughput: {line}')
    if log_path:
        with open(log_path, 'a') as handle:
            handle.write(line + '\n')
    return median


SET_BY_FLAGS = {'img_size': '--input-size', 'num_classes': '--num-classes'}  # for every model


def parse_model_spec(spec: str) -> Tuple[str, dict]:
    """``name[:key=value...]`` with JSON values -> (name, kwargs). Never evaluates code."""
    name, *assignments = spec.split(':')
    kwargs = {}
    for assignment in assignments:
        key, sep, value = assignment.partition('=')
        if not sep or not key:
            raise ValueError(f'model argument {assignment!r} in {spec!r} is not key=value')
        if key in kwargs:
            raise ValueError(f'{key} is given twice in {spec!r}')
        if key in SET_BY_FLAGS:
            raise ValueError(f'{key} in {spec!r}: give {SET_BY_FLAGS[key]} instead')
        try:
            kwargs[key] = json.loads(value)
        except json.JSONDecodeError:
            raise ValueError(f'value of {key} in {spec!r} is not JSON (true, 0.7, [3,6,9]): '
                             f'{value!r}') from None
    return name, kwargs


def environment(device: torch.device) -> dict:
    """What a figure depends on besides the settings: device and library versions."""
    import timm
    info = {'device': str(device), 'torch': torch.__version__, 'timm': timm.__version__,
            'python': platform.python_version(), 'processor': platform.processor() or
            platform.machine(), 'cpu_threads': torch.get_num_threads(),
            'allocator_env': {key: value for key, value in os.environ.items()
                              if key.startswith('MALLOC_') or key in ('LD_PRELOAD',
                                                                        'GLIBC_TUNABLES')}}
    try:  # transparent huge pages ('always': large activations fault in 2 MiB pages)
        with open('/sys/kernel/mm/transparent_hugepage/enabled') as handle:
            info['transparent_hugepages'] = handle.read().strip()
    except OSError:
        pass
    if device.type == 'cuda':
        info.update(device_name=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version())
    return info


def get_args_parser() -> argparse.ArgumentParser:
    """speed_test.py's command line (``main(get_args_parser().parse_args([...]))``)."""
    parser = OneLineErrorParser(description='Compare the cost of models in one process',
                                command='speed_test.py')
    parser.add_argument('models', nargs='*', help='name[:key=value...]; ratios are to the first')
    parser.add_argument('--suite', choices=tuple(SUITES), default=None,
                        help='gpu: DeiT-S and the MTViT-S variants over the README\'s GPU table '
                             '(eager, compiled and with CUDA graphs; latency, memory, compile '
                             'time); the others: its parts (SUITES)')
    parser.add_argument('--mode', choices=('inference', 'train', 'both'), default='inference')
    parser.add_argument('--amp', choices=tuple(AMP_DTYPES), default='none',
                        help='autocast dtype (default none: float32)')
    parser.add_argument('--compile', action='store_true', help='torch.compile every model')
    parser.add_argument('--compile-mode', default=None,
                        choices=('default', 'reduce-overhead', 'max-autotune'),
                        help='torch.compile\'s mode (reduce-overhead: CUDA graphs, for the '
                             'host-bound small batches); with --compile')
    parser.add_argument('--channels-last', action='store_true',
                        help='models and images in channels-last memory format')
    parser.add_argument('--input-size', type=POSITIVE_INT, default=224)
    parser.add_argument('--num-classes', type=POSITIVE_INT, default=1000)
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--batch-size', type=POSITIVE_INT, nargs='+', default=None,
                        help=f'one or more (1 gives the latency); default '
                             f'{CPU_DEFAULTS["batch_size"]} on CPU, {GPU_DEFAULTS["batch_size"]} on GPU')
    parser.add_argument('--iterations', type=int, default=None, help='timed batches per round')
    parser.add_argument('--warmup', type=int, default=None, help='untimed batches first')
    parser.add_argument('--repeats', type=int, default=None,
                        help='rounds; the median is reported (0: no timing, only the figures of '
                             '--flops, --count-ops and --roofline)')
    parser.add_argument('--threads', type=POSITIVE_INT, default=None, help='torch CPU threads')
    parser.add_argument('--flops', action='store_true', help='also print fvcore FLOPs per image')
    parser.add_argument('--count-ops', action='store_true',
                        help='also print the kernel-running operations (each a launch on a GPU) '
                             'and all operations dispatched of one forward of one image, or '
                             '(--mode train) of a training step of two, under --amp')
    parser.add_argument('--roofline', action='store_true',
                        help='also print the estimated H100 eager time of one step (--mode) at '
                             f'the first --batch-size (default {ROOFLINE_BATCH}) under --amp, from '
                             'its operations\' bytes and FLOPs (op_costs.py); runs on any device')
    parser.add_argument('--profile', type=int, default=0, metavar='N',
                        help='also print (and record) the N ops (on a GPU also the N CUDA '
                             'kernels) each model\'s step spends most time in, per step, and on '
                             'a GPU the share of the step the device was busy')
    parser.add_argument('--trace', default=None, metavar='FOLDER', help='also write each '
                        'profiled step\'s Chrome trace here (a .json.gz per model and row)')
    parser.add_argument('--json', default=None, help='write every figure and setting here')
    return parser


def _create_model(spec: str, num_classes: int, input_size: int) -> nn.Module:
    """The timm model of ``spec`` (``name:key=value:...``) for ``input_size`` images."""
    import timm
    import models_mtvit  # noqa: F401  registers the MTViT models with timm
    name, kwargs = parse_model_spec(spec)
    # A CNN takes no img_size (any input size fits it): it is built without one.
    for size in ({'img_size': input_size}, {}):
        torch.manual_seed(0)
        try:
            return timm.create_model(name, num_classes=num_classes, **size, **kwargs)
        except TypeError as error:  # a key the model does not take, or a value of another type
            if not (size and "'img_size'" in str(error)):
                raise ValueError(f'{spec}: {error}') from None


def _build_models(specs: Sequence[str], num_classes: int, input_size: int, channels_last: bool,
                  device: torch.device) -> Dict[str, nn.Module]:
    layout = torch.channels_last if channels_last else torch.contiguous_format
    return {spec: _create_model(spec, num_classes, input_size).to(device, memory_format=layout)
            for spec in specs}


def compare(models: Dict[str, nn.Module], mode: str, batch_size: int, args,
            device: torch.device, settings: dict, compiled: bool = False) -> List[dict]:
    """Times ``models`` interleaved in one ``mode`` and batch size; returns one record each
    (median images/s, every round, ratio to the first model, latency, peak memory)."""
    amp_dtype = AMP_DTYPES[args.amp]
    images = torch.randn(batch_size, 3, args.input_size, args.input_size, device=device).contiguous(
        memory_format=torch.channels_last if args.channels_last else torch.contiguous_format)
    timed, compile_seconds, compile_record = [], {}, {}
    for spec, model in models.items():
        step = (inference_step(model, images, amp_dtype) if mode == 'inference'
                else training_step(model, images, args.num_classes, amp_dtype))
        if compiled:  # the first step compiles: timed alone, it is the compile time
            synchronize(device)
            start = time.perf_counter()
            step()
            synchronize(device)
            compile_seconds[spec] = time.perf_counter() - start
            if len(models) == 1:  # where a lone compilation spent its time
                compile_record = _compile_record()
        timed.append(TimedStep(spec, step, batch_size))
    peak, host = {}, {}
    # Under CUDA graphs a step's memory is its graph's pool, allocated when recorded: no peak.
    measures_peak = mode == 'train' and not (compiled and args.compile_mode == 'reduce-overhead')
    results = time_interleaved(timed, device, settings['iterations'], settings['warmup'],
                               settings['repeats'], peak_memory=peak if measures_peak else None,
                               host_costs=host)
    medians = {spec: statistics.median(values) for spec, values in results.items()}
    reference = medians[next(iter(models))]
    records = []
    steps = {entry.name: entry.step for entry in timed}
    for spec, values in results.items():
        record = dict(model=spec, mode=mode, amp=args.amp, batch_size=batch_size,
                      compiled=compiled, channels_last=args.channels_last,
                      compile_mode=(args.compile_mode or 'default') if compiled else None,
                      input_size=args.input_size, images_per_s=medians[spec],
                      rounds=values, ratio=medians[spec] / reference,
                      iterations=settings['iterations'], repeats=settings['repeats'],
                      **host[spec])
        if batch_size == 1:
            record['latency_ms'] = 1000. / medians[spec]
        if spec in peak:
            record['peak_memory_gib'] = peak[spec] / GIB
        if spec in compile_seconds:
            record['first_step_s'] = compile_seconds[spec]
        record.update(compile_record)
        if args.profile or args.trace:
            trace = args.trace and os.path.join(args.trace, _trace_name(record))
            rows, busy_ms = profile_step(steps[spec], device, args.profile, PROFILED_STEPS, trace)
            record['profile'] = rows
            if busy_ms is not None:
                record['device_busy_share'] = busy_ms * medians[spec] / (1e3 * batch_size)
        records.append(record)
    return records


def _trace_name(record: dict) -> str:
    """--trace's file for a ``compare`` record: mode, precision, batch, compilation, model."""
    compiled = f'-compiled-{record["compile_mode"]}' if record['compiled'] else ''
    model = re.sub(r'[^\w.=,-]', '_', record['model'])
    return f'{record["mode"]}-{record["amp"]}-b{record["batch_size"]}{compiled}-{model}.json.gz'


def compile_models(models: Dict[str, nn.Module], mode: Optional[str]) -> Dict[str, nn.Module]:
    """Each model under ``torch.compile`` in ``mode`` (``--compile-mode``; None: the default)."""
    # Dynamo recompiles a code object 8 times, then runs it eagerly, silently: a suite compiles 12.
    torch._dynamo.reset()
    return {spec: torch.compile(model, mode=mode) for spec, model in models.items()}


def print_records(records: Sequence[dict], device: torch.device):
    """Prints one ``compare`` run: a heading with its settings, then a line per model."""
    first = records[0]
    print(f'{first["mode"]} ({device.type}, amp {first["amp"]}, batch {first["batch_size"]}'
          f'{", compiled (" + first["compile_mode"] + ")" if first["compiled"] else ""}'
          f'{", channels-last" if first["channels_last"] else ""}, {first["iterations"]} '
          f'iterations x {first["repeats"]} rounds, median):')
    for record in records:
        runs = ', '.join(f'{value:.1f}' for value in record['rounds'])
        extra = ''
        if 'latency_ms' in record:
            extra += f'  latency {record["latency_ms"]:.2f} ms'
        if 'peak_memory_gib' in record:
            extra += f'  peak memory {record["peak_memory_gib"]:.2f} GiB'
        if 'first_step_s' in record:
            extra += f'  first (compiling) step {record["first_step_s"]:.1f} s'
        if 'device_busy_share' in record:
            extra += f'  device busy {record["device_busy_share"]:.0%} of the step'
        if device.type == 'cpu' and 'page_faults_per_step' in record:
            extra += (f'  {record["page_faults_per_step"]:.0f} page faults per step, '
                      f'{record["kernel_time_share"]:.0%} of the CPU time in the kernel')
        print(f'  {record["model"]}: {record["images_per_s"]:.1f} images/s [{runs}]  '
              f'ratio {record["ratio"]:.3f}{extra}', flush=True)
        for row in record.get('profile', ()):
            print(f'      {row["where"]:>6} {row["ms_per_step"]:8.3f} ms '
                  f'{row["calls_per_step"]:6.1f}x  {row["name"][:PROFILE_NAME_WIDTH]}')


def _write_json(path: Optional[str], device: torch.device, records: List[dict]):
    if path:  # replaced whole: a run stopped while writing leaves the last parts' records
        with replacing(path) as staged, open(staged, 'w') as handle:
            json.dump({'environment': environment(device), 'records': records}, handle, indent=1)


def _compile_record() -> dict:
    """Where the process's compilations went: ``compile_phases``, the seconds of each phase
    (torch._dynamo's timers, summed), and ``generated_kernels``, inductor's count."""
    from torch._dynamo.utils import compile_times
    from torch._inductor import metrics
    names, seconds = compile_times(repr='csv', aggregate=True)
    return dict(compile_phases={name: float(value) for name, value in zip(names, seconds)},
                generated_kernels=metrics.generated_kernel_count)


def measure_compile_time(spec: str, args, device: torch.device) -> dict:
    """Compiles ``spec`` and runs its first fp16 inference batch in a fresh process (a
    process's first compilation also pays for starting the compiler: each model alike); returns
    ``compile_s``, the seconds that took, with ``_compile_record``'s fields."""
    import tempfile
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, 'compile.json')
        command = [sys.executable, os.path.abspath(__file__), spec, '--compile', '--amp', 'fp16',
                   '--device', str(device), '--batch-size', '256', '--iterations', '1',
                   '--warmup', '0', '--repeats', '1', '--input-size', str(args.input_size),
                   '--json', path]
        # Empty compiler caches: nothing compiled by an earlier model or run is reused.
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=os.path.join(folder, 'inductor'),
                   TRITON_CACHE_DIR=os.path.join(folder, 'triton'))
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, env=env)
        with open(path) as handle:
            record = json.load(handle)['records'][0]
        return dict(compile_s=record['first_step_s'], compile_phases=record['compile_phases'],
                    generated_kernels=record['generated_kernels'])


def run_suite(args, device: torch.device, settings: dict) -> List[dict]:
    """The parts of the README's GPU table that ``--suite`` names (``SUITES``): the compile
    times, then the GPU_SUITE rows for SUITE_MODELS (the first three when compiled)."""
    records = []
    parts = SUITES[args.suite]
    # Compile times first: each in a fresh process, before this one has compiled anything.
    for spec in COMPILE_TIME_MODELS if 'compile-time' in parts else ():
        measured = measure_compile_time(spec, args, device)
        phases = measured['compile_phases']
        where = ', '.join(f'{label} {phases[name]:.1f} s' for name, label in COMPILE_PHASES.items()
                          if name in phases)
        print(f'compile time (fresh process, fp16 inference, first batch): {spec}: '
              f'{measured["compile_s"]:.1f} s ({where}; {measured["generated_kernels"]} kernels '
              f'generated)', flush=True)
        records.append(dict(model=spec, mode='compile', amp='fp16', **measured))
        _write_json(args.json, device, records)
    for part, mode, amp, batch_sizes in GPU_SUITE:
        if part not in parts:
            continue
        compiled = part != 'eager'
        compile_mode = SUITE_COMPILE_MODES.get(part)
        part_args = argparse.Namespace(**{**vars(args), 'amp': amp, 'compile_mode': compile_mode})
        specs = SUITE_MODELS if not compiled else SUITE_MODELS[:3]
        models = _build_models(specs, args.num_classes, args.input_size,
                               args.channels_last, device)
        if compiled:
            models = compile_models(models, compile_mode)
        for batch_size in batch_sizes:
            rows = compare(models, mode, batch_size, part_args, device, settings, compiled)
            print_records(rows, device)
            records += rows
            _write_json(args.json, device, records)
        del models
        if device.type == 'cuda':
            torch.cuda.empty_cache()
    return records


def main(args: argparse.Namespace) -> List[dict]:
    """Runs the comparison (or the suite); returns its records, as ``--json`` writes them."""
    device = parse_device(args.device)
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise ValueError(f'--device {args.device}: CUDA is not available here')
    folder = os.path.dirname(os.path.abspath(args.json)) if args.json else None
    if folder and not (os.path.isdir(folder) and os.access(folder, os.W_OK)):
        raise ValueError(f'--json {args.json}: {folder} is not a writable folder')
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = True
    defaults = CPU_DEFAULTS if device.type == 'cpu' else GPU_DEFAULTS
    settings = {key: getattr(args, key) if getattr(args, key) is not None else value
                for key, value in defaults.items() if key != 'batch_size'}
    if args.compile_mode and not args.compile:
        raise ValueError('--compile-mode needs --compile')
    if settings['iterations'] < 1 or settings['warmup'] < 0 or settings['repeats'] < 0:
        raise ValueError('--iterations must be at least 1, --warmup and --repeats at least 0')
    if args.trace:  # before any timing, which a late failure to write would waste
        try:
            os.makedirs(args.trace, exist_ok=True)
        except OSError as error:
            raise ValueError(f'--trace {args.trace}: cannot make the folder ({error})') from None
        if not os.access(args.trace, os.W_OK):
            raise ValueError(f'--trace {args.trace}: the folder is not writable')
    if args.suite:
        if args.models or args.batch_size or args.compile or AMP_DTYPES[args.amp] is not None:
            raise ValueError('--suite fixes the models, batch sizes, precision and compilation: '
                             'give none of them with it')
        return run_suite(args, device, settings)
    if not args.models:
        raise ValueError('name at least one model, or --suite gpu')
    models = _build_models(args.models, args.num_classes, args.input_size,
                           args.channels_last, device)
    if args.flops:
        for spec, model in models.items():
            report_flops(model, args.input_size, device, label=f'{spec}: ')
    modes = ('inference', 'train') if args.mode == 'both' else (args.mode,)
    records = (print_op_counts(models, modes, args.input_size, device, args.amp,
                               AMP_DTYPES[args.amp]) if args.count_ops else [])
    if args.roofline:
        records += print_roofline(models, modes, args.input_size, device,
                                  args.batch_size[0] if args.batch_size else ROOFLINE_BATCH,
                                  args.amp, AMP_DTYPES[args.amp])
    if settings['repeats'] == 0:  # the counts and estimates only
        _write_json(args.json, device, records)
        return records
    if args.compile:
        models = compile_models(models, args.compile_mode)
    batch_sizes = args.batch_size or [defaults['batch_size']]
    for mode in modes:
        for batch_size in batch_sizes:
            rows = compare(models, mode, batch_size, args, device, settings, args.compile)
            print_records(rows, device)
            records += rows
    _write_json(args.json, device, records)
    return records


if __name__ == '__main__':
    cli_args = get_args_parser().parse_args()
    try:
        main(cli_args)
    except (ValueError, RuntimeError, OSError) as error:
        print(f'speed_test.py: error: {error}', file=sys.stderr)
        sys.exit(2)
