"""--fire-reset: the ball is launched after every lost life where a lost life does not end the episode (evaluation,
and training without --episodic-life), as at reset; without the flag nothing presses FIRE."""

import pytest

import dqn_atari_meanexp as dqn
import iqn_atari_meanexp as iqn

NOOP = 0


def play_noop(env, max_steps=5_000):
    """Plays NOOP only (a policy that never chooses FIRE) until the episode ends; returns (steps, terminated, lives)."""
    env.reset(seed=1)
    for step in range(1, max_steps + 1):
        _, _, terminated, truncated, _ = env.step(NOOP)
        if terminated or truncated:
            return step, terminated, env.unwrapped.ale.lives()
    return max_steps, False, env.unwrapped.ale.lives()


@pytest.mark.parametrize("script", [dqn, iqn])
def test_evaluation_games_go_on_after_a_lost_life(script):
    args = script.Args(env_id="ALE/Breakout-v5", fire_reset=True, episodic_life=True)
    steps, terminated, lives = play_noop(script.make_env(args, 1, evaluation=True)())
    assert terminated and lives == 0 and steps < 2_000  # all 5 lives lost, far from the 27,000-step cap


def test_training_without_episodic_life_launches_the_ball_too():
    args = dqn.Args(env_id="ALE/Breakout-v5", fire_reset=True, episodic_life=False)
    steps, terminated, lives = play_noop(dqn.make_env(args, 1)())
    assert terminated and lives == 0 and steps < 2_000


def test_with_episodic_life_training_still_ends_the_episode_at_each_lost_life():
    args = dqn.Args(env_id="ALE/Breakout-v5", fire_reset=True, episodic_life=True)
    env = dqn.make_env(args, 1)()
    steps, terminated, lives = play_noop(env)
    assert terminated and lives == 4  # the first lost life ends the training episode, as before


def test_without_fire_reset_nothing_presses_fire():
    args = dqn.Args(env_id="ALE/Breakout-v5", fire_reset=False)
    steps, terminated, lives = play_noop(dqn.make_env(args, 1, evaluation=True)(), max_steps=3_000)
    assert not terminated and lives == 5  # the ball was never launched: the game waits
