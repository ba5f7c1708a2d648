"""Training criterion with optional knowledge distillation from a teacher network."""
from typing import Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

DISTILLATION_TYPES = ("none", "soft", "hard")


class DistillationLoss(nn.Module):
    """Wrap a base criterion and add a distillation term computed from a frozen teacher.

    Args:
        base_criterion: loss on the student's class-token logits and the labels, e.g.
            timm's SoftTargetCrossEntropy (labels are (B, K) mixup targets) or
            LabelSmoothingCrossEntropy / nn.CrossEntropyLoss (labels are (B,) indices).
        teacher_model: network mapping the input images to (B, K) logits; required unless
            ``distillation_type`` is 'none'. It is kept in eval mode and never receives
            gradients.
        distillation_type: 'none' (base loss only), 'soft' (KL divergence to the teacher's
            temperature-softened distribution) or 'hard' (cross entropy with the teacher's
            predicted class).
        alpha: weight of the distillation term, in [0, 1]; the base loss gets 1 - alpha.
        tau: softmax temperature of the 'soft' distillation, > 0.
    """

    def __init__(self, base_criterion: nn.Module, teacher_model: Optional[nn.Module],
                 distillation_type: str, alpha: float, tau: float):
        super().__init__()
        if distillation_type not in DISTILLATION_TYPES:
            raise ValueError(f"distillation_type must be one of {DISTILLATION_TYPES}, "
                             f"got {distillation_type!r}")
        if distillation_type != "none" and teacher_model is None:
            raise ValueError(f"distillation_type {distillation_type!r} needs a teacher model")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        if tau <= 0:
            raise ValueError(f"tau must be positive, got {tau}")
        self.base_criterion = base_criterion
        self.teacher_model = teacher_model
        self.distillation_type = distillation_type
        self.alpha = alpha
        self.tau = tau
        if teacher_model is not None:
            teacher_model.eval()

    def train(self, mode: bool = True) -> "DistillationLoss":
        """Switch the mode of the base criterion while keeping the teacher in eval mode."""
        super().train(mode)
        if self.teacher_model is not None:
            # Dropout / batch-norm updates in the teacher would make its targets noisy.
            self.teacher_model.eval()
        return self

    def forward(self, inputs: torch.Tensor,
                outputs: Union[torch.Tensor, Sequence[torch.Tensor]],
                labels: torch.Tensor) -> torch.Tensor:
        """Compute the training loss.

        Args:
            inputs: the images given to the student, (B, C, H, W); the teacher sees the
                same (possibly mixed) images.
            outputs: student logits (B, K), or a pair (class-token logits, distillation-token
                logits), each (B, K). MTViT has no distillation token, so with a single
                tensor the class-token logits also serve for distillation.
            labels: (B,) class indices or (B, K) soft targets, as the base criterion expects.

        Returns:
            A scalar tensor: base loss, or (1 - alpha) * base + alpha * distillation.
        """
        if isinstance(outputs, torch.Tensor):
            class_logits, distill_logits = outputs, outputs
        else:
            class_logits, distill_logits = outputs[0], outputs[1]

        base_loss = self.base_criterion(class_logits, labels)
        if self.distillation_type == "none":
            return base_loss

        with torch.no_grad():
            teacher_logits = self.teacher_model(inputs)

        if self.distillation_type == "soft":
            tau = self.tau
            # Sum over all elements then divide by the element count, scaled by tau^2 so
            # that the gradient magnitude does not shrink with the temperature.
            distillation_loss = F.kl_div(
                F.log_softmax(distill_logits / tau, dim=1),
                F.log_softmax(teacher_logits / tau, dim=1),
                reduction="sum",
                log_target=True,
            ) * (tau * tau) / distill_logits.numel()
        else:
            distillation_loss = F.cross_entropy(distill_logits, teacher_logits.argmax(dim=1))

        return base_loss * (1 - self.alpha) + distillation_loss * self.alpha


def build_teacher(model_name: str, path: str, num_classes: int, device: torch.device) -> nn.Module:
    """The distillation teacher: timm's ``model_name`` with the weights at ``path`` (a
    checkpoint of exactly that model), in eval mode on ``device``. A CNN pools by averaging, as
    DeiT builds its teachers; a ViT keeps its own pooling (with 'avg' timm would give it a norm
    that its checkpoint does not have)."""
    import timm
    from timm.models.vision_transformer import VisionTransformer
    from checkpoints import load_checkpoint, load_weights, model_state_dict
    with torch.device('meta'):  # which kind of model it is, without building its weights
        is_vit = isinstance(timm.create_model(model_name, num_classes=num_classes),
                            VisionTransformer)
    teacher = timm.create_model(model_name, pretrained=False, num_classes=num_classes,
                                **({} if is_vit else dict(global_pool='avg')))
    load_weights(teacher, model_state_dict(load_checkpoint(path), path), path,
                 chosen_by=f'--teacher-model {model_name}')
    return teacher.to(device).eval()


def build_criterion(num_classes: int, device: torch.device, *, mixup: float = 0.,
                    cutmix: float = 0., cutmix_minmax: Optional[Sequence[float]] = None,
                    mixup_prob: float = 1., mixup_switch_prob: float = 0.5,
                    mixup_mode: str = 'batch', smoothing: float = 0.,
                    distillation_type: str = 'none', teacher_model: str = '',
                    teacher_path: str = '', distillation_alpha: float = 0.5,
                    distillation_tau: float = 1.):
    """The training criterion and the batch mixer, as DeiT picks them.

    Returns ``(mixup_fn, criterion)``: timm's Mixup/CutMix (None when ``mixup``, ``cutmix`` and
    ``cutmix_minmax`` are all off) and a ``DistillationLoss`` around the base loss, which is
    SoftTargetCrossEntropy on Mixup's (B, K) soft targets (label smoothing is then Mixup's),
    else LabelSmoothingCrossEntropy when ``smoothing`` > 0, else plain cross entropy.
    """
    from timm.data import Mixup
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
    mixup_fn = None
    if mixup > 0 or cutmix > 0 or cutmix_minmax is not None:
        mixup_fn = Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, cutmix_minmax=cutmix_minmax,
                         prob=mixup_prob, switch_prob=mixup_switch_prob, mode=mixup_mode,
                         label_smoothing=smoothing, num_classes=num_classes)
        base_criterion = SoftTargetCrossEntropy()
    elif smoothing > 0:
        base_criterion = LabelSmoothingCrossEntropy(smoothing=smoothing)
    else:
        base_criterion = nn.CrossEntropyLoss()
    teacher = None
    if distillation_type != 'none':
        teacher = build_teacher(teacher_model, teacher_path, num_classes, device)
    criterion = DistillationLoss(base_criterion, teacher, distillation_type, distillation_alpha,
                                 distillation_tau)
    return mixup_fn, criterion
