"""Long runs survive: exact resume after SIGTERM, kill -9 during a checkpoint write, divergence, and
the pieces a checkpoint is made of (env snapshots, the replay buffer's state)."""

import gzip
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import longrun
import dqn_atari_meanexp as dqn
from conftest import ROOT
from test_replay_buffer import make_stamp_envs, run_into_buffer

TINY = ["--env-id", "ALE/Breakout-v5", "--total-timesteps", "1200", "--learning-starts", "200", "--buffer-size", "1000",
        "--batch-size", "8", "--eval-interval", "300", "--eval-steps", "100", "--final-eval-episodes", "2",
        "--max-episode-steps", "120", "--log-interval", "100", "--target-network-frequency", "100", "--no-cuda"]
SMALL_IQN = ["--num-tau-samples", "8", "--num-tau-prime-samples", "8", "--num-quantile-samples", "8"]


def script(algo):
    return os.path.join(ROOT, f"{algo}_atari_meanexp.py")


def run(algo, cwd, *flags, code=0):
    proc = subprocess.run([sys.executable, script(algo), *flags], cwd=cwd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == code, proc.stdout + proc.stderr
    return proc


def start(algo, cwd, *flags):
    return subprocess.Popen([sys.executable, "-u", script(algo), *flags], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def scalars(run_dir):
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def load_model(path):
    return torch.load(path, map_location="cpu")


# ---------------------------------------------------------------------------
# The pieces
# ---------------------------------------------------------------------------


def play(env, actions):
    """What an env shows for a sequence of actions, resetting it when an episode ends."""
    seen = []
    for a in actions:
        obs, reward, terminated, truncated, info = env.step(int(a))
        episode = {k: v for k, v in info.get("episode", {}).items() if k != "t"}  # "t" is wall-clock time
        seen.append((obs.tobytes(), reward, terminated, truncated, str(episode)))
        if terminated or truncated:
            seen.append(env.reset()[0].tobytes())
    return seen


@pytest.mark.parametrize("flags", [dict(), dict(episodic_life=True, fire_reset=True, noop_max=5)])
def test_env_snapshot_replays_the_same_games(flags):
    """Sticky actions (p = 0.25), no-op starts, lives, time limits: at any moment, an env restored from a
    snapshot plays on exactly as the original, whatever state and last action it had before."""
    args = dqn.Args(env_id="ALE/Breakout-v5", max_episode_steps=50, **flags)
    original, other = dqn.make_env(args, seed=1)(), dqn.make_env(args, seed=7)()
    original.reset(seed=1)
    other.reset(seed=7)
    rng = np.random.default_rng(0)
    ends = 0
    for _ in range(12):  # a snapshot every 30 steps, each replayed in the other env
        snapshot = original.snapshot
        actions = rng.integers(18, size=30)
        expected = play(original, actions)
        ends += sum(len(x) == 5 and (x[2] or x[3]) for x in expected)
        play(other, rng.integers(18, size=3))  # the other env moves on: another state, another last action
        other.snapshot = snapshot
        assert play(other, actions) == expected
    assert ends >= 4  # episodes ended (by the time limit, lost lives) within what was compared
    snapshot = original.snapshot
    actions = rng.integers(18, size=60)
    expected = play(original, actions)
    original.snapshot = snapshot  # restoring into the env that moved on works too
    assert play(original, actions) == expected


def test_sticky_actions_are_the_wrappers_not_the_emulators():
    """ALE's saved state lacks the last action that sticky actions repeat, so stickiness lives in a wrapper."""
    env = dqn.make_env(dqn.Args(env_id="ALE/Pong-v5"), seed=1)()
    wrappers = []
    while env is not env.unwrapped:
        wrappers.append(env)
        env = env.env
    sticky = [w for w in wrappers if isinstance(w, dqn.gym.wrappers.StickyAction)]
    assert len(sticky) == 1 and sticky[0].repeat_action_probability == 0.25
    assert env.ale.getFloat("repeat_action_probability") == 0.0  # the emulator repeats nothing itself


def test_env_workers_leave_signals_to_the_main_process():
    """The main process keeps its SIGTERM handler and Ctrl-C (AsyncVectorEnv builds one env in it too);
    the workers ignore both, so that the main process can still save their games when SLURM signals them all."""
    received = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
    try:
        envs = dqn.make_train_envs(dqn.Args(env_id="ALE/Pong-v5", num_envs=2), run_dir="")
        envs.reset(seed=0)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        for process in envs.processes:
            os.kill(process.pid, signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.5)
        assert received == [signal.SIGTERM] and all(process.is_alive() for process in envs.processes)
        assert len(envs.get_attr("snapshot")) == 2  # the workers still answer
        envs.close()
    finally:
        signal.signal(signal.SIGTERM, previous)


@pytest.mark.parametrize("num_envs,slots,steps", [(1, 50, 30), (3, 20, 70)])
def test_replay_state_round_trips_through_a_file(tmp_path, num_envs, slots, steps):
    envs = make_stamp_envs(num_envs, max_steps=9)
    rb = dqn.ReplayBuffer(slots * num_envs, num_envs, torch.device("cpu"), seed=4)
    run_into_buffer(envs, rb, steps)
    rb.sample(5)  # the sampling RNG has moved on: its state must travel too
    torch.save(rb.state_dict(), tmp_path / "rb.pt")
    frame_bytes = num_envs * rb.filled * 84 * 84
    assert frame_bytes <= os.path.getsize(tmp_path / "rb.pt") <= frame_bytes * 1.01 + 50_000  # only the filled part
    copy = dqn.ReplayBuffer(slots * num_envs, num_envs, torch.device("cpu"), seed=99)
    copy.load_state_dict(torch.load(tmp_path / "rb.pt", weights_only=False, mmap=True))
    for name in ("frames", *dqn.ReplayBuffer.FIELDS):
        np.testing.assert_array_equal(getattr(copy, name), getattr(rb, name), err_msg=name)
    assert (copy.cursor, copy.filled) == (rb.cursor, rb.filled)
    for a, b in zip(rb.sample(16), copy.sample(16)):
        assert torch.equal(a, b)


def test_atomic_save_keeps_the_old_file_when_a_write_dies(tmp_path):
    path = str(tmp_path / "checkpoint.pt")
    longrun.atomic_save(path, lambda tmp: torch.save({"step": 1}, tmp))

    def dies_halfway(tmp):
        with open(tmp, "wb") as f:
            f.write(b"half a checkpoint")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        longrun.atomic_save(path, dies_halfway)
    assert torch.load(path) == {"step": 1}
    longrun.atomic_save(path, lambda tmp: torch.save({"step": 2}, tmp))  # a stale temporary file is simply replaced
    assert torch.load(path) == {"step": 2} and not os.path.exists(path + ".tmp")


# ---------------------------------------------------------------------------
# Whole runs
# ---------------------------------------------------------------------------


def interrupt(proc, at_step, sig=signal.SIGTERM):
    """Sends sig once the run's progress line passes at_step; returns the run's output."""
    for line in proc.stdout:
        if line.startswith("step ") and int(line.split()[1].split("/")[0].replace(",", "")) >= at_step:
            proc.send_signal(sig)
            break
    output = proc.stdout.read()
    proc.wait(timeout=300)
    return output


@pytest.mark.parametrize("algo,extra,sig", [("dqn", [], signal.SIGTERM), ("dqn", [], signal.SIGINT),
                                             ("iqn", [*SMALL_IQN, "--num-envs", "2", "--episodic-life"], signal.SIGTERM)])
def test_a_stopped_then_resumed_run_equals_an_uninterrupted_run(tmp_path, algo, extra, sig):
    """SIGTERM (a batch system) or Ctrl-C (SIGINT). Bitwise: CPU PyTorch is deterministic here, so weights, losses
    and scores must be exactly equal."""
    flags = [*TINY, *extra, "--save-model", "--progress-interval", "0.001"]
    run(algo, tmp_path, *flags, "--run-name", "straight")
    proc = start(algo, tmp_path, *flags, "--run-name", "cut")
    output = interrupt(proc, at_step=500, sig=sig)  # after learning started, between evaluations
    assert proc.returncode == (longrun.EXIT_INTERRUPTED if sig == signal.SIGINT else longrun.EXIT_REQUEUE), output
    assert f"signal {sig.name}: checkpoint at step" in output and "--resume runs/cut" in output and "Traceback" not in output
    stopped_at = torch.load(tmp_path / "runs/cut/checkpoint.pt", weights_only=False, mmap=True)["global_step"]
    assert 500 <= stopped_at < 1200 and not (tmp_path / "runs/cut/final_eval.json").exists()
    resumed = run(algo, tmp_path, "--resume", "runs/cut")
    assert f"resumed runs/cut at step {stopped_at:,}" in resumed.stdout

    name = f"{algo}_atari_meanexp"
    a, b = load_model(tmp_path / f"runs/straight/{name}.cleanrl_model"), load_model(tmp_path / f"runs/cut/{name}.cleanrl_model")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    best_a, best_b = (load_model(tmp_path / f"runs/{r}/{name}_best.cleanrl_model") for r in ("straight", "cut"))
    assert all(torch.equal(best_a[k], best_b[k]) for k in best_a)
    logs_a, logs_b = scalars(tmp_path / "runs/straight"), scalars(tmp_path / "runs/cut")
    assert logs_a.keys() == logs_b.keys()
    for tag in logs_a:  # every point once, at the same steps, with the same values (SPS is a time)
        steps = [s for s, _ in logs_b[tag]]
        if not tag.startswith("charts/episodic"):  # two envs may end episodes at the same step
            assert steps == sorted(set(steps)), tag
        if tag == "charts/SPS":
            assert steps == [s for s, _ in logs_a[tag]]
        else:
            assert logs_a[tag] == logs_b[tag], tag
    assert any(s > stopped_at for s, _ in logs_b["losses/td_loss"]) and any(s < stopped_at for s, _ in logs_b["losses/td_loss"])
    final_a, final_b = (json.loads((tmp_path / f"runs/{r}/final_eval.json").read_text()) for r in ("straight", "cut"))
    assert final_a["scores"] == final_b["scores"] and final_a["overestimation"] == final_b["overestimation"]
    config = json.loads((tmp_path / "runs/cut/config.json").read_text())
    assert [r["step"] for r in config["resumes"]] == [stopped_at] and "--resume runs/cut" in config["resumes"][0]["command"]
    assert "--run-name cut" in config["command"]  # the first command stays
    straight = json.loads((tmp_path / "runs/straight/config.json").read_text())
    differ = ("run_name", "resume", "command", "resumes")  # every other setting, me_coef_default included, is the run's own
    assert {k: v for k, v in config.items() if k not in differ} == {k: v for k, v in straight.items() if k not in differ}
    assert config["me_coef_default"] is True  # plot_results.py groups runs by it


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGINT])
def test_a_signal_during_the_final_evaluation_exits_at_once_and_resume_finishes_it(tmp_path, sig):
    flags = [*TINY, "--final-eval-episodes", "20", "--progress-interval", "0.001", "--run-name", "f"]
    proc = start("dqn", tmp_path, *flags)
    output = interrupt(proc, at_step=1200, sig=sig)  # the last progress line: the final evaluation follows
    assert proc.returncode == (longrun.EXIT_INTERRUPTED if sig == signal.SIGINT else longrun.EXIT_REQUEUE), output
    assert f"signal {sig.name}: checkpoint at step 1,200" in output and "final evaluation:" not in output
    assert "it holds the whole training" in output
    assert not (tmp_path / "runs/f/final_eval.json").exists()
    resumed = run("dqn", tmp_path, "--resume", "runs/f")
    assert "resumed runs/f at step 1,200" in resumed.stdout
    final = json.loads((tmp_path / "runs/f/final_eval.json").read_text())
    assert (final["total_steps"], final["episodes"]) == (1200, 20)


