"""End-to-end checks of the cost and visualisation tools (SPEC 4): ``main.py --flops``,
``--only_test_speed``, ``--visualize_mask`` and the ``speed_test.py`` comparison command.

main.py runs in-process through ``main.cli`` (which returns the exit code the command would
have); speed_test.py, whose error handling lives under ``__main__``, runs as a subprocess.
"""
import gzip
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import main  # noqa: E402
import op_costs  # noqa: E402
import speed_test  # noqa: E402
import models_mtvit  # noqa: E402,F401  (registers the MTViT models with timm)
from checkpoints import save_checkpoint_atomic  # noqa: E402

FLOPS_LINE = re.compile(r'^FLOPs: (?P<flops>\d+\.\d+) G per image at (?P<size>\d+)x(?P=size) '
                        r'\(fvcore\); torchprofile: (?P<macs>\d+\.\d+) G MACs$', re.MULTILINE)
# Cheapest throughput measurement main accepts: one image, one timed batch per round.
CHEAP_SPEED = ['--speed-batch-size', '1', '--speed-iterations', '1']
NO_DATA = '/nonexistent/imagenet'  # --only_test_speed must not touch it
SUBPROCESS_TIMEOUT_S = 90
PATCH = 16
VIS_SIZE = 64
VIS_STAGES = 3  # drop_loc (3, 6, 9)

# fvcore traces with torch.jit, which newer torch flags as deprecated: not this project's concern.
pytestmark = pytest.mark.filterwarnings('ignore:`torch.jit.script` is deprecated:FutureWarning')


@pytest.fixture(autouse=True)
def single_process(monkeypatch):
    """main.py in-process must not see a launcher's environment."""
    for name in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT'):
        monkeypatch.delenv(name, raising=False)


def run_main(argv, capsys):
    """Runs ``main.py ARGV`` in-process on the CPU; returns (exit code, stdout)."""
    capsys.readouterr()
    code = main.cli([*argv, '--device', 'cpu', '--num_workers', '0'])
    return code, capsys.readouterr().out


def printed_flops(out):
    """The (GFLOPs, GMACs, input size) of the one ``FLOPs:`` line in ``out``."""
    matches = list(FLOPS_LINE.finditer(out))
    assert len(matches) == 1, out
    match = matches[0]
    return float(match['flops']), float(match['macs']), int(match['size'])


def assert_cross_checked(flops, macs):
    """fvcore and torchprofile both count one multiply-add as one: they agree within 1%
    (they differ only in what they count of normalisation, GELU and the like)."""
    assert macs == pytest.approx(flops, rel=0.01)


# --- --flops and --only_test_speed -------------------------------------------------------

def test_deit_small_flops_and_only_test_speed(tmp_path, capsys):
    """DeiT-S: 4.61 GFLOPs at 224 (paper); --only_test_speed writes speed_macs.txt, loads no
    data (the IMNET path does not exist), trains nothing and exits 0."""
    out_dir = tmp_path / 'out'
    code, out = run_main(['--model', 'deit_small_patch16_224', '--flops', '--only_test_speed',
                          *CHEAP_SPEED, '--data-path', NO_DATA, '--data-set', 'IMNET',
                          '--output_dir', str(out_dir)], capsys)
    assert code == 0, out
    flops, macs, size = printed_flops(out)
    assert size == 224
    assert round(flops, 2) == 4.61
    assert_cross_checked(flops, macs)

    assert sorted(path.name for path in out_dir.iterdir()) == ['speed_macs.txt']
    assert not (out_dir / main.CHECKPOINT_NAME).exists() and not (out_dir / 'log.txt').exists()
    lines = (out_dir / 'speed_macs.txt').read_text().splitlines()
    assert len(lines) == 1
    n_parameters = sum(p.numel() for p in timm.create_model(
        'deit_small_patch16_224', num_classes=main.DEFAULT_NUM_CLASSES).parameters())
    match = re.fullmatch(r'deit_small_patch16_224 .*input 224 batch 1 on cpu \(fp32\): '
                         r'(?P<speed>\d+\.\d) images/s .*; (?P<params>\d+\.\d\d) M parameters',
                         lines[0])
    assert match, lines[0]
    assert float(match['speed']) > 0
    assert float(match['params']) == round(n_parameters / 1e6, 2) == 22.05
    assert 'images/s' in out and 'Epoch' not in out


