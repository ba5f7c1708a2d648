"""export.py: trained checkpoints to ONNX, checked with onnxruntime against PyTorch.

* A tiny multi-scale MTViT checkpoint (shape taken from the checkpoint alone) and a tiny
  distilled timm DeiT with mergence export with a dynamic batch; onnxruntime's logits are
  within 1e-4 of PyTorch's at batch 1 and 7 (checked again here, independently of export.py's
  own report), the graph holds the mergence (TopK, ScatterElements), and the 359 DIGITS
  validation images get the same classes.
* A bad checkpoint, an unsupported or unknown model, a missing output folder and an ONNX file
  that does not match the model end in one line ``export.py: error: ...`` and a non-zero exit.
"""
import errno
import os
import shutil
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import timm  # noqa: E402
from timm.models import register_model  # noqa: E402
from timm.models.deit import VisionTransformerDistilled  # noqa: E402

import export  # noqa: E402
import models_mtvit  # noqa: E402

MTVIT = 'deit_tiny_patch16_shrink_base'
TINY_MTVIT_PRESET = dict(patch_size=8, embed_dim=32, depth=5, num_heads=2)
TINY_VIT = dict(patch_size=8, embed_dim=32, depth=4, num_heads=2)
TINY_TIMM = 'export_test_tiny_deit_distilled'
INPUT_SIZE = 32
NUM_CLASSES = 10
ATOL = 1e-4


@register_model
def export_test_tiny_deit_distilled(pretrained: bool = False, **kwargs):
    """A tiny distilled DeiT (two prefix tokens) that main.create_model can build by name."""
    for key in ('pretrained_cfg', 'pretrained_cfg_overlay', 'cache_dir'):
        kwargs.pop(key, None)
    return VisionTransformerDistilled(**{**TINY_VIT, **kwargs})


def _spread_logits(model, seed):
    """Random weights with well separated class scores, so that a flipped class means a real
    difference and not a tie."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 1:
                param.add_(0.1 * torch.randn(param.shape, generator=gen))
        model.head.weight.mul_(20)
    return model.eval()


def _save(tmp_path, name, model, saved_args):
    path = str(tmp_path / name)
    torch.save({'model': model.state_dict(), 'args': saved_args}, path)
    return path


def _run(argv, capsys):
    status = export.cli(argv)
    out, err = capsys.readouterr()
    return status, out, err


def _check_onnx_file(path, model, keep_rate):
    """Independent check of an exported file: dynamic batch, mergence ops in the graph, logits
    of batches 1 and 7 (random and blank images) within ATOL of PyTorch's at ``keep_rate``."""
    import onnx
    import onnxruntime
    graph = onnx.load(path).graph
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param  # symbolic: dynamic batch
    ops = {node.op_type for node in graph.node}
    assert {'TopK', 'ScatterElements'} <= ops
    session = onnxruntime.InferenceSession(path, providers=['CPUExecutionProvider'])
    gen = torch.Generator().manual_seed(11)
    for images in (torch.randn(1, 3, INPUT_SIZE, INPUT_SIZE, generator=gen),
                   torch.randn(7, 3, INPUT_SIZE, INPUT_SIZE, generator=gen),
                   torch.zeros(3, 3, INPUT_SIZE, INPUT_SIZE)):
        with torch.no_grad():
            expected = model(images, keep_rate=keep_rate)
            unreduced = model(images, keep_rate=1.0)
        got = torch.from_numpy(session.run(None, {'images': images.numpy()})[0])
        assert got.shape == expected.shape == (len(images), NUM_CLASSES)
        assert (got - expected).abs().max().item() < ATOL
        if images.abs().sum() > 0:  # the mergence changes the logits: the check can fail
            assert (got - unreduced).abs().max().item() > 100 * ATOL


