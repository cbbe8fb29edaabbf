"""The paper's claims 2 and 3 need the authors' statistics in every evaluation row (their DQN agent's get_statistics):
average_q (the last 1,000 training-batch Q values), average_action_gap (measured at every target sync on replay
states, in eval mode) and relative_action_gap. The measurement must not move a single training draw."""

import copy
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import dqn_atari_meanexp as dqn
import dqn_minatar_meanexp as mz
import iqn_atari_meanexp as iqn
from conftest import ROOT
from test_replay_buffer import make_stamp_envs, run_into_buffer
from test_resume import SMALL_IQN, TINY, load_model, scalars

SCRIPTS = {"dqn": dqn, "iqn": iqn}


@pytest.mark.parametrize("script", [dqn, mz], ids=["atari", "minatar"])  # MinAtar's are the Atari script's, word for word
def test_average_q_is_the_mean_of_the_last_1000_values_and_the_gap_record_empties_at_each_row(script):
    state = script.LoopState(obs=None, resetting=None, sums=None, bad_step=None, updates_from=(0, 0))
    for batch in range(30):  # 1,200 values in batches of 40: the ring wraps, keeping 200..1199
        script.record_q(state, torch.arange(40 * batch, 40 * batch + 40, dtype=torch.float32))
    state.gap_record = [1.0, 2.0]
    claims = script.claim_statistics(state)
    assert claims["average_q"] == 699.5 and claims["average_action_gap"] == 1.5
    assert claims["relative_action_gap"] == 1.5 / (699.5 + 1e-8)
    assert state.gap_record == []  # the authors' record is emptied when a row reads it
    again = script.claim_statistics(state)
    assert again["average_q"] == 699.5 and again["average_action_gap"] is None and again["relative_action_gap"] is None
    split = script.LoopState(obs=None, resetting=None, sums=None, bad_step=None, updates_from=(0, 0))
    for batch in range(40):  # batches of 32: the 32nd batch straddles the ring's end, its last 8 values wrap to its start
        script.record_q(split, torch.arange(32 * batch, 32 * batch + 32, dtype=torch.float32))
    assert split.q_record.tolist() == [float(v if v >= 280 else v + 1000) for v in range(1000)]  # value v in slot v % 1000
    assert split.q_recorded == 1280 and script.claim_statistics(split)["average_q"] == 779.5
    fresh = script.LoopState(obs=None, resetting=None, sums=None, bad_step=None, updates_from=(0, 0))
    assert script.claim_statistics(fresh) == {"average_q": None, "average_action_gap": None, "relative_action_gap": None}
    script.record_q(fresh, torch.tensor([-4.0, -2.0]))  # the denominator is |average_q|
    fresh.gap_record = [0.5]
    assert script.claim_statistics(fresh)["relative_action_gap"] == 0.5 / (3.0 + 1e-8)


def stamped_buffer(num_envs=2, seed=3):
    envs = make_stamp_envs(num_envs, max_steps=9)
    rb = dqn.ReplayBuffer(64, num_envs, torch.device("cpu"), seed=seed)
    run_into_buffer(envs, rb, steps=50)
    return rb


def test_the_gap_states_are_the_observations_sample_would_draw_with_the_same_generator():
    rb = stamped_buffer()
    twin = copy.deepcopy(rb)
    twin.rng.bit_generator.state = np.random.default_rng(11).bit_generator.state
    states = rb.sample_states(40, np.random.default_rng(11))
    assert torch.equal(states, twin.sample(40).obs)  # the same stacks, episode starts repeated alike


class TwoLevels(torch.nn.Module):
    """Q(s, .) from the stamp in the newest frame: (stamp, 0, 0.25 * stamp), so the gap of a state is 0.75 * stamp."""

    def __init__(self):
        super().__init__()
        self.modes = []

    def q_values(self, obs):
        self.modes.append(self.training)
        stamp = obs[:, -1, 0, 2].float()  # the step within the episode (StampEnv)
        return torch.stack([stamp, torch.zeros_like(stamp), 0.25 * stamp], dim=1)


def test_the_gap_is_the_mean_top_two_difference_in_eval_mode_and_moves_no_training_draw():
    rb, network = stamped_buffer(), TwoLevels()
    rng, twin = np.random.default_rng(5), np.random.default_rng(5)
    rb_state, torch_state = copy.deepcopy(rb.rng.bit_generator.state), torch.get_rng_state()
    gap = dqn.measure_action_gap(network, rb, 20, rng)
    states = rb.sample_states(20, twin)
    assert gap == pytest.approx(0.75 * states[:, -1, 0, 2].float().mean().item(), rel=1e-6)
    assert network.modes == [False] and network.training  # measured in eval mode, and put back
    assert rb.rng.bit_generator.state == rb_state and torch.equal(torch.get_rng_state(), torch_state)


def test_iqn_draws_the_gaps_taus_from_its_own_generator_not_trainings():
    args = iqn.Args(num_quantile_samples=4)
    network = iqn.make_network(args, 5, 5.0)
    rb = stamped_buffer()
    torch.manual_seed(0)
    before = torch.get_rng_state()
    first = iqn.measure_action_gap(network, rb, 8, np.random.default_rng(1))
    assert torch.equal(torch.get_rng_state(), before)  # the loss's taus are drawn as if nothing had been measured
    assert iqn.measure_action_gap(network, rb, 8, np.random.default_rng(1)) == first  # its own draws: repeatable
    assert iqn.measure_action_gap(network, rb, 8, np.random.default_rng(2)) != first


INERT = "import sys; sys.path.insert(0, {root!r}); import {name} as s; s.measure_action_gap = lambda *a: 0.0; s.main(s.parse_args({flags!r}))"


@pytest.mark.parametrize("algo,extra", [("dqn", []), ("iqn", [*SMALL_IQN, "--num-envs", "2"])])
def test_the_statistic_changes_no_training(tmp_path, algo, extra):
    """A run that measures the gap at every sync and one whose measurement is a stub that touches nothing end with the
    same weights, losses and scores, bit for bit; only the first has the claims/ points."""
    flags = [*TINY, "--total-timesteps", "900", *extra, "--save-model"]
    name = f"{algo}_atari_meanexp"
    subprocess.run([sys.executable, os.path.join(ROOT, f"{name}.py"), *flags, "--run-name", "measured"], cwd=tmp_path,
                   check=True, capture_output=True)
    code = INERT.format(root=ROOT, name=name, flags=[*flags, "--run-name", "inert"])
    subprocess.run([sys.executable, "-c", code], cwd=tmp_path, check=True, capture_output=True)
    a, b = (load_model(tmp_path / f"runs/{r}/{name}.cleanrl_model") for r in ("measured", "inert"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    final_a, final_b = (json.loads((tmp_path / f"runs/{r}/final_eval.json").read_text()) for r in ("measured", "inert"))
    assert final_a["scores"] == final_b["scores"] and final_a["overestimation"] == final_b["overestimation"]
    logs_a, logs_b = scalars(tmp_path / "runs/measured"), scalars(tmp_path / "runs/inert")
    for tag in ("losses/td_loss", "losses/q_values", "eval/episodic_return"):
        assert logs_a[tag] == logs_b[tag], tag
    evaluations = [step for step, _ in logs_a["eval/episodic_return"]]
    assert [step for step, _ in logs_a["claims/average_action_gap"]] == evaluations  # a sync before every evaluation
    assert [step for step, _ in logs_a["claims/relative_action_gap"]] == evaluations
    assert {value for _, value in logs_b["claims/average_action_gap"]} == {0.0}  # the stub's
