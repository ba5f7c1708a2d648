import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

# Plain `pytest` (unlike `python -m pytest`) does not put the repository on sys.path.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from losses import DistillationLoss  # noqa: E402

BATCH, CHANNELS, SIZE, CLASSES = 4, 3, 8, 5
SMOOTHING = 0.1


class TinyNet(nn.Module):
    """Flatten + linear classifier; records whether gradients were enabled when called."""

    def __init__(self, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.fc = nn.Linear(CHANNELS * SIZE * SIZE, CLASSES)
        self.dropout = nn.Dropout(0.5)
        self.grad_enabled_calls = []

    def forward(self, x):
        self.grad_enabled_calls.append(torch.is_grad_enabled())
        return self.fc(self.dropout(x.flatten(1)))


def _batch(seed=0):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(BATCH, CHANNELS, SIZE, SIZE, generator=generator)
    labels = torch.randint(0, CLASSES, (BATCH,), generator=generator)
    return images, labels


def _mixed_batch():
    images, labels = _batch()
    mixup = Mixup(mixup_alpha=0.8, cutmix_alpha=0.0, label_smoothing=SMOOTHING,
                  num_classes=CLASSES)
    torch.manual_seed(1)
    return mixup(images, labels)


def _soft_target_ce(logits, targets):
    return sum(-(targets[b, k] * torch.log_softmax(logits[b], 0)[k])
               for b in range(BATCH) for k in range(CLASSES)) / BATCH


def _label_smoothing_ce(logits, labels):
    total = 0.0
    for b in range(BATCH):
        logp = torch.log_softmax(logits[b], 0)
        total = total + (1 - SMOOTHING) * -logp[labels[b]] + SMOOTHING * -logp.mean()
    return total / BATCH


def _soft_kd(student, teacher, tau):
    p_t = torch.softmax(teacher / tau, 1)
    kl = (p_t * (torch.log(p_t) - torch.log_softmax(student / tau, 1))).sum()
    return kl * tau ** 2 / (BATCH * CLASSES)


def _hard_kd(student, teacher):
    targets = teacher.argmax(1)
    return sum(-torch.log_softmax(student[b], 0)[targets[b]] for b in range(BATCH)) / BATCH


@pytest.fixture
def models():
    return TinyNet(seed=0), TinyNet(seed=1)


def _check_teacher_untouched(teacher, student):
    assert teacher.grad_enabled_calls == [False]
    assert not teacher.training
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None for p in student.parameters())


@pytest.mark.parametrize("targets_kind", ["mixup", "hard"])
@pytest.mark.parametrize("kind", ["none", "soft", "hard"])
def test_distillation_loss_matches_hand_computation(models, kind, targets_kind):
    student, teacher = models
    if targets_kind == "mixup":
        images, labels = _mixed_batch()
        assert labels.shape == (BATCH, CLASSES)
        base_criterion, base_by_hand = SoftTargetCrossEntropy(), _soft_target_ce
    else:
        images, labels = _batch()
        base_criterion = LabelSmoothingCrossEntropy(smoothing=SMOOTHING)
        base_by_hand = _label_smoothing_ce
    alpha, tau = 0.3, 2.5
    criterion = DistillationLoss(base_criterion, teacher if kind != "none" else None,
                                 kind, alpha, tau)
    student.train()
    criterion.train()
    outputs = student(images)
    loss = criterion(images, outputs, labels)

    with torch.no_grad():
        student_logits = outputs.detach()
        base = base_by_hand(student_logits, labels)
        if kind == "none":
            expected = base
        else:
            teacher_logits = teacher.fc(images.flatten(1))
            kd = (_soft_kd(student_logits, teacher_logits, tau) if kind == "soft"
                  else _hard_kd(student_logits, teacher_logits))
            expected = base * (1 - alpha) + kd * alpha
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)

    loss.backward()
    if kind != "none":
        _check_teacher_untouched(teacher, student)


def test_soft_distillation_is_zero_when_student_equals_teacher(models):
    student, teacher = models
    images, labels = _batch()
    teacher_logits = teacher.fc(images.flatten(1)).detach()
    criterion = DistillationLoss(nn.CrossEntropyLoss(), teacher, "soft", alpha=1.0, tau=3.0)
    assert criterion(images, teacher_logits, labels).item() == pytest.approx(0.0, abs=1e-6)


