"""The paper's DQN rows as the authors ran them (their code, `me_layer` on PFRL): losses, the Nature RMSprop, PFRL's initialization,
the dueling and RDQ baselines, and the settings a run records; exact values where the math gives them."""

import json
import math

import numpy as np
import pytest
import torch

import dqn_atari_meanexp as dqn
import iqn_atari_meanexp as iqn

# ---------------------------------------------------------------------------
# Losses: TD errors delta = y - Q(s, a) of -1, 2, 0, 2.5
# ---------------------------------------------------------------------------

Q_TAKEN = torch.tensor([1.0, 2.0, 3.0, -1.0])
TARGET = torch.tensor([0.0, 4.0, 3.0, 1.5])


@pytest.mark.parametrize("kind,expected", [
    ("sse", (1 + 4 + 0 + 6.25) / 2),  # the sum of delta^2 / 2
    ("mse", (1 + 4 + 0 + 6.25) / 2 / 4),  # the mean of delta^2 / 2
    ("huber", 0.5 + 1.5 + 0.0 + 2.0),  # the sum of 0.5 d^2 (|d| <= 1) or |d| - 0.5
])
def test_each_loss_on_a_hand_made_batch(kind, expected):
    assert dqn.td_error_loss(Q_TAKEN, TARGET, kind).item() == pytest.approx(expected, abs=1e-6)


def test_sse_gradient_is_batch_size_times_mse():
    grads = {}
    for kind in ("sse", "mse"):
        q = Q_TAKEN.clone().requires_grad_()
        dqn.td_error_loss(q, TARGET, kind).backward()
        grads[kind] = q.grad
    torch.testing.assert_close(grads["sse"], 4 * grads["mse"])
    torch.testing.assert_close(grads["sse"], Q_TAKEN - TARGET)  # d(delta^2 / 2)/dQ = -delta


class TableNet(torch.nn.Module):
    """Q(s, .) = TABLE[s], where the state index is the first pixel of the frames."""

    def __init__(self, table):
        super().__init__()
        self.table = torch.tensor(table)

    def forward(self, x):
        return self.table[x[:, 0, 0, 0].long()]


def frames(states):
    x = torch.zeros(len(states), 4, 84, 84, dtype=torch.uint8)
    x[:, 0, 0, 0] = torch.tensor(states)
    return x


def test_td_loss_target_clips_rewards_and_bootstraps_truncations():
    table = [[1.0, 2.0], [5.0, -3.0], [0.5, 0.25]]
    batch = dqn.Batch(obs=frames([0, 0, 0]), actions=torch.tensor([0, 1, 1]), rewards=torch.tensor([7.0, -0.5, 0.0]),
                      next_obs=frames([1, 2, 1]), terminated=torch.tensor([0.0, 1.0, 0.0]), truncated=torch.tensor([0.0, 0.0, 1.0]))
    args = dqn.Args(gamma=0.5, loss="sse")
    loss, q = dqn.td_loss(TableNet(table), TableNet(table), batch, args)
    # targets: sign(7) + 0.5 * max Q(1) = 3.5; sign(-0.5), terminated = -1; 0 + 0.5 * 5 (a truncation bootstraps) = 2.5
    deltas = np.array([3.5 - 1.0, -1.0 - 2.0, 2.5 - 2.0])
    assert loss.item() == pytest.approx((deltas**2).sum() / 2)
    torch.testing.assert_close(q, torch.tensor([table[0]] * 3))


# ---------------------------------------------------------------------------
# RMSprop: the Nature DQN's, eps inside the square root
# ---------------------------------------------------------------------------