@pytest.fixture(scope='module')
def mtvit_checkpoint(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(models_mtvit.MTVIT_PRESETS, MTVIT, TINY_MTVIT_PRESET)
        torch.manual_seed(0)
        model = timm.create_model(MTVIT, img_size=INPUT_SIZE, num_classes=NUM_CLASSES,
                                  multi_scale=True, drop_loc=(3, 4), base_keep_rate=0.5)
        tmp_path = tmp_path_factory.mktemp('mtvit')
        saved = dict(model=MTVIT, input_size=INPUT_SIZE, multi_scale=True, base_keep_rate=0.5,
                     drop_loc=(3, 4), data_set='DIGITS')
        yield _save(tmp_path, 'checkpoint.pth', _spread_logits(model, 1), saved), model, tmp_path


@pytest.fixture(scope='module')
def timm_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    plain = timm.create_model(TINY_TIMM, img_size=INPUT_SIZE, num_classes=NUM_CLASSES)
    model = models_mtvit.apply_mergence(_spread_logits(plain, 2), keep_rate=0.5, drop_loc=(1, 2))
    tmp_path = tmp_path_factory.mktemp('timm')
    saved = dict(model=TINY_TIMM, input_size=INPUT_SIZE, merge_any=True, base_keep_rate=0.5,
                 drop_loc=(1, 2))
    return _save(tmp_path, 'checkpoint.pth', model, saved), model, tmp_path


@pytest.fixture(scope='module')
def timm_onnx(timm_checkpoint):
    path, _, tmp_path = timm_checkpoint
    output = str(tmp_path / 'model.onnx')
    status = export.cli(['--resume', path, '--output', output, '--no-speed'])
    assert status == 0
    return output


def test_multi_scale_mtvit_exports_and_agrees_on_digits(mtvit_checkpoint, capsys):
    path, model, tmp_path = mtvit_checkpoint
    output = str(tmp_path / 'model.onnx')
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(models_mtvit.MTVIT_PRESETS, MTVIT, TINY_MTVIT_PRESET)
        status, out, err = _run(['--resume', path, '--output', output, '--data-set', 'DIGITS',
                                 '--batch-size', '128', '--speed-batch-size', '4',
                                 '--speed-iterations', '1'], capsys)
    assert status == 0, err
    assert 'multi_scale=True keep rate 0.5 at blocks (3, 4), input 32' in out
    assert 'DIGITS validation: 359 images, same class for 359;' in out
    assert 'images/s' in out and 'onnxruntime' in out
    _check_onnx_file(output, model, keep_rate=0.5)


def test_timm_vit_with_mergence_exports(timm_checkpoint, timm_onnx):
    _, model, _ = timm_checkpoint
    assert model.num_prefix_tokens == 2
    _check_onnx_file(timm_onnx, model, keep_rate=0.5)


def test_onnx_file_of_another_setting_fails_the_check(timm_checkpoint, timm_onnx, capsys,
                                                      monkeypatch):
    path, _, tmp_path = timm_checkpoint
    # The keep-0.5 graph checked against the model at keep 1: logits differ.
    monkeypatch.setattr(export, 'export_onnx', lambda model, out, size: shutil.copy(timm_onnx, out))
    status, out, err = _run(['--resume', path, '--output', str(tmp_path / 'other.onnx'),
                             '--base_keep_rate', '1', '--no-speed'], capsys)
    assert status == 1
    assert err.count('\n') == 1 and err.startswith('export.py: error: onnxruntime disagrees')
    assert 'keep rate 1.0' in out


@pytest.mark.parametrize('case,message', [
    ('garbage', 'is not a readable PyTorch checkpoint'),
    ('unsupported', 'ResNet is not a timm VisionTransformer'),
    ('not_a_vit', 'Eva is not a timm VisionTransformer'),
    ('unknown', "unknown --model 'no_such_model'"),
    ('no_folder', 'does not exist'),
    ('other_model', 'does not fit --model'),
    ('keep_rate', 'keep rate 1.5 must be in (0, 1]'),
])
def test_bad_input_one_line(case, message, tmp_path, timm_checkpoint, capsys):
    path = timm_checkpoint[0]
    output = str(tmp_path / 'model.onnx')
    extra = []
    if case == 'garbage':
        path = str(tmp_path / 'garbage.pth')
        with open(path, 'wb') as handle:
            handle.write(b'not a checkpoint at all')
    elif case == 'unsupported':
        extra = ['--model', 'resnet18']
    elif case == 'not_a_vit':
        extra = ['--model', 'eva02_tiny_patch14_224']
    elif case == 'unknown':
        extra = ['--model', 'no_such_model']
    elif case == 'no_folder':
        output = str(tmp_path / 'missing' / 'model.onnx')
    elif case == 'other_model':
        extra = ['--model', 'deit_tiny_patch16_224']
    elif case == 'keep_rate':
        extra = ['--base_keep_rate', '1.5']
    status, _, err = _run(['--resume', path, '--output', output, *extra], capsys)
    assert status == 2
    assert err.count('\n') == 1 and err.startswith('export.py: error: ') and message in err
    assert not os.path.exists(output)


def test_a_failed_save_leaves_the_earlier_file_whole(timm_checkpoint, timm_onnx, capsys,
                                                      monkeypatch):
    path, _, tmp_path = timm_checkpoint
    output = tmp_path / 'kept.onnx'
    shutil.copy(timm_onnx, output)
    before = output.read_bytes()

    def disk_full(self, destination, **_):
        with open(destination, 'wb') as handle:
            handle.write(b'half an ONNX file')
        raise OSError(errno.ENOSPC, 'No space left on device')

    monkeypatch.setattr(torch.onnx.ONNXProgram, 'save', disk_full)
    status, _, err = _run(['--resume', path, '--output', str(output), '--no-speed'], capsys)
    assert status == 1
    assert err == (f'export.py: error: No space left on device; {output} is as it was '
                   f'({output})\n')
    assert output.read_bytes() == before
    assert not [name for name in os.listdir(tmp_path) if name.endswith('.tmp')]


@pytest.mark.parametrize('flags, named', [
    (['--check-batch-sizes', '0'], '--check-batch-sizes'), (['--speed-iterations', '0'],
                                                           '--speed-iterations'),
    (['--speed-batch-size', '0'], '--speed-batch-size'), (['--batch-size', '0'], '--batch-size'),
])
def test_counts_below_one_are_refused_before_the_export(flags, named, tmp_path, timm_checkpoint,
                                                        capsys):
    output = tmp_path / 'model.onnx'
    with pytest.raises(SystemExit) as stop:
        export.cli(['--resume', timm_checkpoint[0], '--output', str(output), *flags])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f'export.py: error: argument {named}: 0 is not a positive integer')
    assert not output.exists()