def test_kill_9_during_a_checkpoint_write_leaves_a_loadable_checkpoint(tmp_path):
    flags = [*TINY, "--env-id", "ALE/Pong-v5", "--total-timesteps", "900", "--checkpoint-interval", "50", "--run-name", "k"]
    proc = start("dqn", tmp_path, *flags)
    run_dir = tmp_path / "runs" / "k"
    checkpoint, tmp = run_dir / "checkpoint.pt", run_dir / "checkpoint.pt.tmp"
    killed_while_writing = False
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline:
        if checkpoint.exists() and tmp.exists():  # a checkpoint is being written, and an older one exists
            proc.kill()  # SIGKILL: no handler runs
            killed_while_writing = True
            break
    proc.wait(timeout=60)
    assert killed_while_writing, "never caught a checkpoint write in progress"
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    assert state["algo"] == "dqn" and state["global_step"] < 900
    run("dqn", tmp_path, "--resume", "runs/k")  # and the run goes on from it
    logs = scalars(run_dir)
    for tag, points in logs.items():  # what the killed process logged after its checkpoint is not counted twice
        steps = [s for s, _ in points]
        assert steps == sorted(set(steps)), tag  # (one env: one episode end per step at most)
    assert [s for s, _ in logs["charts/epsilon"]] == list(range(100, 901, 100))
    assert json.loads((run_dir / "final_eval.json").read_text())["total_steps"] == 900