def token_counts(input_size, keep_rate=0.7, reductions=3):
    """Tokens (class token included) the blocks of MTViT multi-scale see: the high-resolution
    stream before each reduction and after the last, then the low-resolution stream."""
    patches = (input_size // PATCH) ** 2
    counts = [patches]
    for _ in range(reductions):
        counts.append(math.ceil(keep_rate * counts[-1]))
    return [count + 1 for count in counts] + [patches // 4 + 1]


def test_mtvit_flops_at_224_and_160(capsys):
    """MTViT-S multi-scale: 3.10 GFLOPs at 224 (paper); at 160 about (160/224)^2 of that.

    Bounds of the 160/224 ratio, from the token counts of both sizes: linear layers cost
    tokens * dim^2, so their ratio lies between the smallest and largest ratio of token counts
    over the stages (the ceil of the kept counts and the class token move these a little off
    (160/224)^2 = 0.510). Attention's q@k and attn@v cost tokens^2 * dim, ratio at least the
    smallest token ratio squared, and are at most a fraction N / (6 dim) of a block's linear
    cost (2 N^2 d against 12 N d^2), N = 197, d = 384: under 8.6%, so at most 8% of the total.
    Attention only lowers the ratio, so the largest token ratio bounds it from above."""
    counts = {}
    for size in (224, 160):
        code, out = run_main(['--model', 'deit_small_patch16_shrink_base', '--multi-scale',
                              '--input-size', str(size), '--flops', '--only_test_speed',
                              *CHEAP_SPEED, '--data-path', NO_DATA], capsys)
        assert code == 0, out
        flops, macs, printed_size = printed_flops(out)
        assert printed_size == size
        assert_cross_checked(flops, macs)
        counts[size] = flops
    assert round(counts[224], 2) == 3.10

    ratios = [small / big for small, big in zip(token_counts(160), token_counts(224))]
    attention_share = 0.08
    lower = (1 - attention_share) * min(ratios) + attention_share * min(ratios) ** 2
    upper = max(ratios)
    ratio = counts[160] / counts[224]
    assert lower < ratio < upper, (lower, ratio, upper)
    assert abs(ratio - (160 / 224) ** 2) < 0.02


# --- --visualize_mask --------------------------------------------------------------------

def write_checkpoint(path, multi_scale):
    """A randomly initialised MTViT-T for DIGITS at 64x64, saved as main.py saves models."""
    torch.manual_seed(0)
    model = timm.create_model('deit_tiny_patch16_shrink_base', img_size=VIS_SIZE,
                              num_classes=10, multi_scale=multi_scale)
    save_checkpoint_atomic({'model': model.state_dict()}, str(path))


@pytest.mark.parametrize('multi_scale, batch_size', [(False, 8), (True, 8), (True, 6)])
def test_visualize_mask_writes_n_images(tmp_path, capsys, multi_scale, batch_size):
    """12 images: 12 inputs, 12 x 3 stage maps at the input size (taken from the checkpoint),
    one overview per validation batch of int(1.5 * batch_size) images."""
    checkpoint = tmp_path / 'checkpoint.pth'
    write_checkpoint(checkpoint, multi_scale)
    out_dir = tmp_path / 'vis'
    n_images = 12
    code, out = run_main(['--model', 'deit_tiny_patch16_shrink_base', '--data-set', 'DIGITS',
                          '--visualize_mask', '--n_visualization', str(n_images),
                          '--batch-size', str(batch_size), '--resume', str(checkpoint),
                          '--output_dir', str(out_dir)], capsys)
    assert code == 0, out

    val_batch = int(main.EVAL_BATCH_FACTOR * batch_size)
    rows_per_overview = [min(val_batch, n_images - start) for start in range(0, n_images, val_batch)]
    inputs = sorted(path.name for path in out_dir.glob('img*_input.png'))
    stages = sorted(path.name for path in out_dir.glob('img*_stage*.png'))
    overviews = sorted(out_dir.glob('*_overview.png'))
    # Images spread evenly over the 359 validation images ordered by class (so every digit
    # shows), named by their dataset index.
    from datasets import digits_split
    labels = digits_split(False)[1].tolist()
    by_class = sorted(range(359), key=lambda index: (labels[index], index))
    indices = sorted(by_class[(2 * position + 1) * 359 // (2 * n_images)]
                     for position in range(n_images))
    assert {labels[index] for index in indices} == set(range(10))
    assert inputs == [f'img{index:05d}_input.png' for index in indices]
    assert stages == sorted(f'img{index:05d}_stage{stage}.png' for index in indices
                            for stage in range(1, VIS_STAGES + 1))
    assert len(overviews) == len(rows_per_overview)
    assert len(list(out_dir.iterdir())) == len(inputs) + len(stages) + len(overviews)
    assert f'visualisation: {len(inputs) + len(stages) + len(overviews)} files written' in out
    assert not (out_dir / main.CHECKPOINT_NAME).exists()

    for name in inputs + stages:
        with Image.open(out_dir / name) as image:
            assert image.mode == 'RGB' and image.size == (VIS_SIZE, VIS_SIZE), name
    with Image.open(out_dir / inputs[0]) as image:
        assert np.asarray(image).std() > 0  # a digit, not a blank
    gap = 4
    for path, rows in zip(overviews, rows_per_overview):
        with Image.open(path) as image:
            assert image.size == ((VIS_STAGES + 1) * (VIS_SIZE + gap) - gap,
                                  rows * (VIS_SIZE + gap) - gap)


# --- speed_test.py -----------------------------------------------------------------------

def run_speed_test(*argv):
    return subprocess.run([sys.executable, str(REPO_ROOT / 'speed_test.py'), *argv],
                          cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=SUBPROCESS_TIMEOUT_S)


def test_speed_test_compares_models():
    specs = ['deit_small_patch16_224', 'deit_small_patch16_shrink_base:base_keep_rate=1.0']
    result = run_speed_test(*specs, '--input-size', '64', '--batch-size', '2',
                            '--iterations', '1', '--repeats', '1', '--warmup', '0')
    assert result.returncode == 0, result.stderr
    assert re.search(r'^inference \(cpu, amp none, batch 2, 1 iterations x 1 rounds, median\):$',
                     result.stdout, re.MULTILINE), result.stdout
    ratios = {}
    for spec in specs:
        lines = re.findall(rf'^  {re.escape(spec)}: (\d+\.\d) images/s \[(\d+\.\d)\]  '
                           rf'ratio (\d+\.\d+)  \d+ page faults per step, \d+% of the CPU '
                           rf'time in the kernel$', result.stdout, re.MULTILINE)
        assert len(lines) == 1, result.stdout
        median, (run,), ratio = float(lines[0][0]), [float(lines[0][1])], float(lines[0][2])
        assert median == run > 0  # one round: the median is that round
        ratios[spec] = ratio
    assert ratios[specs[0]] == 1.0  # ratios are to the first model
    assert ratios[specs[1]] > 0


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='getrusage and madvise: Linux')
def test_speed_test_counts_the_page_faults_of_a_step():
    """A step that maps fresh memory and touches each page costs one page fault per page (the
    kernel zeroes it), as a glibc-mapped activation does; a step that allocates nothing none."""
    import mmap
    pages = 4096

    def touch_fresh_pages():
        with mmap.mmap(-1, pages * mmap.PAGESIZE,  # private, as glibc maps its allocations
                       flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS) as block:
            block.madvise(mmap.MADV_NOHUGEPAGE)  # one fault per 4 KiB page, not per 2 MiB
            for offset in range(0, len(block), mmap.PAGESIZE):
                block[offset] = 1

    timed = [speed_test.TimedStep('fresh', touch_fresh_pages, 1),
             speed_test.TimedStep('idle', lambda: None, 1)]
    costs = {}
    speed_test.time_interleaved(timed, torch.device('cpu'), iterations=3, warmup=1, repeats=2,
                                host_costs=costs)
    assert pages <= costs['fresh']['page_faults_per_step'] < pages + 100
    assert costs['idle']['page_faults_per_step'] < 10
    assert all(0 <= cost['kernel_time_share'] <= 1 for cost in costs.values())


def test_speed_test_malformed_spec_exits_2_with_one_line():
    result = run_speed_test('deit_small_patch16_224:foo', '--input-size', '64')
    assert result.returncode == 2
    assert result.stdout == ''
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith('speed_test.py: error: ') and "'foo'" in lines[0]


@pytest.mark.parametrize('spec, named', [
    ('deit_tiny_patch16_224:foo=1', "unexpected keyword argument 'foo'"),
    ('deit_tiny_patch16_shrink_base:drop_loc=12', "'int' object is not iterable"),
    ('deit_tiny_patch16_shrink_base:base_keep_rate=0.7:base_keep_rate=0.5', 'given twice'),
])
def test_speed_test_a_key_the_model_refuses_is_one_line(spec, named):
    args = speed_test.get_args_parser().parse_args([spec, '--input-size', '32'])
    with pytest.raises(ValueError, match=re.escape(named)) as error:
        speed_test.main(args)
    assert spec in str(error.value)


@pytest.mark.parametrize('flags, message', [
    (['--device', 'foo'], "--device 'foo' is not a device name (cuda, cuda:N, cpu)"),
    (['--json', '/proc/no_such_folder/out.json'], 'is not a writable folder'),
    (['--trace', '/proc/no_such'], '--trace /proc/no_such: cannot make the folder'),
])
def test_speed_test_checks_the_device_and_json_before_measuring(flags, message, monkeypatch):
    monkeypatch.setattr(speed_test, '_build_models', lambda *_: pytest.fail('built models'))
    args = speed_test.get_args_parser().parse_args(['deit_tiny_patch16_224', *flags])
    with pytest.raises(ValueError, match=re.escape(message)):
        speed_test.main(args)


def test_speed_test_times_a_cnn_beside_a_vit(capsys):
    args = speed_test.get_args_parser().parse_args([
        'deit_tiny_patch16_224', 'resnet18', '--input-size', '32', '--batch-size', '2',
        '--iterations', '1', '--warmup', '0', '--repeats', '1'])
    records = speed_test.main(args)
    assert [record['model'] for record in records] == ['deit_tiny_patch16_224', 'resnet18']
    assert all(record['images_per_s'] > 0 for record in records)


def test_speed_test_compile_mode_needs_compile():
    args = speed_test.get_args_parser().parse_args(['deit_tiny_patch16_224', '--compile-mode',
                                                    'reduce-overhead'])
    with pytest.raises(ValueError, match='--compile-mode needs --compile'):
        speed_test.main(args)


@pytest.mark.parametrize('flag, value', [('--iterations', '0'), ('--warmup', '-1'),
                                         ('--repeats', '-2')])
def test_speed_test_refuses_counts_below_their_minimum(flag, value):
    args = speed_test.get_args_parser().parse_args(['deit_tiny_patch16_224', flag, value])
    with pytest.raises(ValueError, match='--iterations must be at least 1, --warmup and '
                                         '--repeats at least 0'):
        speed_test.main(args)


def test_speed_test_profile_lists_the_costliest_ops(tmp_path):
    path, traces = tmp_path / 'speed.json', tmp_path / 'traces'
    result = run_speed_test('deit_small_patch16_shrink_base:base_keep_rate=0.5', '--input-size',
                            '64', '--batch-size', '2', '--iterations', '1', '--repeats', '1',
                            '--warmup', '0', '--profile', '3', '--json', str(path),
                            '--trace', str(traces))
    assert result.returncode == 0, result.stderr
    [record] = json.loads(path.read_text())['records']
    assert 'device_busy_share' not in record  # a GPU's figure
    # The trace of the profiled steps: its ops, as many linear layers as the rows count.
    [trace] = traces.iterdir()
    assert trace.name == ('inference-none-b2-deit_small_patch16_shrink_base_'
                          'base_keep_rate=0.5.json.gz')
    events = json.loads(gzip.decompress(trace.read_bytes()))['traceEvents']
    addmms = sum(event.get('name') == 'aten::addmm' for event in events)
    assert addmms == 49 * speed_test.PROFILED_STEPS
    rows = record['profile']
    assert len(rows) == 3
    assert [row['ms_per_step'] for row in rows] == sorted((row['ms_per_step'] for row in rows),
                                                           reverse=True)
    assert all(row['ms_per_step'] > 0 and row['where'] == 'cpu' for row in rows)
    # On the CPU the rows are aten ops; the linear layers dominate a ViT (49 per step here:
    # 4 per block and the head).
    assert rows[0]['name'] == 'aten::addmm' and rows[0]['calls_per_step'] == 49
    for row in rows:
        assert re.search(rf'^ +cpu +{row["ms_per_step"]:.3f} ms +{row["calls_per_step"]:.1f}x  '
                         rf'{re.escape(row["name"])}$', result.stdout, re.MULTILINE), result.stdout


def test_busy_time_counts_overlapping_intervals_once():
    assert op_costs.busy_time([]) == 0
    # Two overlapping kernels (0-2, 1-3), one inside another (5-6, 5.5-5.7), out of order.
    assert op_costs.busy_time([(5, 6), (1, 3), (0, 2), (5.5, 5.7)]) == 4
    assert op_costs.busy_time([(0, 1), (1, 2)]) == 2  # back to back


def test_kernel_ops_counts_writes_not_views_or_allocations():
    x = torch.randn(4, 6)
    with op_costs.KernelOps() as ops:
        x.view(6, 4).t()[:, :2].unsqueeze(0).expand(3, -1, -1)  # views: free
        torch.empty(3)  # an allocation alone: no kernel
        y = x + 1  # new memory
        y.mul_(2)  # in place
        x.t().contiguous()  # a copy
    assert ops.count == 3
    # Every operation reaches the dispatcher: view, t, slice, unsqueeze, expand, empty, add,
    # mul_, t, clone (contiguous's copy)
    assert ops.dispatched == 10


def test_kernel_ops_bytes_and_flops():
    x = torch.randn(4, 8)
    linear = torch.nn.Linear(8, 16)
    index = torch.tensor([[2], [0]]).expand(2, 16)  # broadcast along its last dimension
    with torch.no_grad(), op_costs.KernelOps() as ops:
        y = linear(x)  # addmm: bias 16, x 4x8, weight 8x16 read; 4x16 written
        z = y + y[:1].expand(4, 16)  # the broadcast row is read once
        z.gather(0, index)  # reads the 2x16 gathered values and the 2 indices only
        z.new_zeros(3, 5)  # writes only: z gives the dtype and device
        z.zero_()  # overwritten, not read
    linear_read = (16 + 32 + 128) * 4
    assert [(cost.name, cost.bytes, cost.flops) for cost in ops.costs] == [
        ('addmm', linear_read + 64 * 4, 2 * 4 * 8 * 16),
        ('add', (64 + 16 + 64) * 4, 0),
        ('gather', (32 + 32) * 4 + 2 * 8, 0),
        ('new_zeros', 15 * 4, 0),
        ('zero_', 64 * 4, 0)]
    gpu = op_costs.RooflineGPU(bandwidth=1e3, matmul_flops=1e6, min_kernel_s=0.5)
    # max(bytes / bandwidth, flops / peak, 0.5 s) per operation
    assert gpu.seconds(ops.costs) == pytest.approx(0.96 + 0.576 + 0.5 + 0.5 + 0.5)
    sdpa = torch.randn(2, 3, 5, 4)
    with op_costs.KernelOps() as ops:
        torch.nn.functional.scaled_dot_product_attention(sdpa, sdpa, sdpa)
    fused = [cost for cost in ops.costs if 'scaled_dot_product' in cost.name]
    assert len(fused) == 1 and fused[0].flops == 4 * sdpa.numel() * 5
    assert fused[0].bytes == 4 * sdpa.numel() * 4  # q, k, v read and the output written
    query = sdpa.clone().requires_grad_()
    with op_costs.KernelOps() as ops:
        attended = torch.nn.functional.scaled_dot_product_attention(query, query, query)
        (attended * sdpa).sum().backward()  # an output gradient without broadcast dimensions
    backward = [cost for cost in ops.costs if cost.name.endswith('attention_for_cpu_backward')]
    # 10 B H N M D FLOPs; reads at least the output gradient, q, k, v and the output, writes
    # three gradients
    assert len(backward) == 1 and backward[0].flops == 10 * sdpa.numel() * 5
    assert backward[0].bytes >= 8 * sdpa.numel() * 4


def test_speed_test_roofline_ratio(tmp_path):
    # A model with twice the blocks moves about twice the bytes: the estimates and their ratio
    # as printed and recorded agree with op_costs called directly, for a forward and for a
    # training step; --repeats 0 times nothing.
    specs = [f'deit_small_patch16_224:depth={depth}:embed_dim=32:num_heads=2' for depth in (4, 2)]
    result = run_speed_test(*specs, '--input-size', '32', '--roofline', '--batch-size', '8',
                            '--mode', 'both', '--repeats', '0', '--json',
                            str(tmp_path / 'roofline.json'))
    assert result.returncode == 0, result.stderr
    records = json.loads((tmp_path / 'roofline.json').read_text())['records']
    assert [(r['model'], r['mode']) for r in records] == [
        (spec, f'roofline-{mode}') for mode in ('inference', 'train') for spec in specs]
    assert 'images_per_s' not in result.stdout and 'img/s' not in result.stdout
    for mode in ('inference', 'train'):
        printed = re.findall(rf'^(\S+): roofline ([\d.]+) ms per {mode} step on an H100 \(batch 8, '
                             r'amp none; (\d+) operations, [\d.]+ GB, [\d.]+ TFLOP\), speed '
                             r"([\d.]+)x the first model's$", result.stdout, re.MULTILINE)
        assert [row[0] for row in printed] == specs, result.stdout
        direct = []
        for spec, milliseconds, operations, _ in printed:
            name, kwargs = speed_test.parse_model_spec(spec)
            torch.manual_seed(0)
            model = timm.create_model(name, img_size=32, **kwargs).eval()
            costs = op_costs.step_costs(model, 32, torch.device('cpu'), batch_size=8,
                                        train=mode == 'train')
            direct.append(op_costs.H100.seconds(costs))
            assert int(operations) == len(costs)
            assert float(milliseconds) == pytest.approx(direct[-1] * 1e3, abs=5e-4)
            # Left as it was: eval mode, no gradients.
            assert not model.training
            assert all(parameter.grad is None for parameter in model.parameters())
            if mode == 'train':
                # A training step runs its forward's operations and about twice as many more.
                forward = op_costs.step_costs(model, 32, torch.device('cpu'), batch_size=8)
                assert 2.5 * len(forward) < len(costs) < 4 * len(forward)
        ratio = float(printed[1][3])
        assert ratio == pytest.approx(direct[0] / direct[1], abs=5e-3)
        assert 1.6 < ratio < 2.1
        recorded = [r for r in records if r['mode'] == f'roofline-{mode}']
        assert [r['estimated_ms'] for r in recorded] == pytest.approx([d * 1e3 for d in direct])


def test_step_costs_count_the_cuda_forms_on_the_cpu():
    # What a GPU runs: the mergence's element-wise gather and scatter, not the CPU's row
    # indexing, which a plain forward on the CPU does run.
    torch.manual_seed(0)
    model = models_mtvit.MTViT(img_size=64, patch_size=16, embed_dim=32, depth=5, num_heads=2,
                               drop_loc=(3, 4), base_keep_rate=0.5, multi_scale=True)
    names = {op.name for op in op_costs.step_costs(model, 64, torch.device('cpu'), batch_size=2,
                                                   train=True)}
    assert {'gather', 'scatter_add_'} <= names and not names & {'index_select', 'index_add_'}
    with op_costs.KernelOps() as cpu:
        model(torch.randn(2, 3, 64, 64))
    assert {'index_select', 'index_add_'} <= {op.name for op in cpu.costs}


def test_speed_test_counts_operations_per_block(tmp_path):
    # Each of DeiT's blocks runs the same operations: depth 3 adds to depth 2 what 2 adds to 1,
    # in a forward and in a training step, whose backward adds kernels of its own.
    json_path = tmp_path / 'counts.json'
    result = run_speed_test(*(f'deit_small_patch16_224:depth={depth}' for depth in (1, 2, 3)),
                            '--input-size', '32', '--count-ops', '--mode', 'both',
                            '--repeats', '0', '--json', str(json_path))
    assert result.returncode == 0, result.stderr
    per_block = {}
    for step, batch in (('forward', 1), ('training step', 2)):
        counts = [(int(kernels), int(dispatched)) for kernels, dispatched in re.findall(
            rf'^deit_small_patch16_224:depth=\d: (\d+) kernel-running operations per {step} '
            rf'\(batch {batch}, amp none\); (\d+) dispatched$', result.stdout, re.MULTILINE)]
        assert len(counts) == 3, result.stdout
        for column in range(2):
            first, second, third = (count[column] for count in counts)
            assert third - second == second - first > 5
        assert all(dispatched > kernels for kernels, dispatched in counts)
        per_block[step] = counts[1][0] - counts[0][0]
    assert per_block['training step'] > 2 * per_block['forward']
    records = json.loads(json_path.read_text())['records']
    assert [(record['mode'], record['batch_size']) for record in records] == (
        [('ops-inference', 1)] * 3 + [('ops-train', 2)] * 3)
    assert records[4]['kernel_operations'] - records[3]['kernel_operations'] == per_block[
        'training step']


@pytest.mark.skipif(torch.cuda.is_available(), reason='checks the refusal where no GPU is')
def test_gpu_checks_script_refuses_a_machine_without_cuda(tmp_path):
    # .ci/gpu is run only on GPU machines: here, that it parses, asks for a part, refuses an
    # unknown one, and stops before any step where there is no CUDA device.
    script = str(REPO_ROOT / '.ci' / 'gpu')
    assert subprocess.run(['bash', '-n', script]).returncode == 0
    usage = subprocess.run(['bash', script], capture_output=True, text=True)
    assert usage.returncode != 0 and 'usage: .ci/gpu eager|' in usage.stderr
    out = tmp_path / 'results'
    refused = subprocess.run(['bash', script, 'eager', str(out)], capture_output=True, text=True)
    assert refused.returncode == 1 and 'no CUDA device here' in refused.stderr
    unknown = subprocess.run(['bash', script, 'eagre', str(out)], capture_output=True, text=True)
    assert unknown.returncode == 2 and "unknown part 'eagre'" in unknown.stderr
    assert list(out.iterdir()) == []


def test_speed_test_json_is_replaced_whole(monkeypatch, tmp_path):
    # A suite writes its JSON after each part: a run stopped while writing keeps the last one.
    path = tmp_path / 'suite.json'
    speed_test._write_json(str(path), torch.device('cpu'), [{'model': 'first part'}])
    written = path.read_text()
    monkeypatch.setattr(speed_test, 'environment', lambda device: {'unwritable': object()})
    with pytest.raises(TypeError):
        speed_test._write_json(str(path), torch.device('cpu'), [{'model': 'second part'}])
    assert path.read_text() == written
    assert json.loads(written)['records'] == [{'model': 'first part'}]
    assert [entry.name for entry in tmp_path.iterdir()] == ['suite.json']


def test_speed_test_suite_runs_its_table(monkeypatch, tmp_path):
    # The README's GPU table, shrunk to tiny models on the CPU: compile times (each in a fresh
    # process), then every row of the table, eager, compiled and with CUDA graphs (on the CPU
    # reduce-overhead compiles without them), all recorded in the JSON.
    tiny = 'deit_tiny_patch16_shrink_base:depth=4:embed_dim=32:num_heads=2:drop_loc=[3]'
    specs = ('deit_tiny_patch16_224:depth=4:embed_dim=32:num_heads=2',
             f'{tiny}:multi_scale=true:base_keep_rate=0.5', f'{tiny}:base_keep_rate=0.5',
             f'{tiny}:base_keep_rate=1.0')
    monkeypatch.setattr(speed_test, 'SUITE_MODELS', specs)
    monkeypatch.setattr(speed_test, 'COMPILE_TIME_MODELS', specs[:2])
    monkeypatch.setattr(speed_test, 'GPU_SUITE', (
        ('eager', 'inference', 'fp16', (1, 2)), ('eager', 'train', 'bf16', (2,)),
        ('compiled-inference', 'inference', 'fp16', (2,)),
        ('cuda-graphs', 'inference', 'fp16', (2,))))
    path = tmp_path / 'suite.json'
    records = speed_test.main(speed_test.get_args_parser().parse_args([
        '--suite', 'gpu', '--device', 'cpu', '--input-size', '32', '--iterations', '1',
        '--warmup', '0', '--repeats', '1', '--json', str(path)]))
    assert json.loads(path.read_text())['records'] == json.loads(json.dumps(records))
    compile_rows = [r for r in records if r['mode'] == 'compile']
    assert [r['model'] for r in compile_rows] == list(specs[:2])
    assert all(r['compile_s'] > 0 for r in compile_rows)
    for row in compile_rows:  # where each compilation's time went, from its own process
        phases = row['compile_phases']
        assert 0 < phases['bytecode_tracing'] < phases['_compile.compile_inner'] <= row['compile_s']
        assert row['generated_kernels'] > 0
    rows = {}
    for record in records[len(compile_rows):]:
        key = (record['mode'], record['amp'], record['batch_size'], record['compile_mode'])
        rows.setdefault(key, []).append(record['model'])
    assert rows == {('inference', 'fp16', 1, None): list(specs),
                    ('inference', 'fp16', 2, None): list(specs),
                    ('train', 'bf16', 2, None): list(specs),
                    ('inference', 'fp16', 2, 'default'): list(specs[:3]),
                    ('inference', 'fp16', 2, 'reduce-overhead'): list(specs[:3])}
    for record in records[len(compile_rows):]:
        assert record['images_per_s'] > 0
        assert ('latency_ms' in record) == (record['batch_size'] == 1)
        assert ('first_step_s' in record) == record['compiled']
        assert record['compiled'] == (record['compile_mode'] is not None)


def test_speed_test_suites_split_the_table():
    # Every part of the table is in the whole suite, and the parts split it.
    parts = {part for part, *_ in speed_test.GPU_SUITE} | {'compile-time'}
    assert set(speed_test.SUITES['gpu']) == parts
    assert set(speed_test.SUITES['gpu-eager']) | set(speed_test.SUITES['gpu-compiled']) == parts
    assert set(speed_test.SUITES['gpu-compiled-inference']) | set(
        speed_test.SUITES['gpu-compiled-train']) | set(
        speed_test.SUITES['gpu-cuda-graphs']) == set(speed_test.SUITES['gpu-compiled'])
