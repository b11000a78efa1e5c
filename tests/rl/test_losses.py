"""Double DQN targets and the weighted Huber loss against hand-computed values."""

import pytest
import torch

from mlplatform.rl.losses import double_dqn_targets, linear_schedule, td_loss


def test_double_dqn_uses_online_argmax_and_target_value():
    next_online = torch.tensor([[1.0, 5.0, 2.0], [9.0, 0.0, 1.0]])
    next_target = torch.tensor([[7.0, 3.0, 100.0], [4.0, 50.0, 60.0]])
    targets = double_dqn_targets(
        rewards=torch.tensor([1.0, 2.0]),
        terminated=torch.tensor([0.0, 0.0]),
        discounts=torch.tensor([0.9, 0.5]),
        next_q_online=next_online,
        next_q_target=next_target,
    )
    # online argmax: action 1 then action 0; valued by the target net (3 and 4), not its own max
    torch.testing.assert_close(targets, torch.tensor([1.0 + 0.9 * 3.0, 2.0 + 0.5 * 4.0]))


def test_terminated_transitions_do_not_bootstrap():
    targets = double_dqn_targets(
        torch.tensor([1.5]), torch.tensor([1.0]), torch.tensor([0.99]),
        torch.tensor([[1.0, 2.0]]), torch.tensor([[10.0, 20.0]]),
    )
    torch.testing.assert_close(targets, torch.tensor([1.5]))


def test_td_loss_weights_each_sample_and_returns_errors():
    q = torch.tensor([0.0, 0.0, 0.0], requires_grad=True)
    y = torch.tensor([0.5, 3.0, -2.0])
    w = torch.tensor([1.0, 0.5, 2.0])
    loss, errors = td_loss(q, y, w)
    huber = torch.tensor([0.5 * 0.25, 3.0 - 0.5, 2.0 - 0.5])
    torch.testing.assert_close(loss, (w * huber).mean())
    torch.testing.assert_close(errors, y)
    assert not errors.requires_grad


@pytest.mark.parametrize(("step", "expected"), [(-5, 1.0), (0, 1.0), (50, 0.55), (100, 0.1), (1000, 0.1)])
def test_linear_schedule(step, expected):
    assert linear_schedule(1.0, 0.1, 100, step) == pytest.approx(expected)


def test_linear_schedule_with_no_duration_is_the_end_value():
    assert linear_schedule(1.0, 0.1, 0, 0) == 0.1