def test_tuple_outputs_use_second_logits_for_distillation(models):
    _, teacher = models
    images, labels = _batch()
    class_logits = torch.randn(BATCH, CLASSES)
    distill_logits = torch.randn(BATCH, CLASSES)
    criterion = DistillationLoss(nn.CrossEntropyLoss(), teacher, "hard", alpha=0.5, tau=1.0)
    loss = criterion(images, (class_logits, distill_logits), labels)
    teacher_logits = teacher.fc(images.flatten(1)).detach()
    expected = (0.5 * nn.functional.cross_entropy(class_logits, labels)
                + 0.5 * _hard_kd(distill_logits, teacher_logits))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_none_ignores_alpha_and_teacher(models):
    student, teacher = models
    images, labels = _batch()
    logits = student(images)
    criterion = DistillationLoss(nn.CrossEntropyLoss(), teacher, "none", alpha=0.9, tau=1.0)
    loss = criterion(images, logits, labels)
    assert loss.item() == pytest.approx(nn.functional.cross_entropy(logits, labels).item())
    assert teacher.grad_enabled_calls == []


def test_invalid_configuration():
    with pytest.raises(ValueError, match="distillation_type"):
        DistillationLoss(nn.CrossEntropyLoss(), None, "medium", 0.5, 1.0)
    for kind in ("soft", "hard"):
        with pytest.raises(ValueError, match="needs a teacher"):
            DistillationLoss(nn.CrossEntropyLoss(), None, kind, 0.5, 1.0)
    with pytest.raises(ValueError, match="alpha"):
        DistillationLoss(nn.CrossEntropyLoss(), nn.Identity(), "soft", 1.5, 1.0)
    with pytest.raises(ValueError, match="tau"):
        DistillationLoss(nn.CrossEntropyLoss(), nn.Identity(), "soft", 0.5, 0.0)


def test_soft_loss_scales_with_tau_squared(models):
    """With a very high temperature KL ~ ||z_s - z_t||^2 / (2 K tau^2) per sample."""
    _, teacher = models
    # Double precision: near-uniform softmaxes leave float32 with too few digits.
    teacher.double()
    images, labels = _batch()
    images = images.double()
    tau = 1000.0
    student_logits = torch.randn(BATCH, CLASSES, dtype=torch.float64)
    teacher_logits = teacher.fc(images.flatten(1)).detach()
    criterion = DistillationLoss(nn.CrossEntropyLoss(), teacher, "soft", alpha=1.0, tau=tau)
    loss = criterion(images, student_logits, labels).item()
    diff = ((student_logits - student_logits.mean(1, keepdim=True))
            - (teacher_logits - teacher_logits.mean(1, keepdim=True)))
    approx = (diff ** 2).sum(1).div(2 * CLASSES).sum().item() / (BATCH * CLASSES)
    assert math.isclose(loss, approx, rel_tol=1e-4)


def test_a_teacher_checkpoint_of_another_model_names_the_teacher_flag(tmp_path):
    import timm
    from checkpoints import CheckpointError
    from losses import build_teacher
    path = tmp_path / 'student.pth'
    torch.save({'model': timm.create_model('deit_tiny_patch16_224', num_classes=10).state_dict()},
               path)
    with pytest.raises(CheckpointError, match=f'^{path} does not fit --teacher-model resnet18 '
                                              f'\\(missing: '):
        build_teacher('resnet18', str(path), num_classes=10, device=torch.device('cpu'))


def test_a_vit_teacher_loads_its_own_checkpoint_with_its_own_pooling(tmp_path):
    import timm
    from losses import build_teacher
    torch.manual_seed(0)
    vit = timm.create_model('deit_tiny_patch16_224', num_classes=10, img_size=32).eval()
    path = tmp_path / 'vit_teacher.pth'
    torch.save({'model': vit.state_dict()}, path)
    with pytest.MonkeyPatch.context() as patch:  # the teacher is built at the default size
        patch.setattr(timm, 'create_model', lambda name, **kwargs: timm.models.create_model(
            name, img_size=32, **kwargs))
        teacher = build_teacher('deit_tiny_patch16_224', str(path), num_classes=10,
                                device=torch.device('cpu'))
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(teacher(images), vit(images))  # class-token pooling, as saved
