"""Dueling head maths and the two torsos."""

import torch

from mlplatform.rl.model import DuelingDQN


def test_dueling_output_is_value_plus_centred_advantage_per_sample():
    torch.manual_seed(0)
    net = DuelingDQN((4,), 3, hidden_sizes=(16,), head_size=8)
    obs = torch.randn(5, 4)
    value, advantage = net.streams(obs)
    q = net(obs)
    for i in range(5):
        expected = value[i, 0] + advantage[i] - advantage[i].mean()
        torch.testing.assert_close(q[i], expected)


def test_dueling_rows_do_not_depend_on_the_rest_of_the_batch():
    # The sketch averaged the advantage over the whole batch, coupling unrelated states.
    torch.manual_seed(0)
    net = DuelingDQN((4,), 3, hidden_sizes=(16,))
    obs = torch.randn(6, 4)
    torch.testing.assert_close(net(obs)[:1], net(obs[:1]))
    torch.testing.assert_close(net(obs)[3:4], net(obs[3:4]))


def test_mean_advantage_is_zero_per_sample():
    net = DuelingDQN((4,), 5)
    obs = torch.randn(7, 4)
    value, _ = net.streams(obs)
    torch.testing.assert_close(net(obs).mean(dim=1), value.squeeze(1))


def test_cnn_torso_takes_uint8_frames_and_scales_inside():
    torch.manual_seed(0)
    net = DuelingDQN((4, 84, 84), 6)
    frames = torch.randint(0, 256, (2, 4, 84, 84), dtype=torch.uint8)
    q = net(frames)
    assert q.shape == (2, 6)
    torch.testing.assert_close(net.torso(frames), net.torso.net(frames.float() / 255.0))
