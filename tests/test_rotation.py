import pytest
import torch

from treeq.runtime import rotation

SCHEDULES = ("round_robin", "random")


def per_pair_reference(x, pairs, theta, group_size):
    """The definition, one pair at a time."""
    x = x.clone()
    for r in range(pairs.shape[0]):
        for t in range(pairs.shape[1] // 2):
            base = (2 * t) // group_size * group_size
            i, j = base + int(pairs[r, 2 * t]), base + int(pairs[r, 2 * t + 1])
            c, s = torch.cos(theta[r, t]), torch.sin(theta[r, t])
            xi, xj = x[:, i].clone(), x[:, j].clone()
            x[:, i], x[:, j] = xi * c + xj * s, xj * c - xi * s
    return x


def angles(krot, n, seed=0, dtype=torch.float64):
    return torch.randn(krot, n // 2, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize("kind", SCHEDULES)
def test_layers_pair_each_channel_once_and_never_repeat_a_pair(kind):
    group, n, krot = 16, 64, 8
    pairs, frozen = rotation.schedule(kind, n, group, krot, seed=3)
    assert pairs.dtype == torch.int16 and pairs.shape == (krot, n)
    seen = set()
    for r in range(krot):
        for g, members in enumerate(pairs[r].reshape(-1, group).tolist()):
            assert sorted(members) == list(range(group)), (kind, r, g)
            for t in range(group // 2):
                if frozen[r, g * group // 2 + t]:
                    continue  # a padding pair: its angle is pinned at 0, it rotates nothing
                pair = (g, *sorted(members[2 * t : 2 * t + 2]))
                assert pair not in seen, (kind, r, pair)
                seen.add(pair)
    if kind == "round_robin":
        assert not frozen.any()


def test_round_robin_covers_every_pair_in_g_minus_1_layers():
    pairs = rotation.round_robin_pairs(8, 7).reshape(7, 4, 2).tolist()
    assert {tuple(sorted(p)) for layer in pairs for p in layer} == {(i, j) for i in range(8) for j in range(i + 1, 8)}


@pytest.mark.parametrize("kind", SCHEDULES)
def test_rotate_matches_the_per_pair_definition_and_inverse_undoes_it(kind):
    pairs, _ = rotation.schedule(kind, 64, 16, 5, seed=1)
    x, theta = torch.randn(7, 64, dtype=torch.float64), angles(5, 64)
    y = rotation.rotate(x, pairs, theta, 16)
    torch.testing.assert_close(y, per_pair_reference(x, pairs, theta, 16), rtol=0, atol=1e-12)
    torch.testing.assert_close(rotation.rotate(y, pairs, theta, 16, inverse=True), x, rtol=0, atol=1e-12)
    torch.testing.assert_close(y.norm(dim=1), x.norm(dim=1))
    assert not torch.allclose(y, x)


def test_dense_group_matrices_apply_the_same_rotation():
    pairs, _ = rotation.schedule("round_robin", 64, 16, 6, seed=0)
    x, theta = torch.randn(9, 64, dtype=torch.float64), angles(6, 64)
    m = rotation.group_matrices(pairs, theta, 16)
    assert m.shape == (4, 16, 16)
    torch.testing.assert_close(m @ m.transpose(1, 2), torch.eye(16, dtype=torch.float64).expand(4, 16, 16))
    torch.testing.assert_close(rotation.apply_group_matrices(x, m), rotation.rotate(x, pairs, theta, 16))


def hand_angle_gradient(x, pairs, theta, group_size, grad_out):
    """d(sum(grad_out * rotate(x)))/d(theta), derived by hand rather than by autograd: a turn of
    angle a maps (x_i, x_j) to (y_i, y_j) = (x_i c + x_j s, x_j c - x_i s), so dy_i/da = y_j and
    dy_j/da = -y_i; the gradient reaching layer r's output is grad_out carried back through the
    later layers, which are rotations, so their transpose is their inverse."""
    krot, grad = pairs.shape[0], torch.zeros_like(theta)
    for r in range(krot):
        y = rotation.rotate(x, pairs[: r + 1], theta[: r + 1], group_size)
        g = rotation.rotate(grad_out, pairs[r + 1 :], theta[r + 1 :], group_size, inverse=True)
        base = torch.arange(pairs.shape[1] // 2) * 2 // group_size * group_size
        i, j = base + pairs[r, 0::2].long(), base + pairs[r, 1::2].long()
        grad[r] = (g[:, i] * y[:, j] - g[:, j] * y[:, i]).sum(0)
    return grad


@pytest.mark.parametrize("dense", [False, True])
def test_angle_gradient_matches_a_hand_derivation_and_finite_differences(dense):
    """The angle gradient ParoQuant trains with (autograd through rotate, or through the dense group
    matrices) against the gradient derived by hand, which is itself checked against float64 central
    differences of the forward alone. Away from angle 0, so a formula right only at 0 would fail.
    Checked failing with the sine detached from the graph in rotate (gradient off by the cos terms),
    and with the hand formula's sign of the y_i term flipped (it then disagrees with the differences)."""
    pairs, _ = rotation.schedule("random", 32, 8, 4, seed=2)
    x = torch.randn(5, 32, dtype=torch.float64)
    theta = angles(4, 32, seed=5) + 0.7
    target = torch.randn(5, 32, dtype=torch.float64)

    def forward(theta):
        if dense:
            return rotation.apply_group_matrices(x, rotation.group_matrices(pairs, theta, 8))
        return rotation.rotate(x, pairs, theta, 8)

    def loss(theta):
        return float(((forward(theta) - target) ** 3).sum())

    eps, numeric = 1e-6, torch.zeros_like(theta)
    for k in range(theta.numel()):
        step = torch.zeros_like(theta).view(-1)
        step[k] = eps
        numeric.view(-1)[k] = (loss(theta + step.view_as(theta)) - loss(theta - step.view_as(theta))) / (2 * eps)
    grad_out = 3 * (rotation.rotate(x, pairs, theta, 8) - target) ** 2
    by_hand = hand_angle_gradient(x, pairs, theta, 8, grad_out)
    torch.testing.assert_close(by_hand, numeric, rtol=1e-6, atol=1e-6)

    trained = theta.clone().requires_grad_()
    ((forward(trained) - target) ** 3).sum().backward()
    torch.testing.assert_close(trained.grad, by_hand, rtol=1e-10, atol=1e-10)
