"""Bad command lines: a clear message naming the bad value, exit code 2, nothing written or allocated."""

import fcntl
import os
import subprocess
import sys
import time

import pytest
import torch
import tyro

import dqn_atari_meanexp as dqn
import longrun
import iqn_atari_meanexp as iqn
from conftest import ROOT

BAD = [
    (["--env-id", "ALE/Breakuot-v5"], ["'ALE/Breakuot-v5'", "ALE/Breakout-v5"]),  # a typo gets a suggestion
    (["--env-id", "CartPole-v1"], ["'CartPole-v1'", "not an Atari"]),
    (["--me-coef", "-1"], ["--me-coef", "-1.0", ">= 0"]),
    (["--me-coef", "inf"], ["--me-coef", "inf"]),
    (["--batch-size", "64", "--learning-starts", "32"], ["--batch-size 64", "--learning-starts 32"]),
    (["--buffer-size", "0"], ["--buffer-size", "(got 0)"]),
    (["--buffer-size", "-5"], ["--buffer-size", "(got -5)"]),
    (["--buffer-size", "20", "--num-envs", "4", "--batch-size", "2"], ["--buffer-size 20", "4 envs"]),
    (["--num-envs", "0"], ["--num-envs", "(got 0)"]),
    (["--learning-rate", "0"], ["--learning-rate", "(got 0.0)"]),
    (["--total-timesteps", "-1"], ["--total-timesteps", "(got -1)"]),
    (["--gamma", "1.5"], ["--gamma", "(got 1.5)"]),
    (["--eval-epsilon", "2"], ["--eval-epsilon", "[0, 1]"]),
    (["--sticky-action-prob", "-0.1"], ["--sticky-action-prob"]),
    (["--train-frequency", "0"], ["--train-frequency"]),
    (["--final-eval-episodes", "0"], ["--final-eval-episodes"]),
    (["--run-name", "a/b"], ["--run-name", "'a/b'"]),
    (["--compile-mode", "reduce-overhead"], ["--compile-mode reduce-overhead applies with --compile only"]),
]


def run_main(in_tmp, flags, capsys, script=dqn):
    with pytest.raises(SystemExit) as exit_info:
        script.main(tyro.cli(script.Args, args=flags))
    assert exit_info.value.code == 2
    return capsys.readouterr().err


IQN_BAD = [
    (["--num-tau-samples", "0"], ["--num-tau-samples", "(got 0)"]),
    (["--num-tau-prime-samples", "-1"], ["--num-tau-prime-samples", "(got -1)"]),
    (["--num-quantile-samples", "0"], ["--num-quantile-samples", "(got 0)"]),
    (["--kappa", "0"], ["--kappa", "(got 0.0)"]),
    (["--me-coef", "-1"], ["--me-coef", "plain IQN"]),
]
CASES = [(dqn, f, w) for f, w in BAD] + [(iqn, f, w) for f, w in BAD + IQN_BAD]


@pytest.mark.parametrize("script,flags,words", CASES, ids=[f"{s.ALGO} {' '.join(f)}" for s, f, _ in CASES])
def test_bad_value_is_named_and_nothing_is_written(in_tmp, capsys, script, flags, words):
    err = run_main(in_tmp, flags, capsys, script)
    assert err.startswith("error: ")
    for word in words:
        assert word in err
    assert not (in_tmp / "runs").exists()


def test_all_mistakes_are_reported_at_once(in_tmp, capsys):
    err = run_main(in_tmp, ["--me-coef", "-2", "--buffer-size", "0"], capsys)
    assert "--me-coef" in err and "--buffer-size" in err


def test_buffer_larger_than_memory_is_refused_before_allocating(in_tmp, capsys, monkeypatch):
    monkeypatch.setattr(longrun, "available_memory_bytes", lambda: 8 * 10**9)
    err = run_main(in_tmp, ["--buffer-size", "1000000", "--env-id", "ALE/Pong-v5"], capsys)
    assert "the replay buffer needs 7.07 GB (plus 1 GB" in err and "only 8.00 GB" in err
    assert not (in_tmp / "runs").exists()


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_a_replay_buffer_takes_its_memory_when_it_is_made():
    """Its pages are written at once (issue 33), so a run starting after it on the same machine sees the memory gone,
    not only once the ring has filled, hours in."""
    before = resident_bytes()
    rb = dqn.ReplayBuffer(40_000, 2, torch.device("cpu"))
    assert resident_bytes() - before >= 0.95 * rb.nbytes  # 282 MB, every page resident