def test_a_diverging_run_stops_naming_the_step_and_keeps_its_last_good_checkpoint(tmp_path):
    flags = [*TINY, "--env-id", "ALE/Pong-v5", "--learning-rate", "1e30", "--checkpoint-interval", "100", "--run-name", "nan"]
    proc = run("dqn", tmp_path, *flags, code=longrun.EXIT_NON_FINITE)
    assert "not finite appeared at step" in proc.stderr
    step = int(proc.stderr.split("appeared at step ")[1].split(";")[0].replace(",", ""))
    assert 200 < step <= 300  # the first updates (from step 204) blow up
    state = torch.load(tmp_path / "runs/nan/checkpoint.pt", map_location="cpu", weights_only=False)
    assert state["global_step"] == 200 and f"of step 200, is kept in runs/nan/{longrun.CHECKPOINT}" in proc.stderr
    assert all(v.isfinite().all() for v in state["q_network"].values())


def test_without_the_buffer_a_resumed_run_refills_it_before_learning(tmp_path):
    flags = [*TINY, "--env-id", "ALE/Pong-v5", "--no-checkpoint-buffer", "--progress-interval", "0.001", "--run-name", "nb"]
    proc = start("dqn", tmp_path, *flags)
    output = interrupt(proc, at_step=500, sig=signal.SIGUSR1)  # SLURM's usual warning signal
    assert "signal SIGUSR1: checkpoint at step" in output and proc.returncode == longrun.EXIT_REQUEUE
    state = torch.load(tmp_path / "runs/nb/checkpoint.pt", weights_only=False)
    assert state["replay"] is None
    stopped_at, updates_then = state["global_step"], state["updates"]
    run("dqn", tmp_path, "--resume", "runs/nb")
    updates = dict(scalars(tmp_path / "runs/nb")["charts/updates"])
    # no update until --learning-starts (200) new transitions are in, then one every 4 steps again
    for step, count in updates.items():
        if step > stopped_at:
            assert count == updates_then + max(0, (step - stopped_at - 200) // 4), step


def test_finished_runs_are_left_alone_or_extended(tmp_path):
    flags = [*TINY, "--env-id", "ALE/Pong-v5", "--total-timesteps", "400", "--eval-interval", "0", "--run-name", "f"]
    run("dqn", tmp_path, *flags)
    run_dir = tmp_path / "runs" / "f"
    first = (run_dir / "final_eval.json").read_text()
    before = {p.name: p.stat().st_mtime_ns for p in run_dir.iterdir()}
    assert "nothing to do" in run("dqn", tmp_path, "--resume", "runs/f").stdout
    assert {p.name: p.stat().st_mtime_ns for p in run_dir.iterdir()} == before
    run("dqn", tmp_path, "--resume", "runs/f", "--total-timesteps", "600")
    assert json.loads((run_dir / "final_eval.json").read_text())["total_steps"] == 600
    assert (run_dir / "final_eval_step400.json").read_text() == first  # the earlier result is kept
    assert [s for s, _ in scalars(run_dir)["charts/epsilon"]] == list(range(100, 601, 100))


def test_a_second_ctrl_c_while_the_checkpoint_is_written_still_leaves_a_loadable_one(tmp_path):
    proc = start("dqn", tmp_path, *TINY, "--buffer-size", "20000", "--progress-interval", "0.001", "--run-name", "c")
    for line in proc.stdout:
        if line.startswith("step ") and int(line.split()[1].split("/")[0].replace(",", "")) >= 500:
            proc.send_signal(signal.SIGINT)
            time.sleep(0.002)  # the first one is being handled: a checkpoint is being written
            proc.send_signal(signal.SIGINT)
            break
    output = proc.stdout.read()
    proc.wait(timeout=300)
    assert proc.returncode == longrun.EXIT_INTERRUPTED and "Traceback" not in output, output
    state = torch.load(tmp_path / "runs/c/checkpoint.pt", map_location="cpu", weights_only=False)
    assert 500 <= state["global_step"] < 1200 and not (tmp_path / "runs/c/checkpoint.pt.tmp").exists()
    assert "resumed runs/c at step" in run("dqn", tmp_path, "--resume", "runs/c").stdout


def test_a_run_extended_from_n_to_m_steps_equals_a_run_of_m_steps(tmp_path):
    """The 400-step run ends exactly as its episode is truncated (every 100 steps): its env is due to autoreset."""
    flags = [*TINY, "--env-id", "ALE/Pong-v5", "--eval-interval", "0", "--max-episode-steps", "100", "--save-model"]
    run("dqn", tmp_path, *flags, "--total-timesteps", "600", "--run-name", "straight")
    run("dqn", tmp_path, *flags, "--total-timesteps", "400", "--run-name", "ext")
    assert torch.load(tmp_path / "runs/ext/checkpoint.pt", weights_only=False)["resetting"].all()
    run("dqn", tmp_path, "--resume", "runs/ext", "--total-timesteps", "600")
    a, b = (load_model(tmp_path / f"runs/{r}/dqn_atari_meanexp.cleanrl_model") for r in ("straight", "ext"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    logs_a, logs_b = scalars(tmp_path / "runs/straight"), scalars(tmp_path / "runs/ext")
    for tag in ("losses/td_loss", "charts/episodic_return", "charts/episodic_length"):
        assert logs_a[tag] == logs_b[tag], tag
    final_a, final_b = (json.loads((tmp_path / f"runs/{r}/final_eval.json").read_text()) for r in ("straight", "ext"))
    assert (final_a["scores"], final_a["total_steps"]) == (final_b["scores"], final_b["total_steps"])


@pytest.mark.parametrize("commit", ["d1f556d", "2bc82a9"])
@pytest.mark.parametrize("algo,extra", [("dqn", []), ("iqn", SMALL_IQN)])
def test_a_checkpoint_written_by_an_earlier_version_still_resumes(tmp_path, algo, extra, commit):
    """A run that the scripts of an earlier commit stopped with a checkpoint resumes with today's script and ends exactly
    as today's uninterrupted run: d1f556d's, from before issue 23 moved the machinery into longrun.py, and 2bc82a9's,
    from before issue 32 made longrun.py a library and renamed two LoopState fields (tests/data holds them, gzipped)."""
    old = tmp_path / "before" / f"{algo}_atari_meanexp.py"
    old.parent.mkdir()
    for name in [f"{algo}_atari_meanexp"] + (["longrun"] if commit != "d1f556d" else []):
        with open(os.path.join(ROOT, "tests", "data", f"{name}_{commit}.py.gz"), "rb") as f:
            (old.parent / f"{name}.py").write_bytes(gzip.decompress(f.read()))
    flags = [*TINY, *extra, "--save-model", "--progress-interval", "0.001"]
    proc = subprocess.Popen([sys.executable, "-u", str(old), *flags, "--run-name", "cut"], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = interrupt(proc, at_step=500)
    assert proc.returncode == longrun.EXIT_REQUEUE and "checkpoint at step" in output, output
    stopped_at = torch.load(tmp_path / "runs/cut/checkpoint.pt", weights_only=False, mmap=True)["global_step"]
    resumed = run(algo, tmp_path, "--resume", "runs/cut")
    assert f"resumed runs/cut at step {stopped_at:,}" in resumed.stdout
    run(algo, tmp_path, *flags, "--run-name", "straight")
    a, b = (load_model(tmp_path / f"runs/{r}/{algo}_atari_meanexp.cleanrl_model") for r in ("straight", "cut"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    final_a, final_b = (json.loads((tmp_path / f"runs/{r}/final_eval.json").read_text()) for r in ("straight", "cut"))
    assert final_a["scores"] == final_b["scores"] and final_a["overestimation"] == final_b["overestimation"]
    config = json.loads((tmp_path / "runs/cut/config.json").read_text())  # the old run's config.json, one resume more
    assert [r["step"] for r in config["resumes"]] == [stopped_at] and config["algo"] == algo


def test_a_resume_records_its_own_code_and_machine_and_never_lends_them_to_the_run(tmp_path):
    """config.json's command, code and machine are the run's first start's. A run started before those were recorded says
    None, not the resuming process's: its first steps ran on code this process cannot name. The resume lists its own."""
    import longrun

    (tmp_path / "config.json").write_text(json.dumps({"algo": "dqn", "command": "first", "device": "cpu"}))  # no code, machine
    settings = longrun.recorded_settings({"device": "cpu"}, str(tmp_path), {longrun.STEP: 750})
    assert (settings["command"], settings["code"], settings["machine"]) == ("first", None, None)
    (resume,) = settings["resumes"]
    assert resume["step"] == 750 and resume["machine"] == longrun.machine() and resume["code"] == longrun.code_version()
    assert resume["code"] is not None  # the tests run from a git checkout
