"""The training set-up, checked value by value: the learning rate after DeiT's scaling, the
per-epoch warm-up/cosine/cool-down values, the sampler each configuration gets, the EMA against
its closed form, gradient clipping, the criterion each Mixup/CutMix/smoothing/distillation
setting picks (through main.py, against a hand computation), and a finetuning run resumed with
``--finetune`` and ``--resume`` together.

Most tests run main.py's wiring with ``training.fit`` replaced by a recorder, so that they see
what main.py built from the flags without training.
"""
import json
import math
import os
import signal

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from multiproc import TINY_RUN, assert_same_weights, tree_args, write_tree

import engine  # noqa: E402
import losses  # noqa: E402
import main  # noqa: E402
import models_mtvit  # noqa: E402,F401  (registers the models with timm)
import samplers  # noqa: E402
import training  # noqa: E402
from utils import DistState  # noqa: E402

LR, BATCH = 4e-4, 16


@pytest.fixture(scope='module')
def tree(tmp_path_factory):
    """80 training images, 20 validation images."""
    return write_tree(tmp_path_factory.mktemp('tree'), 8, 2)


@pytest.fixture(autouse=True)
def single_process(monkeypatch):
    for name in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK'):
        monkeypatch.delenv(name, raising=False)


def parse(*flags):
    return main.get_args_parser().parse_args([str(flag) for flag in flags])


def wiring(monkeypatch, tree, *flags, world_size=1):
    """What main.train hands to ``fit`` for these flags, for a process of ``world_size``."""
    recorded = {}

    def recording_fit(model, state, loop, **kwargs):
        recorded.update(model=model, state=state, loop=loop, **kwargs)
        return {}

    monkeypatch.setattr(main, 'fit', recording_fit)
    args = parse(*tree_args(tree), *TINY_RUN, '--lr', LR, *flags)
    main.reconcile_with_checkpoint(args, None, '')
    dist_state = DistState(distributed=False, rank=0, world_size=world_size, local_rank=0,
                           device=torch.device('cpu'), backend=None)
    train_loader, val_loader, num_classes = main.build_loaders(args, dist_state, True)
    model = main.create_model(args, num_classes)
    main.train(args, dist_state, model, train_loader, val_loader, num_classes, None,
               amp_dtype=None)
    return recorded


# ---------------------------------------------------------------------------------------------
# Learning rate
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize('world_size', [1, 2])
def test_lr_is_scaled_by_the_global_batch(monkeypatch, tree, world_size):
    recorded = wiring(monkeypatch, tree, '--warmup-epochs', '0', world_size=world_size)
    expected = LR * BATCH * world_size / 512
    assert training.scaled_lr(LR, BATCH, world_size) == pytest.approx(expected)
    for group in recorded['state'].optimizer.param_groups:
        assert group['initial_lr'] == pytest.approx(expected)
        assert group['lr'] == pytest.approx(expected)  # no warm-up: epoch 0 at the full rate


def timm_lr(t, *, base, warmup_lr, warmup, epochs, min_lr):
    """timm's cosine schedule with a linear warm-up (not a prefix), at epoch value ``t``."""
    if t < warmup:
        return warmup_lr + t * (base - warmup_lr) / warmup
    if t >= epochs:  # the cool-down: the cycle is over
        return min_lr
    return min_lr + 0.5 * (base - min_lr) * (1 + math.cos(math.pi * t / epochs))


def test_lr_schedule_warmup_cosine_cooldown_values():
    settings = dict(base=1e-3, warmup_lr=1e-6, warmup=3, epochs=10, min_lr=1e-5)
    optimizer = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=settings['base'])
    scheduler = training.build_scheduler(
        optimizer, sched='cosine', epochs=10, warmup_epochs=3, warmup_lr=1e-6, min_lr=1e-5,
        cooldown_epochs=2)
    for epoch in (0, 1, 2, 3, 6, 9, 10, 11):
        scheduler.step(epoch)
        assert optimizer.param_groups[0]['lr'] == pytest.approx(timm_lr(epoch, **settings),
                                                                 rel=1e-9), epoch