def test_runs_starting_together_check_their_memory_in_turn(tmp_path, monkeypatch, capsys):
    """A run holds the machine-wide lock from its memory check until its buffer is written (Run.memory_taken); one
    starting meanwhile waits, then sees that memory gone. Here another process is played by a second open file."""
    monkeypatch.setattr(longrun, "MEMORY_LOCK", str(tmp_path / "memory.lock"))
    monkeypatch.setattr(longrun, "held_memory_lock", None)
    other = open(tmp_path / "memory.lock", "a+")
    fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another run is between its check and its buffer
    start = time.monotonic()
    longrun.take_memory_lock(wait_seconds=0.6)
    assert time.monotonic() - start >= 0.6 and longrun.held_memory_lock is None
    out = capsys.readouterr()
    assert "waiting for another run on this machine to take its memory" in out.out
    assert "goes on without counting runs starting at the same time" in out.err
    other.close()  # that run's buffer is written
    longrun.take_memory_lock(wait_seconds=0.6)
    assert longrun.held_memory_lock is not None
    with pytest.raises(BlockingIOError):  # held: a third run would wait
        fcntl.flock(open(tmp_path / "memory.lock"), fcntl.LOCK_EX | fcntl.LOCK_NB)
    longrun.release_memory_lock()
    fcntl.flock(open(tmp_path / "memory.lock"), fcntl.LOCK_EX | fcntl.LOCK_NB)  # free again


def test_a_refused_run_lets_go_of_the_memory_lock(in_tmp, capsys, monkeypatch):
    monkeypatch.setattr(longrun, "MEMORY_LOCK", str(in_tmp / "memory.lock"))
    monkeypatch.setattr(longrun, "available_memory_bytes", lambda: 8 * 10**9)
    run_main(in_tmp, ["--buffer-size", "1000000", "--env-id", "ALE/Pong-v5"], capsys)
    assert longrun.held_memory_lock is None
    fcntl.flock(open(in_tmp / "memory.lock"), fcntl.LOCK_EX | fcntl.LOCK_NB)  # another run would not wait


@pytest.mark.parametrize("script", [dqn, iqn], ids=["dqn", "iqn"])
def test_tf32_is_set_from_the_flag_not_left_to_pytorch(in_tmp, capsys, script):
    """PyTorch's own default is TF32 in cuDNN's convolutions and not in matmuls; main() sets both from --tf32, first
    (here a bad --buffer-size then stops the run)."""
    try:
        for flags, expected in (([], False), (["--tf32"], True)):
            run_main(in_tmp, [*flags, "--buffer-size", "0"], capsys, script)
            assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (expected, expected)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False


def test_existing_run_directory_is_never_overwritten(in_tmp, capsys):
    run_dir = in_tmp / "runs" / "mine"
    run_dir.mkdir(parents=True)
    (run_dir / "final_eval.json").write_text("precious")
    err = run_main(in_tmp, ["--run-name", "mine", "--env-id", "ALE/Pong-v5"], capsys)
    assert "runs/mine already exists" in err
    assert (run_dir / "final_eval.json").read_text() == "precious"


@pytest.mark.parametrize("script,flags,word", [("dqn", ["--me-coef", "-1"], "-1.0"), ("dqn", ["--total-timesteps", "lots"], "lots"),
                                               ("iqn", ["--num-tau-samples", "0"], "(got 0)")])
