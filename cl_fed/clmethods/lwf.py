"""Learning without Forgetting (Li and Hoiem, 2017) for ASR: distil, on the current stage's data, the
output distributions of the model the site started the stage from (its teacher), so no old data is
needed. CTC: the frame posteriors; Whisper: the next-token distributions (both as logits, masked to
the positions that hold speech or a label)."""

from __future__ import annotations

import torch


def distillation(
    student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor, temperature: float
) -> torch.Tensor:
    """T^2 * mean over valid positions of KL(softmax(teacher / T) || softmax(student / T)).

    student, teacher: (batch, positions, classes) logits; mask: (batch, positions), true where a
    position counts. The T^2 keeps the gradient's scale independent of T (Hinton et al., 2015)."""
    if student.shape != teacher.shape:
        raise ValueError(f"lwf: student logits {tuple(student.shape)} != teacher's {tuple(teacher.shape)}")
    if temperature <= 0:
        raise ValueError(f"lwf: temperature must be > 0, got {temperature}")
    log_p_student = torch.log_softmax(student.float() / temperature, dim=-1)
    log_p_teacher = torch.log_softmax(teacher.float() / temperature, dim=-1)
    kl = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(dim=-1)
    mask = mask.to(kl.device, torch.bool)
    if not bool(mask.any()):
        return kl.sum() * 0.0
    return temperature**2 * kl[mask].mean()