def test_train_lr_of_each_epoch_in_the_log(tree, tmp_path):
    """DeiT steps the schedule with the epoch just finished: epoch e trains at the value of e - 1
    (epoch 0 at the warm-up start)."""
    out = tmp_path / 'run'
    assert main.cli([*tree_args(tree), *TINY_RUN, '--lr', str(LR), '--epochs', '3',
                     '--warmup-epochs', '2', '--warmup-lr', '1e-6', '--min-lr', '1e-5',
                     '--output_dir', str(out)]) == 0
    logged = [json.loads(line)['train_lr'] for line in (out / 'log.txt').read_text().splitlines()]
    settings = dict(base=LR * BATCH / 512, warmup_lr=1e-6, warmup=2, epochs=3, min_lr=1e-5)
    expected = [settings['warmup_lr']] + [timm_lr(epoch - 1, **settings) for epoch in (1, 2)]
    assert logged == pytest.approx(expected, rel=1e-6)


# ---------------------------------------------------------------------------------------------
# Sampler, EMA, gradient clipping
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize('world_size, repeated, kind, length', [
    (1, True, samplers.RASampler, 80), (1, False, torch.utils.data.DistributedSampler, 80),
    (2, True, samplers.RASampler, 40), (2, False, torch.utils.data.DistributedSampler, 40)])
def test_sampler_of_each_configuration(monkeypatch, tree, world_size, repeated, kind, length):
    flags = [] if repeated else ['--no-repeated-aug']
    loader = wiring(monkeypatch, tree, *flags, world_size=world_size)['train_loader']
    assert isinstance(loader.sampler, samplers.SeededSampler)
    assert type(loader.sampler.sampler) is kind
    assert len(loader.sampler) == length
    if repeated:  # each image three times in a row, dealt out to the processes in turn
        indices = list(loader.sampler.sampler)
        copies_here = 3 // world_size
        assert indices[:copies_here] == [indices[0]] * copies_here
        assert len(set(indices)) < len(indices)


def test_ema_after_k_steps_equals_the_closed_form(monkeypatch, tree):
    assert wiring(monkeypatch, tree, '--model-ema', '--model-ema-decay', '0.75')[
        'state'].model_ema.decay == 0.75
    model = nn.Linear(3, 2)
    start = {name: value.clone() for name, value in model.state_dict().items()}
    ema = training.build_ema(model, decay=0.75)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(1.5)
    steps = 4
    for _ in range(steps):
        ema.update(model)
    for name, value in model.state_dict().items():
        # ema_k = w + decay^k (w_0 - w) when the weights stay at w after the start.
        expected = value + 0.75 ** steps * (start[name] - value)
        torch.testing.assert_close(ema.module.state_dict()[name], expected, rtol=1e-6, atol=1e-6)


class Classifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 3)

    def forward(self, x):
        return self.linear(x)


@pytest.mark.parametrize('clip_grad', [None, 0.01])
def test_clip_grad_bounds_the_gradient_norm(clip_grad):
    torch.manual_seed(0)
    model = Classifier()
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    # Plain SGD with lr 1: the update is the (clipped) gradient itself.
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    batch = (10 * torch.randn(8, 4), torch.randint(0, 3, (8,)))
    criterion = losses.DistillationLoss(nn.CrossEntropyLoss(), None, 'none', 0.5, 1.0)
    engine.train_one_epoch(model, criterion, [batch], optimizer, torch.device('cpu'), 0,
                           torch.amp.GradScaler('cpu', enabled=False), clip_grad=clip_grad)
    step = torch.cat([p.detach().flatten() for p in model.parameters()]) - before
    if clip_grad is None:
        assert step.norm() > 0.1
    else:
        assert step.norm() == pytest.approx(clip_grad, rel=1e-4)


def test_clip_grad_reaches_the_loop(monkeypatch, tree):
    assert wiring(monkeypatch, tree, '--clip-grad', '0.5')['loop'].clip_grad == 0.5
    assert wiring(monkeypatch, tree)['loop'].clip_grad is None


# ---------------------------------------------------------------------------------------------
# Criterion
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize('flags, mixer, base', [
    (['--mixup', '0.8', '--cutmix', '1.0'], True, 'SoftTargetCrossEntropy'),
    (['--mixup', '0', '--cutmix', '1.0'], True, 'SoftTargetCrossEntropy'),
    (['--mixup', '0', '--cutmix', '0', '--cutmix-minmax', '0.2', '0.8'], True,
     'SoftTargetCrossEntropy'),
    (['--mixup', '0', '--cutmix', '0', '--smoothing', '0.1'], False, 'LabelSmoothingCrossEntropy'),
    (['--mixup', '0', '--cutmix', '0', '--smoothing', '0'], False, 'CrossEntropyLoss')])