def test_command_line_exit_code(tmp_path, script, flags, word):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, f"{script}_atari_meanexp.py"), *flags], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert word in proc.stderr
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------------------
# --resume and checkpoint flags: refused before anything is written, and the run directory is left as it was
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A real (tiny) DQN run with its checkpoint; a second directory with its config but no checkpoint."""
    cwd = tmp_path_factory.mktemp("runs")
    flags = ["--env-id", "ALE/Pong-v5", "--total-timesteps", "300", "--learning-starts", "100", "--buffer-size", "500",
             "--batch-size", "8", "--eval-interval", "0", "--final-eval-episodes", "1", "--max-episode-steps", "60", "--no-cuda"]
    for name in ("done", "nockpt"):
        proc = subprocess.run([sys.executable, os.path.join(ROOT, "dqn_atari_meanexp.py"), *flags, "--run-name", name],
                              cwd=cwd, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
    os.remove(cwd / "runs" / "nockpt" / "checkpoint.pt")
    (cwd / "runs" / "foreign").mkdir()
    (cwd / "runs" / "foreign" / "notes.txt").write_text("not a run")
    (cwd / "runs" / "garbled").mkdir()
    (cwd / "runs" / "garbled" / "config.json").write_text("{ half a json")
    return cwd


def listing(root):
    return sorted((str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*"))


RESUME_BAD = [
    (dqn, ["--resume", "runs/missing"], ["--resume 'runs/missing': no such directory"]),
    (dqn, ["--resume", "runs/foreign"], ["'runs/foreign' is not a run directory", "config.json"]),
    (iqn, ["--resume", "runs/garbled"], ["'runs/garbled' is not a run directory"]),
    (iqn, ["--resume", "runs/done"], ["'runs/done' is a run of dqn_atari_meanexp.py: resume it with that script"]),
    (dqn, ["--resume", "runs/nockpt"], ["'runs/nockpt' has no checkpoint.pt", "remove or rename the directory"]),
    (dqn, ["--resume", "runs/done", "--learning-rate", "0.001"], ["--learning-rate 0.001 differs from the run's 6.25e-05",
                                                                  "--total-timesteps"]),
    (dqn, ["--resume", "runs/done", "--me-coef", "0"], ["--me-coef 0.0 differs from the run's 18.0"]),
    (dqn, ["--resume", "runs/done", "--run-name", "other"], ["--run-name other differs from the run's done"]),
    (dqn, ["--resume", "runs/done", "--total-timesteps", "100"], ["--total-timesteps 100 is below the 300 steps"]),
    (dqn, ["--resume", "runs/done", "--checkpoint-interval", "-1"], ["--checkpoint-interval must be >= 0 (got -1)"]),
    (iqn, ["--checkpoint-interval", "-5"], ["--checkpoint-interval must be >= 0 (got -5)"]),
    (dqn, ["--sticky-action-prob", "1"], ["--sticky-action-prob must be in [0, 1) (got 1.0)"]),
]


@pytest.mark.parametrize("script,flags,words", RESUME_BAD, ids=[f"{s.ALGO} {' '.join(f)}" for s, f, _ in RESUME_BAD])
def test_bad_resume_is_refused_and_changes_nothing(finished_run, monkeypatch, capsys, script, flags, words):
    monkeypatch.chdir(finished_run)
    before = listing(finished_run)
    with pytest.raises(SystemExit) as exit_info:
        script.main(script.parse_args(flags))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    for word in words:
        assert word in err
    assert listing(finished_run) == before  # nothing written, nothing half-created


def test_resume_from_the_command_line_exits_2(finished_run):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "iqn_atari_meanexp.py"), "--resume", "runs/done"],
                          cwd=finished_run, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "is a run of dqn_atari_meanexp.py" in proc.stderr


@pytest.mark.parametrize("module", ["dqn_atari_meanexp", "iqn_atari_meanexp", "dqn_minatar_meanexp", "dqn_meanexp"])
def test_every_float_flag_of_every_script_refuses_nan_and_infinities_by_name(module, capsys):
    """NaN and ±inf of any float flag train to NaN or never act (an epsilon, a kappa): each is refused, naming its flag.
    Every float field of the script's Args, so that a flag added later is held to it too."""
    import dataclasses
    import importlib

    script = importlib.import_module(module)
    names = [f.name for f in dataclasses.fields(script.Args) if f.type in (float, "float")]
    assert len(names) >= 5
    missed = []
    for name in names:
        for value in (float("nan"), float("inf"), float("-inf")):
            args, flag = script.Args(**{name: value}), f"--{name.replace('_', '-')}"
            if module == "dqn_meanexp":  # it refuses with exit 2 itself, naming every error on stderr
                with pytest.raises(SystemExit) as exit_:
                    script.check_args(args, [])
                named = exit_.value.code == 2 and flag in capsys.readouterr().err
            else:  # the script's checks and longrun's of its own flags, which check_command_line joins
                named = any(e.startswith(flag) for e in script.check_args(args) + longrun.check_flags(args))
            if not named:
                missed.append((name, value))
    assert missed == []
