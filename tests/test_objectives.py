"""Identities of steer.objectives (§3), each against an independent computation."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Normal

from steer import objectives as obj

torch.manual_seed(0)


# ---------------------------------------------------------------------------------------------
# a one-step Gaussian "diffusion": x1 ~ N(0, 1), x0 | x1 ~ N(a x1, s²); P_B(x1 | x0) is the exact
# Bayesian posterior, so TB holds with R = Z · marginal(x0) for any Z.
# ---------------------------------------------------------------------------------------------
def _gaussian_chain(batch: int, a: float = 0.7, s: float = 0.5, log_z: float = 1.3):
    def normal(loc, scale):
        return Normal(
            torch.as_tensor(loc, dtype=torch.float64), torch.as_tensor(scale, dtype=torch.float64)
        )

    x1 = torch.randn(batch, dtype=torch.float64)
    x0 = a * x1 + s * torch.randn(batch, dtype=torch.float64)
    log_pf = torch.stack([normal(0.0, 1.0).log_prob(x1), normal(a * x1, s).log_prob(x0)], dim=1)
    var0 = a**2 + s**2
    post_mean, post_var = a * x0 / var0, s**2 / var0
    log_pb = normal(post_mean, math.sqrt(post_var)).log_prob(x1)
    log_reward = log_z + normal(0.0, math.sqrt(var0)).log_prob(x0)
    return log_pf, log_pb, log_reward


def test_tb_zero_at_optimum_and_shifts_with_log_z() -> None:
    log_pf, log_pb, log_reward = _gaussian_chain(64)
    delta = obj.trajectory_balance(
        log_pf, log_pb, log_reward, torch.tensor(1.3, dtype=torch.float64)
    )
    assert delta.shape == (64,)
    torch.testing.assert_close(delta, torch.zeros_like(delta), atol=1e-10, rtol=0)
    shifted = obj.trajectory_balance(log_pf, log_pb, log_reward, 1.3 + 0.25)
    torch.testing.assert_close(shifted, torch.full_like(delta, 0.25))
    # [B, T] and [B] inputs agree
    flat = obj.trajectory_balance(log_pf.sum(1), log_pb, log_reward, 1.3)
    torch.testing.assert_close(flat, delta)


def test_tb_is_not_zero_for_a_wrong_policy() -> None:
    log_pf, log_pb, log_reward = _gaussian_chain(64)
    delta = obj.trajectory_balance(log_pf * 1.1, log_pb, log_reward, 1.3)
    assert delta.abs().max() > 1e-2


def test_vargrad_equals_tb_at_the_optimal_log_z() -> None:
    log_pf, log_pb = torch.randn(32, 5), torch.randn(32, 5)
    log_reward = torch.randn(32)
    best_log_z = (log_reward + log_pb.sum(1) - log_pf.sum(1)).mean()
    torch.testing.assert_close(
        obj.vargrad(log_pf, log_pb, log_reward),
        obj.trajectory_balance(log_pf, log_pb, log_reward, best_log_z),
    )
    # the optimal log Z minimises the summed squared TB residual
    z = best_log_z.clone().requires_grad_(True)
    obj.trajectory_balance(log_pf, log_pb, log_reward, z).square().sum().backward()
    assert abs(z.grad.item()) < 1e-4


def test_vargrad_per_group_uses_each_groups_own_estimate() -> None:
    log_pf, log_pb, log_reward = torch.randn(12, 3), torch.randn(12, 3), torch.randn(12)
    group = torch.tensor([5, 1, 5, 1, 9, 9, 9, 1, 5, 5, 1, 9])
    delta = obj.vargrad(log_pf, log_pb, log_reward, group=group)
    for g in group.unique():
        m = group == g
        torch.testing.assert_close(delta[m], obj.vargrad(log_pf[m], log_pb[m], log_reward[m]))
        assert abs(delta[m].sum().item()) < 1e-5


# ---------------------------------------------------------------------------------------------
# a depth-2 tree with branching 3: the posterior policy ∝ prior × r is computed independently by
# twisting the prior with the value V(s) = E_prior[r(x) | s].
# ---------------------------------------------------------------------------------------------
def _tree(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    p_root = torch.softmax(torch.randn(3, generator=g, dtype=torch.float64), 0)  # [3]
    p_mid = torch.softmax(torch.randn(3, 3, generator=g, dtype=torch.float64), 1)  # [3, 3]
    r = torch.rand(3, 3, generator=g, dtype=torch.float64) + 0.1  # reward per leaf
    v_mid = (p_mid * r).sum(1)  # [3]
    v_root = (p_root * v_mid).sum()
    q_root = p_root * v_mid / v_root
    q_mid = p_mid * r / v_mid[:, None]
    i, j = torch.meshgrid(torch.arange(3), torch.arange(3), indexing="ij")
    i, j = i.flatten(), j.flatten()
    prior = torch.stack([p_root.log()[i], p_mid.log()[i, j]], 1)  # [9, 2]
    post = torch.stack([q_root.log()[i], q_mid.log()[i, j]], 1)  # [9, 2]
    return prior, post, r.log()[i, j], v_root.log(), (p_root, p_mid, r, q_root, q_mid, v_mid)


def test_rtb_zero_for_the_exact_posterior_policy() -> None:
    prior, post, log_r, log_z, _ = _tree()
    delta = obj.relative_trajectory_balance(post, prior, log_r, log_z)
    torch.testing.assert_close(delta, torch.zeros(9, dtype=torch.float64), atol=1e-12, rtol=0)
    # and the posterior's terminating distribution is ∝ prior × r
    terminal = post.sum(1).exp()
    target = prior.sum(1).exp() * log_r.exp()
    torch.testing.assert_close(terminal, target / target.sum())
    # the prior itself is not a solution
    assert obj.relative_trajectory_balance(prior, prior, log_r, log_z).abs().max() > 1e-2


def test_relative_vargrad_equals_rtb_at_the_optimal_log_z() -> None:
    post, prior, log_r = torch.randn(16, 4), torch.randn(16, 4), torch.randn(16)
    best = (log_r + prior.sum(1) - post.sum(1)).mean()
    torch.testing.assert_close(
        obj.relative_vargrad(post, prior, log_r),
        obj.relative_trajectory_balance(post, prior, log_r, best),
    )
    _, exact_post, log_r9, _, _ = _tree()
    prior9 = _tree()[0]
    assert obj.relative_vargrad(exact_post, prior9, log_r9).abs().max() < 1e-12


def test_db_zero_with_exact_flows_on_the_tree() -> None:
    _, _, _, log_z, (p_root, _, r, q_root, q_mid, _) = _tree()
    # target R(leaf) = r(leaf) (unnormalised); on a tree P_B = 1 and F(s) = Z · P_post(reach s)
    z = r.sum()
    q_root_t = torch.softmax(torch.zeros(3, dtype=torch.float64), 0)
    mid_flow = r.sum(1)  # F(mid_i) = Σ_j R(i, j)
    pf_root = mid_flow / z  # the optimal forward policy for target ∝ r on a tree
    pf_mid = r / mid_flow[:, None]
    d_root = obj.detailed_balance(
        z.log().expand(3), pf_root.log(), mid_flow.log(), torch.zeros(3, dtype=torch.float64)
    )
    d_mid = obj.detailed_balance(
        mid_flow.log()[:, None], pf_mid.log(), r.log(), torch.zeros(3, 3, dtype=torch.float64)
    )
    assert d_mid.shape == (3, 3)
    assert d_root.abs().max() < 1e-12 and d_mid.abs().max() < 1e-12
    bad = obj.detailed_balance(
        z.log().expand(3), q_root_t.log(), mid_flow.log(), torch.zeros(3, dtype=torch.float64)
    )
    assert bad.abs().max() > 1e-3


def test_energy_difference_db_is_db_with_reparametrised_flow() -> None:
    b, t = 8, 6
    f_tilde, f_tilde_next = torch.randn(b, t), torch.randn(b, t)
    r_pred, r_pred_next = torch.randn(b, t), torch.randn(b, t)
    pf, pb = torch.randn(b, t), torch.randn(b, t)
    ed = obj.energy_difference_detailed_balance(f_tilde, pf, f_tilde_next, pb, r_pred, r_pred_next)
    db = obj.detailed_balance(f_tilde + r_pred, pf, f_tilde_next + r_pred_next, pb)
    torch.testing.assert_close(ed, db)
    # terminal convention: log F(x_0) = log R(x_0), the next flow residual is ignored
    terminal = torch.zeros(b, t, dtype=torch.bool)
    terminal[:, -1] = True
    ed_t = obj.energy_difference_detailed_balance(
        f_tilde, pf, f_tilde_next, pb, r_pred, r_pred_next, terminal=terminal
    )
    torch.testing.assert_close(ed_t[:, :-1], ed[:, :-1])
    torch.testing.assert_close(
        ed_t[:, -1], obj.detailed_balance(f_tilde + r_pred, pf, r_pred_next, pb)[:, -1]
    )


def test_energy_difference_db_telescopes_to_tb() -> None:
    """Summed along a trajectory with F̃ ≡ 0 inside, the reward terms telescope (3.5)."""
    b, t = 5, 7
    pf, pb, r_pred = torch.randn(b, t), torch.randn(b, t), torch.randn(b, t + 1)
    f_tilde = torch.zeros(b, t + 1)
    f_tilde[:, 0] = torch.randn(b)  # log F̃ at the first state plays log Z
    terminal = torch.zeros(b, t, dtype=torch.bool)
    terminal[:, -1] = True
    ed = obj.energy_difference_detailed_balance(
        f_tilde[:, :-1], pf, f_tilde[:, 1:], pb, r_pred[:, :-1], r_pred[:, 1:], terminal=terminal
    )
    tb = obj.trajectory_balance(pf, pb, r_pred[:, -1], f_tilde[:, 0] + r_pred[:, 0])
    torch.testing.assert_close(ed.sum(1), tb)


def test_modified_db_matches_db_with_flow_r_over_stop() -> None:
    args = [torch.randn(10) for _ in range(6)]
    lr, pf, lr_next, pb, stop, stop_next = args
    torch.testing.assert_close(
        obj.modified_detailed_balance(lr, pf, lr_next, pb, stop, stop_next),
        obj.detailed_balance(lr - stop, pf, lr_next - stop_next, pb),
    )


def _subtb_naive(log_flows, log_pf, log_pb, lam):
    b, t = log_pf.shape
    out = torch.zeros(b, dtype=log_pf.dtype)
    for n in range(b):
        num = den = 0.0
        for i in range(t + 1):
            for j in range(i + 1, t + 1):
                d = log_flows[n, i] + (log_pf[n, i:j] - log_pb[n, i:j]).sum() - log_flows[n, j]
                w = lam ** (j - i)
                num, den = num + w * d**2, den + w
        out[n] = num / den
    return out


def test_subtb_matches_a_naive_double_loop() -> None:
    flows, pf, pb = (torch.randn(n, dtype=torch.float64).view(4, -1) for n in (24, 20, 20))
    for lam in (0.3, 0.9, 2.0):
        torch.testing.assert_close(
            obj.subtrajectory_balance(flows, pf, pb, lam), _subtb_naive(flows, pf, pb, lam)
        )


def test_subtb_limits_are_db_and_tb() -> None:
    flows, pf, pb = (torch.randn(n, dtype=torch.float64).view(3, -1) for n in (15, 12, 12))
    db = obj.detailed_balance(flows[:, :-1], pf, flows[:, 1:], pb).square().mean(1)
    torch.testing.assert_close(obj.subtrajectory_balance(flows, pf, pb, 0.0), db)
    torch.testing.assert_close(
        obj.subtrajectory_balance(flows, pf, pb, 1e-8), db, rtol=1e-6, atol=1e-6
    )
    tb = obj.trajectory_balance(pf, pb, flows[:, -1], flows[:, 0]).square()
    torch.testing.assert_close(
        obj.subtrajectory_balance(flows, pf, pb, 1e8), tb, rtol=1e-6, atol=1e-6
    )


def test_subtb_lengths_ignore_padding() -> None:
    flows, pf, pb = torch.randn(2, 6), torch.randn(2, 5), torch.randn(2, 5)
    lengths = torch.tensor([3, 5])
    full = obj.subtrajectory_balance(flows, pf, pb, 0.8, lengths=lengths)
    short = obj.subtrajectory_balance(flows[:1, :4], pf[:1, :3], pb[:1, :3], 0.8)
    torch.testing.assert_close(full[:1], short)
    torch.testing.assert_close(full[1:], obj.subtrajectory_balance(flows[1:], pf[1:], pb[1:], 0.8))


def test_penalties() -> None:
    d = torch.linspace(-5, 5, 101, dtype=torch.float64)
    torch.testing.assert_close(obj.log_cosh(d), 2 * torch.log(torch.cosh(d)))
    small = torch.linspace(-0.5, 0.5, 11)
    torch.testing.assert_close(obj.huber(small), small.square())
    assert obj.huber(torch.tensor(10.0)).item() == pytest.approx(19.0)
    assert torch.isfinite(obj.log_cosh(torch.tensor([1e4, -1e4]))).all()


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (
            lambda: obj.trajectory_balance(
                torch.zeros(3, 2), torch.zeros(4, 2), torch.zeros(3), 0.0
            ),
            "batch sizes differ",
        ),
        (
            lambda: obj.trajectory_balance(
                torch.zeros(3), torch.zeros(3), torch.tensor([0.0, float("nan"), 1.0]), 0.0
            ),
            "log_reward has non-finite entries at batch indices \\[1\\]",
        ),
        (
            lambda: obj.trajectory_balance(
                torch.zeros(3), torch.zeros(3), torch.zeros(3), torch.zeros(2)
            ),
            "log_z must be",
        ),
        (lambda: obj.vargrad(torch.zeros(2, 2, 2), torch.zeros(2), torch.zeros(2)), "log_pf must"),
        (
            lambda: obj.subtrajectory_balance(
                torch.zeros(2, 4), torch.zeros(2, 3), torch.zeros(2, 3), lam=-0.5
            ),
            "lam must be >= 0",
        ),
        (
            lambda: obj.subtrajectory_balance(
                torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 3)
            ),
            "log_flows must be",
        ),
        (
            lambda: obj.detailed_balance(
                torch.zeros(3), torch.zeros(4), torch.zeros(3), torch.zeros(3)
            ),
            "do not broadcast",
        ),
        (
            lambda: obj.vargrad(
                torch.zeros(3), torch.zeros(3), torch.zeros(3), group=torch.zeros(3)
            ),
            "integer ids",
        ),
    ],
)
def test_bad_input_raises(call, match) -> None:
    with pytest.raises((ValueError, TypeError), match=match):
        call()