def test_a_bad_data_path_is_refused_before_the_export(tmp_path, timm_checkpoint, capsys):
    output = tmp_path / 'model.onnx'
    status, _, err = _run(['--resume', timm_checkpoint[0], '--output', str(output), '--data-set',
                           'IMNET', '--data-path', str(tmp_path / 'missing')], capsys)
    assert status == 2 and 'does not exist' in err and err.count('\n') == 1
    assert not output.exists()


def test_weights_saved_beside_the_model_keep_their_name(timm_checkpoint, monkeypatch, capsys):
    # Over 2 GB the exporter writes the weights to '<name>.data', which the model names: they
    # must land beside it under that name, not the staging folder's.
    path, model, tmp_path = timm_checkpoint
    output = tmp_path / 'external' / 'model.onnx'
    output.parent.mkdir()
    save = torch.onnx.ONNXProgram.save
    monkeypatch.setattr(torch.onnx.ONNXProgram, 'save',
                        lambda self, destination, **_: save(self, destination, external_data=True))
    status, _, err = _run(['--resume', path, '--output', str(output), '--no-speed'], capsys)
    assert status == 0, err
    assert sorted(os.listdir(output.parent)) == ['model.onnx', 'model.onnx.data']
    _check_onnx_file(str(output), model, keep_rate=0.5)


def test_the_checkpoint_is_never_the_output(timm_checkpoint, tmp_path, capsys):
    path = timm_checkpoint[0]
    before = open(path, 'rb').read()
    link = tmp_path / 'same.pth'
    link.symlink_to(path)  # the same file under another name
    status, _, err = _run(['--resume', path, '--output', str(link), '--no-speed'], capsys)
    assert status == 2
    assert err == (f'export.py: error: --output {link} is the --resume checkpoint: the export '
                   f'would replace it\n')
    assert open(path, 'rb').read() == before