def test_rmsprop_for_all_parameters_at_once_is_the_loop_over_them_to_the_bit():
    """CenteredRMSprop steps every parameter with one _foreach_ call per line (one kernel each on CUDA, issue 33): on
    the CPU these are the per-parameter operations, in the same order, so the weights equal a plain loop's exactly."""
    def loop_step(params, state, lr=0.01, eps=0.01, alpha=0.95):  # the per-parameter form, as before issue 33
        for p in params:
            if p.grad is None:
                continue
            m, s = state.setdefault(p, (torch.zeros_like(p), torch.zeros_like(p)))
            m.mul_(alpha).add_(p.grad, alpha=1 - alpha)
            s.mul_(alpha).addcmul_(p.grad, p.grad, value=1 - alpha)
            p.data.addcdiv_(p.grad, (s - m * m + eps).sqrt(), value=-lr)

    torch.manual_seed(0)
    shapes = [(32, 4, 8, 8), (32,), (512, 3136), (18,), (3, 3)]
    fast = [torch.randn(s, requires_grad=True) for s in shapes]
    plain, start = [p.detach().clone().requires_grad_() for p in fast], [p.detach().clone() for p in fast]
    optimizer, state = dqn.CenteredRMSprop(fast, lr=0.01, eps=0.01), {}
    for step in range(4):
        for a, b in zip(fast, plain):
            a.grad = None if (step == 1 and a.dim() == 2 and a.shape[0] == 3) else torch.randn(a.shape) * 3  # one skips a step
            b.grad = None if a.grad is None else a.grad.clone()
        optimizer.step()
        loop_step(plain, state)
    assert all(torch.equal(a, b) for a, b in zip(fast, plain))
    assert all((a - s).abs().min() > 0 for a, s in zip(fast, start))  # every weight moved: not a comparison of constants


def test_two_rmsprop_steps_against_a_hand_computation():
    lr, alpha, eps = 0.1, 0.95, 0.01
    start, grads = [1.0, -2.0], [[0.5, -1.0], [0.1, 0.3]]
    p = torch.nn.Parameter(torch.tensor(start, dtype=torch.float64))
    optimizer = dqn.CenteredRMSprop([p], lr=lr, eps=eps)
    for g in grads:
        p.grad = torch.tensor(g, dtype=torch.float64)
        optimizer.step()
    for i in range(2):  # by hand, one coordinate at a time
        theta, m, s = start[i], 0.0, 0.0
        for g in (grads[0][i], grads[1][i]):
            m = alpha * m + (1 - alpha) * g
            s = alpha * s + (1 - alpha) * g * g
            theta -= lr * g / math.sqrt(s - m * m + eps)
        assert p[i].item() == pytest.approx(theta, abs=1e-12)
    # the first step of the first coordinate, written out: 0.5 / sqrt(0.0125 - 0.025^2 + 0.01)
    one = torch.nn.Parameter(torch.tensor([1.0], dtype=torch.float64))
    one.grad = torch.tensor([0.5], dtype=torch.float64)
    dqn.CenteredRMSprop([one], lr=lr, eps=eps).step()
    assert one.item() == pytest.approx(1.0 - 0.1 * 0.5 / math.sqrt(0.021875), abs=1e-12)

    # PyTorch's RMSprop, even centered, adds eps outside the root: another optimizer (0.580 instead of 0.662)
    other = torch.nn.Parameter(torch.tensor([1.0], dtype=torch.float64))
    other.grad = torch.tensor([0.5], dtype=torch.float64)
    torch.optim.RMSprop([other], lr=lr, alpha=alpha, eps=eps, centered=True).step()
    assert other.item() == pytest.approx(1.0 - 0.1 * 0.5 / (math.sqrt(0.011875) + 0.01), abs=1e-12)
    assert one.item() - other.item() > 0.08


def test_optimizer_defaults_follow_the_chosen_optimizer():
    adam = dqn.parse_args([])
    assert (adam.learning_rate, adam.optimizer_eps) == (6.25e-5, 1.5e-4)
    rmsprop = dqn.parse_args(["--optimizer", "rmsprop"])
    assert (rmsprop.learning_rate, rmsprop.optimizer_eps) == (2.5e-4, 0.01)
    assert isinstance(dqn.make_optimizer(rmsprop, torch.nn.Linear(2, 2)), dqn.CenteredRMSprop)
    given = dqn.parse_args(["--optimizer", "rmsprop", "--learning-rate", "1e-3"])
    assert (given.learning_rate, given.optimizer_eps) == (1e-3, 0.01)
    assert isinstance(dqn.make_optimizer(adam, torch.nn.Linear(2, 2)), torch.optim.Adam)
    assert (iqn.parse_args([]).learning_rate, iqn.parse_args([]).optimizer_eps) == (5e-5, 0.01 / 32)


# ---------------------------------------------------------------------------
# Networks: PFRL's initialization, dueling and RDQ heads
# ---------------------------------------------------------------------------


