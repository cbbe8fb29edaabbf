"""Bad command lines: a clear message naming the bad value, exit code 2, nothing written or allocated."""

import os
import subprocess
import sys

import pytest
import tyro

import dqn_atari_meanexp as dqn
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
    monkeypatch.setattr(dqn, "available_memory_bytes", lambda: 8 * 10**9)
    err = run_main(in_tmp, ["--buffer-size", "1000000", "--env-id", "ALE/Pong-v5"], capsys)
    assert "--buffer-size 1000000 needs 7.07 GB (plus 1 GB" in err and "only 8.00 GB" in err
    assert not (in_tmp / "runs").exists()


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
