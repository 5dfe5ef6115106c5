import math

import torch

from uniflow.distill import DistillConfig, distillation_loss, layer_alignment, layer_weights


def test_weights_and_loss_by_hand():
    alpha = torch.tensor([0.1, 0.3, 0.05, 0.2])
    beta, num_layers = 2.0, 4
    raw = [(i + 1) / num_layers * math.exp(beta * a) for i, a in enumerate(alpha.tolist())]
    expected = torch.tensor([r / sum(raw) for r in raw])
    w = layer_weights(alpha, "adaptive", beta)
    assert torch.allclose(w, expected, atol=1e-7)
    assert math.isclose(float((w * alpha).sum()), sum(e * a for e, a in zip(expected.tolist(), alpha.tolist())),
                        rel_tol=1e-6)


def test_beta_zero_gives_depth_prior():
    w = layer_weights(torch.tensor([0.9, 0.1, 0.5]), "adaptive", beta=0.0)
    assert torch.allclose(w, torch.tensor([1.0, 2.0, 3.0]) / 6.0)


def test_alpha_is_cosine_distance_and_no_gradient_through_weights():
    torch.manual_seed(0)
    student = [torch.randn(2, 5, 8, requires_grad=True) for _ in range(3)]
    teacher = [torch.randn(2, 5, 8) for _ in range(3)]
    alpha = layer_alignment(student, teacher)
    for layer in range(3):
        cos = torch.nn.functional.cosine_similarity(student[layer], teacher[layer], dim=-1).mean()
        assert torch.allclose(alpha[layer], 1 - cos)
    res = distillation_loss(student, teacher, DistillConfig())
    res.loss.backward()
    # if w were differentiated too the gradient would differ from sum_l w_l d(alpha_l)
    grads_a = [s.grad.clone() for s in student]
    for s in student:
        s.grad = None
    alpha2 = layer_alignment(student, teacher)
    (res.weights * alpha2).sum().backward()
    for g, s in zip(grads_a, student):
        assert torch.allclose(g, s.grad)
    assert not res.weights.requires_grad
    assert math.isclose(float(res.weights.sum()), 1.0, rel_tol=1e-6)


def test_identical_features_give_zero_loss_and_ablation_weights():
    feats = [torch.randn(2, 4, 6) for _ in range(4)]
    res = distillation_loss(feats, feats)
    assert abs(res.loss.item()) < 1e-6
    assert torch.allclose(layer_weights(torch.rand(4), "uniform"), torch.full((4,), 0.25))
    assert torch.equal(layer_weights(torch.rand(4), "last"), torch.tensor([0.0, 0.0, 0.0, 1.0]))


def test_teacher_gets_no_gradient():
    student = [torch.randn(1, 3, 4, requires_grad=True)]
    teacher = [torch.randn(1, 3, 4, requires_grad=True)]
    distillation_loss(student, teacher).loss.backward()
    assert teacher[0].grad is None