def test_mixup_cutmix_smoothing_pick_the_criterion(monkeypatch, tree, flags, mixer, base):
    recorded = wiring(monkeypatch, tree, *flags)
    assert (recorded['mixup_fn'] is not None) == mixer
    assert type(recorded['criterion'].base_criterion).__name__ == base
    if base == 'LabelSmoothingCrossEntropy':
        assert recorded['criterion'].base_criterion.smoothing == 0.1
    if mixer:  # Mixup carries the label smoothing then (DeiT's default 0.1)
        assert recorded['mixup_fn'].label_smoothing == 0.1


@pytest.fixture(scope='module')
def teacher_path(tmp_path_factory):
    import timm
    torch.manual_seed(1)
    teacher = timm.create_model('resnet10t', num_classes=10, global_pool='avg')
    path = tmp_path_factory.mktemp('teacher') / 'teacher.pth'
    torch.save({'model': teacher.state_dict()}, path)
    return path, teacher.eval()


@pytest.mark.parametrize('kind', ['soft', 'hard'])
def test_distillation_through_main_matches_a_hand_computation(monkeypatch, tree, teacher_path,
                                                              kind):
    path, teacher = teacher_path
    recorded = wiring(monkeypatch, tree, '--mixup', '0', '--cutmix', '0', '--smoothing', '0',
                      '--distillation-type', kind, '--teacher-model', 'resnet10t',
                      '--teacher-path', path, '--distillation-alpha', '0.3',
                      '--distillation-tau', '2.0')
    criterion = recorded['criterion']
    torch.manual_seed(2)
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 3, 5, 9])
    outputs = torch.randn(4, 10)
    with torch.no_grad():
        teacher_logits = teacher(images)
    base = F.cross_entropy(outputs, labels)
    if kind == 'soft':
        student = F.log_softmax(outputs / 2.0, dim=1)
        target = F.softmax(teacher_logits / 2.0, dim=1)
        distill = (target * (target.log() - student)).sum() * 4.0 / outputs.numel()
    else:
        distill = F.cross_entropy(outputs, teacher_logits.argmax(dim=1))
    expected = 0.7 * base + 0.3 * distill
    torch.testing.assert_close(criterion(images, outputs, labels), expected, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# A finetuning run, stopped and resumed
# ---------------------------------------------------------------------------------------------

def test_finetune_resumed_stays_in_eval_mode_and_continues_exactly(tree, tmp_path, monkeypatch,
                                                                   capsys):
    import timm
    torch.manual_seed(3)
    source = tmp_path / 'source.pth'
    torch.save({'model': timm.create_model('deit_tiny_patch16_shrink_base', img_size=32,
                                           num_classes=10).state_dict()}, source)
    args = [*tree_args(tree), *TINY_RUN, '--epochs', '2', '--finetune', str(source)]
    modes = []
    real_fit = main.fit

    def recording_fit(model, state, loop, **kwargs):
        modes.append(loop.set_training_mode)
        return real_fit(model, state, loop, **kwargs)

    monkeypatch.setattr(main, 'fit', recording_fit)
    full, stopped = tmp_path / 'full', tmp_path / 'stopped'
    assert main.cli([*args, '--output_dir', str(full)]) == 0

    calls = []
    forward = losses.DistillationLoss.forward

    def signalling_forward(self, *inputs):
        calls.append(None)
        if len(calls) == 7:  # epoch 1 (5 steps an epoch), its step 1
            os.kill(os.getpid(), signal.SIGTERM)
        return forward(self, *inputs)

    monkeypatch.setattr(losses.DistillationLoss, 'forward', signalling_forward)
    assert main.cli([*args, '--output_dir', str(stopped)]) == 128 + signal.SIGTERM
    monkeypatch.setattr(losses.DistillationLoss, 'forward', forward)
    checkpoint = stopped / 'checkpoint.pth'
    assert main.cli([*args, '--output_dir', str(stopped), '--resume', str(checkpoint)]) == 0
    out = capsys.readouterr().out
    assert f'--finetune {source} is not loaded' in out
    assert 'resumed' in out and 'at epoch 1 iteration 2' in out
    assert modes == [False, False, False]  # finetuning trains in eval mode, resumed or not
    continued = torch.load(checkpoint, weights_only=True)
    reference = torch.load(full / 'checkpoint.pth', weights_only=True)
    assert continued['epoch'] == reference['epoch'] == 1
    assert_same_weights(continued['model'], reference['model'])


def test_optimizer_state_of_another_parameter_order_is_refused(tmp_path):
    from checkpoints import CheckpointError
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    saved = optimizer.state_dict()
    # The same number of parameters, in another order: torch would load it without a word.
    saved['state'] = {key: saved['state'][key] for key in (2, 3, 0, 1)}
    saved['state'] = dict(zip(range(4), saved['state'].values()))
    state = training.TrainingState(model=model, optimizer=torch.optim.AdamW(model.parameters()),
                                   lr_scheduler=None, loss_scaler=None)
    with pytest.raises(CheckpointError, match=r"x.pth: optimizer state 'exp_avg' of parameter 0 "
                                              r'has shape \(2, 3\), the parameter \(3, 4\)'):
        state.restore({'optimizer': saved, 'epoch': 0}, rank=0, world_size=1, batch_size=8,
                      path='x.pth')


@pytest.mark.parametrize('opt,fused', [('adamw', True), ('sgd', True), ('nesterov', True),
                                       ('lamb', None), ('adagrad', None)])
def test_fused_optimizers_take_the_loss_scalers_overflow_check_on_the_device(opt, fused,
                                                                             monkeypatch):
    # main.py asks for fused optimizers on CUDA: for FUSED_OPTIMIZERS, GradScaler hands the
    # overflow check over as a tensor; otherwise GradScaler.step reads it on the host (.item()),
    # with fp16 autocast a wait for the GPU at every step.
    model = nn.Linear(4, 3)
    optimizer = training.build_optimizer(model, opt=opt, lr=0.1, weight_decay=0.05,
                                         momentum=0.9, eps=1e-8, fused=True)
    assert optimizer.defaults.get('fused') is fused
    scaler = torch.amp.GradScaler('cpu', init_scale=2. ** 4)
    before = model.weight.detach().clone()
    scaler.scale(model(torch.randn(2, 4)).square().sum()).backward()
    reads = []
    item = torch.Tensor.item
    monkeypatch.setattr(torch.Tensor, 'item', lambda self: reads.append(1) or item(self))
    scaler.step(optimizer)
    scaler.update()
    monkeypatch.undo()
    assert (len(reads) == 0) == bool(fused), reads
    assert not torch.equal(model.weight, before)  # it stepped


class LoadedScheduler:
    """A scheduler that only records the state it is given."""

    def load_state_dict(self, state_dict):
        self.state = state_dict


def test_restore_keeps_this_runs_optimizer_implementation(monkeypatch):
    # A checkpoint's groups carry its run's choice (here foreach); a run on CUDA that resumes
    # it keeps its fused optimizer, and torch must see that choice while it loads the state:
    # it puts a fused Adam's step counts on the parameters' device, others' on the CPU.
    model = nn.Linear(4, 3)
    settings = dict(opt='adamw', lr=0.1, weight_decay=0.05, momentum=0.9, eps=1e-8)
    saved = training.build_optimizer(model, **settings)
    for group in saved.param_groups:
        group['foreach'] = True
    model(torch.randn(2, 4)).sum().backward()
    saved.step()
    fused = training.build_optimizer(model, **settings, fused=True)
    seen_while_loading = []
    load = fused.load_state_dict
    monkeypatch.setattr(fused, 'load_state_dict', lambda state_dict: (
        seen_while_loading.extend((g['fused'], g['foreach']) for g in state_dict['param_groups']),
        load(state_dict))[1])
    state = training.TrainingState(model=model, optimizer=fused, lr_scheduler=LoadedScheduler(),
                                   loss_scaler=None)
    state.restore({'optimizer': saved.state_dict(), 'lr_scheduler': {}, 'epoch': 0}, rank=0,
                  world_size=1, batch_size=8, path='x.pth')
    assert seen_while_loading == [(True, None), (True, None)]
    assert [(group['fused'], group['foreach']) for group in fused.param_groups] == \
        [(True, None), (True, None)]
    assert fused.state_dict()['state'][0]['step'] == 1  # the saved state is loaded


# ---------------------------------------------------------------------------------------------
# Other timm models: a ResNet baseline, a distilled DeiT trained with both heads
# ---------------------------------------------------------------------------------------------

def test_resnet18_trains_one_epoch(tree, tmp_path):
    import timm
    out = tmp_path / 'resnet'
    args = [*tree_args(tree), *TINY_RUN, '--model', 'resnet18', '--epochs', '1',
            '--no-model-ema', '--output_dir', str(out)]
    assert main.cli(args) == 0
    [log] = [json.loads(line) for line in (out / 'log.txt').read_text().splitlines()]
    assert math.isfinite(log['train_loss']) and log['test_num_samples'] == 20
    trained = torch.load(out / 'checkpoint.pth', weights_only=True)['model']
    fresh = timm.create_model('resnet18', num_classes=10).state_dict()
    assert trained.keys() == fresh.keys()
    assert trained['fc.weight'].shape == (10, 512)


def test_distilled_deit_trains_both_heads_on_the_teacher(tree, tmp_path, teacher_path,
                                                        monkeypatch):
    path, teacher = teacher_path
    terms = []
    forward = losses.DistillationLoss.forward

    def checking_forward(self, inputs, outputs, labels):
        loss = forward(self, inputs, outputs, labels)
        class_logits, distill_logits = outputs  # two heads while training
        with torch.no_grad():
            teacher_labels = teacher(inputs).argmax(dim=1)
        expected = (0.5 * F.cross_entropy(class_logits, labels)
                    + 0.5 * F.cross_entropy(distill_logits, teacher_labels))
        terms.append((loss.detach(), expected.detach(),
                      (class_logits - distill_logits).abs().max().item()))
        return loss

    monkeypatch.setattr(losses.DistillationLoss, 'forward', checking_forward)
    args = [*tree_args(tree), *TINY_RUN, '--model', 'deit_tiny_distilled_patch16_224',
            '--epochs', '1', '--mixup', '0', '--cutmix', '0', '--smoothing', '0',
            '--distillation-type', 'hard', '--teacher-model', 'resnet10t',
            '--teacher-path', str(path), '--output_dir', str(tmp_path / 'distilled')]
    assert main.cli(args) == 0
    assert len(terms) == 5
    for loss, expected, head_difference in terms:
        torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
        assert head_difference > 0  # the distillation head is a head of its own


def test_distilled_checkpoint_finetunes_a_model_without_distillation_token(tmp_path, capsys):
    import timm
    from checkpoints import CheckpointError, finetune_from
    distilled = timm.create_model('deit_tiny_distilled_patch16_224', img_size=32, num_classes=10)
    path = tmp_path / 'distilled.pth'
    torch.save({'model': distilled.state_dict()}, path)
    model = timm.create_model('deit_tiny_patch16_shrink_base', img_size=32, num_classes=10)
    finetune_from(model, str(path))
    assert 'dist_token, its position embedding and head_dist: dropped' in capsys.readouterr().out
    weights = model.state_dict()
    torch.testing.assert_close(weights['cls_token'], distilled.cls_token.detach())
    expected_pos = torch.cat([distilled.pos_embed[:, :1], distilled.pos_embed[:, 2:]], dim=1)
    torch.testing.assert_close(weights['pos_embed'], expected_pos.detach())
    plain = tmp_path / 'plain.pth'
    torch.save({'model': model.state_dict()}, plain)
    with pytest.raises(CheckpointError, match='has a distillation token, the checkpoint none'):
        finetune_from(timm.create_model('deit_tiny_distilled_patch16_224', img_size=32,
                                        num_classes=10), str(plain))


def weight_decay_by_name(monkeypatch, tree, *flags):
    """{parameter name: weight decay} of the optimizer main.py builds for these flags."""
    state = wiring(monkeypatch, tree, *flags)['state']
    decay_of = {id(p): group['weight_decay'] for group in state.optimizer.param_groups
                for p in group['params']}
    return {name: decay_of[id(p)] for name, p in state.model.named_parameters()}


def test_position_embeddings_are_decayed_as_the_release_did(monkeypatch, tree):
    multi_scale = ['--multi-scale', '--input-size', '64', '--weight-decay', '0.05']
    decay = weight_decay_by_name(monkeypatch, tree, *multi_scale)
    assert decay['pos_embed_list.0'] == decay['pos_embed_list.1'] == 0.05
    assert decay['cls_token'] == 0
    assert decay['blocks.0.norm1.weight'] == decay['blocks.0.attn.qkv.bias'] == 0
    assert decay['blocks.0.attn.qkv.weight'] == 0.05
    decay = weight_decay_by_name(monkeypatch, tree, *multi_scale, '--no-pos-embed-decay')
    assert decay['pos_embed_list.0'] == decay['pos_embed_list.1'] == 0
    assert decay['blocks.0.attn.qkv.weight'] == 0.05
    # A timm DeiT keeps timm's choice: no decay on its position embedding.
    decay = weight_decay_by_name(monkeypatch, tree, '--model', 'deit_tiny_patch16_224')
    assert decay['pos_embed'] == decay['cls_token'] == 0


@pytest.mark.parametrize('flags, expected', [([], True), (['--no-multi-scale'], False)])
def test_finetune_takes_the_multi_scale_shape_from_an_mtvit_source(tmp_path, flags, expected):
    import timm
    source = tmp_path / 'multi.pth'
    torch.save({'model': timm.create_model('deit_tiny_patch16_shrink_base', img_size=64,
                                           multi_scale=True, num_classes=10).state_dict()}, source)
    args = parse('--data-set', 'DIGITS', *TINY_RUN, '--finetune', source, *flags)
    dist_state = DistState(distributed=False, rank=0, world_size=1, local_rank=0,
                           device=torch.device('cpu'), backend=None)
    _, _, finetune_weights = main.prepare(args, dist_state)
    assert args.multi_scale is expected
    assert 'pos_embed_list.1' in finetune_weights
    model = main.create_model(args, 10)
    main.finetune_from(model, str(source), finetune_weights)
    assert hasattr(model, 'pos_embed_list') == expected


def test_merge_any_gives_a_timm_vit_the_keep_rate_schedule(monkeypatch, tree, capsys):
    recorded = wiring(monkeypatch, tree, '--model', 'deit_tiny_patch16_224', '--merge-any',
                      '--base_keep_rate', '0.5', '--shrink_start_epoch', '0',
                      '--shrink_epochs', '0', '--input-size', '64')
    loop = recorded['loop']
    assert loop.keep_rate_schedule(0) == 0.5
    # 4x4 patches at 64x64: the reductions at blocks 3, 6, 9 keep 8, 4, then 2 patch tokens.
    assert loop.token_counts(0.5) == recorded['state'].model.token_counts(0.5)
    images = torch.randn(2, 3, 64, 64)
    _, reductions = recorded['state'].model.eval()(images, get_idx=True)
    assert [kept.shape[1] for kept, _ in reductions] == [8, 4, 2]
    for model, reason in (('deit_tiny_patch16_shrink_base', 'reduces tokens already'),
                          ('resnet18', '--model resnet18')):
        assert main.cli([*tree_args(tree), *TINY_RUN, '--model', model, '--merge-any']) == 2
        assert reason in capsys.readouterr().err


def test_finetune_drops_any_classifier_of_another_class_count(capsys):
    import timm
    from checkpoints import finetune_from
    for name, heads in (('resnet18', ['fc']), ('deit_tiny_distilled_patch16_224',
                                               ['head', 'head_dist'])):
        source = timm.create_model(name, num_classes=1000).state_dict()
        model = timm.create_model(name, num_classes=10)
        finetune_from(model, 'source.pth', source)
        out = capsys.readouterr().out
        for head in heads:
            assert f'{head}.weight: dropped, shape' in out
        kept = next(key for key in source if not key.startswith(tuple(heads)) and
                    source[key].shape == model.state_dict()[key].shape and 'pos_embed' not in key)
        torch.testing.assert_close(model.state_dict()[kept], source[kept])


def test_resume_takes_the_input_size_the_run_saved(tmp_path):
    args = parse('--data-set', 'DIGITS', '--model', 'deit_tiny_patch16_224')
    weights = {'pos_embed': torch.zeros(1, 5, 8)}  # 2x2 patches of 16 would say 32
    main.reconcile_with_checkpoint(args, weights, 'x.pth', saved_args={'input_size': 48})
    assert args.input_size == 48
    args = parse('--data-set', 'DIGITS', '--model', 'deit_tiny_patch16_224')
    main.reconcile_with_checkpoint(args, weights, 'x.pth', saved_args=None)
    assert args.input_size == 32


def test_distilled_model_finetuned_with_distillation_is_refused(tree, teacher_path, capsys):
    path, _ = teacher_path
    assert main.cli([*tree_args(tree), *TINY_RUN, '--model', 'deit_tiny_distilled_patch16_224',
                     '--finetune', str(path), '--distillation-type', 'hard', '--teacher-model',
                     'resnet10t', '--teacher-path', str(path)]) == 2
    assert 'trains its distillation head only in train mode' in capsys.readouterr().err