def layers(module):
    return [m for m in module.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]


def test_nature_network_has_pfrl_initialization():
    torch.manual_seed(0)
    net = dqn.QNetwork(18, 18.0)
    found = layers(net)
    assert [tuple(m.weight.shape) for m in found] == [(32, 4, 8, 8), (64, 32, 4, 4), (64, 64, 3, 3), (512, 3136), (18, 512)]
    for layer, fan_in, bias in zip(found, [256, 512, 576, 3136, 512], [0.1, 0.1, 0.1, 0.1, 0.0]):
        w = layer.weight.detach()
        assert w.std().item() == pytest.approx(fan_in**-0.5, rel=0.05)  # LeCun normal: std 1/sqrt(fan_in)
        assert abs(w.mean().item()) < 0.1 * fan_in**-0.5
        assert torch.equal(layer.bias.detach(), torch.full_like(layer.bias, bias))


@pytest.mark.parametrize("network", ["dueling", "rdq"])
def test_dueling_and_rdq_networks_have_pfrl_initialization(network):
    torch.manual_seed(0)
    net = dqn.make_network(dqn.Args(network=network), 18, 0.0)
    convs = [m for m in layers(net) if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 3 and all(torch.equal(c.bias.detach(), torch.full_like(c.bias, 0.03)) for c in convs)
    streams = layers(net.value) + layers(net.advantage)
    assert [tuple(m.weight.shape) for m in streams] == [(512, 3136), (1, 512), (512, 3136), (18, 512)]
    for layer in streams:
        assert not layer.bias.detach().any()
        assert layer.weight.detach().std().item() == pytest.approx(layer.weight.shape[1] ** -0.5, rel=0.1)


def fixed_streams(network: str, me_coef: float = 0.0):
    """A dueling/RDQ network whose V is 2 and A is (1, -1, 3) in every state."""
    net = dqn.make_network(dqn.Args(network=network), 3, me_coef)
    for stream, bias in ((net.value, [2.0]), (net.advantage, [1.0, -1.0, 3.0])):
        torch.nn.init.zeros_(stream[-1].weight)
        stream[-1].bias.data = torch.tensor(bias)
    return net


def test_dueling_q_is_v_plus_a_minus_mean_a_and_rdq_q_is_v_plus_a():
    x = frames([0, 1])
    torch.testing.assert_close(fixed_streams("dueling")(x), torch.tensor([[2.0, 0.0, 4.0]] * 2))  # 2 + A - 1
    torch.testing.assert_close(fixed_streams("rdq")(x), torch.tensor([[3.0, 1.0, 5.0]] * 2))  # 2 + A
    # an explicit k > 0 applies the layer to their Q: [2, 0, 4] + 3 * mean = [8, 6, 10]
    torch.testing.assert_close(fixed_streams("dueling", me_coef=3.0)(x), torch.tensor([[8.0, 6.0, 10.0]] * 2))
    v, a = fixed_streams("dueling").streams(x)
    torch.testing.assert_close(v, torch.tensor([[2.0]] * 2))


def test_rdq_loss_adds_the_penalty_on_v_and_a():
    net = fixed_streams("rdq")
    batch = dqn.Batch(obs=frames([0, 1]), actions=torch.tensor([0, 2]), rewards=torch.tensor([3.0, 0.0]),
                      next_obs=frames([1, 0]), terminated=torch.zeros(2), truncated=torch.zeros(2))
    args = dqn.Args(network="rdq", loss="mse", gamma=0.99, rdq_penalty=1e-3)
    loss, q = dqn.td_loss(net, net, batch, args)
    # Q = (3, 1, 5) everywhere; targets 1 + 0.99 * 5 and 0 + 0.99 * 5; taken Q 3 and 5
    td = ((5.95 - 3.0) ** 2 + (4.95 - 5.0) ** 2) / 2 / 2
    penalty = 1e-3 * (2.0**2 + 1.0 + 1.0 + 9.0) / 2  # beta * (V^2 + sum_b A(b)^2) / 2, the same for every state
    assert loss.item() == pytest.approx(td + penalty, abs=1e-6)
    plain, _ = dqn.td_loss(net, net, batch, dqn.Args(network="dueling", loss="mse", gamma=0.99))
    assert plain.item() != pytest.approx(loss.item())  # dueling has no penalty (and another Q)


def test_default_k_is_zero_for_the_dueling_baselines():
    assert dqn.default_me_coef(dqn.Args(), 18) == 18.0
    assert dqn.default_me_coef(dqn.Args(network="dueling"), 18) == 0.0
    assert dqn.default_me_coef(dqn.Args(network="rdq"), 18) == 0.0
    assert iqn.default_me_coef(iqn.Args(), 18) == 18.0


def test_iqn_keeps_pytorchs_default_initialization():
    torch.manual_seed(0)
    net = iqn.IQNNetwork(18, 18.0)
    assert all(layer.bias.detach().std().item() > 0 for layer in layers(net))  # random biases, not constants
    conv = layers(net)[0]  # PyTorch's kaiming_uniform(a=sqrt(5)): std 1/sqrt(3 fan_in)
    assert conv.weight.detach().std().item() == pytest.approx((3 * 256) ** -0.5, rel=0.05)


def test_final_evaluation_episodes_default():
    assert dqn.Args().final_eval_episodes == 30
    assert iqn.Args().final_eval_episodes == 200


# ---------------------------------------------------------------------------
# Bad flags of the new rows
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("flags,words", [
    (["--rdq-penalty", "0.01"], ["--rdq-penalty applies to --network rdq only"]),
    (["--network", "rdq", "--rdq-penalty", "-1"], ["--rdq-penalty must be >= 0 (got -1.0)"]),
    (["--optimizer", "rmsprop", "--optimizer-eps", "0"], ["--optimizer-eps must be > 0 (got 0.0)"]),
])
def test_bad_row_flags_are_refused(in_tmp, capsys, flags, words):
    with pytest.raises(SystemExit) as exit_info:
        dqn.main(dqn.parse_args(flags))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert all(word in err for word in words), err
    assert not (in_tmp / "runs").exists()


@pytest.mark.parametrize("flags", [["--loss", "l1"], ["--optimizer", "sgd"], ["--network", "mlp"]])
def test_unknown_choices_are_refused_with_the_allowed_ones(flags, capsys):
    with pytest.raises(SystemExit) as exit_info:
        dqn.parse_args(flags)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert flags[1] in err


# ---------------------------------------------------------------------------
# A run records its row; --save-model writes the network even when no update was made
# ---------------------------------------------------------------------------


def test_a_baseline_run_records_its_row_and_saves_its_network(in_tmp, monkeypatch):
    seeds = []
    make_env = dqn.make_env
    monkeypatch.setattr(dqn, "make_env", lambda args, seed, *a, **kw: seeds.append((seed, kw.get("evaluation", False)))
                        or make_env(args, seed, *a, **kw))
    args = dqn.parse_args(["--env-id", "ALE/Pong-v5", "--network", "dueling", "--optimizer", "rmsprop", "--loss", "huber",
                           "--seed", "3", "--total-timesteps", "100", "--learning-starts", "200", "--buffer-size", "500",
                           "--batch-size", "8", "--eval-interval", "0", "--final-eval-episodes", "1",
                           "--max-episode-steps", "40", "--run-name", "row", "--save-model", "--no-cuda"])
    dqn.main(args)
    run_dir = in_tmp / "runs" / "row"
    config = json.loads((run_dir / "config.json").read_text())
    assert {k: config[k] for k in ("network", "loss", "optimizer", "learning_rate", "optimizer_eps", "me_coef",
                                   "me_coef_default")} == dict(network="dueling", loss="huber", optimizer="rmsprop",
                                                               learning_rate=2.5e-4, optimizer_eps=0.01, me_coef=0.0,
                                                               me_coef_default=True)
    assert (2**31 - 1 - 3, True) in seeds  # the authors' evaluation seed
    saved = torch.load(run_dir / "dqn_atari_meanexp.cleanrl_model")  # learning never started: the initial network
    net = dqn.DuelingNetwork(18, 0.0, regularized=False)
    net.load_state_dict(saved)
    assert torch.equal(saved["torso.0.bias"], torch.full((32,), 0.03))
    final = json.loads((run_dir / "final_eval.json").read_text())
    assert final["episodes"] == 1 and final["truncated_episodes"] in (0, 1)
    assert set(dqn.EVAL_STATISTICS) <= set(final)
