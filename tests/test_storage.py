"""Storage faults and shared run directories (issue 24), each on a real process: one process per run directory, a
checkpoint write that fails, an unreadable checkpoint, and run_all.sh started twice on one plan."""

import fcntl
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch

import dqn_atari_meanexp as dqn
import longrun
from conftest import ROOT

TINY = ["--env-id", "ALE/Pong-v5", "--total-timesteps", "1200", "--learning-starts", "200", "--buffer-size", "1000",
        "--batch-size", "8", "--eval-interval", "300", "--eval-steps", "100", "--final-eval-episodes", "2",
        "--max-episode-steps", "120", "--log-interval", "100", "--no-cuda", "--progress-interval", "0.001"]


def script(*flags, cwd, limit=None):
    """The DQN script as its own process; limit: the largest file it may write (RLIMIT_FSIZE), a disk that fills up."""
    def set_limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return subprocess.Popen([sys.executable, "-u", os.path.join(ROOT, "dqn_atari_meanexp.py"), *flags], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=set_limit if limit else None)


def wait_for_line(proc, prefix):
    for line in proc.stdout:
        if line.startswith(prefix):
            return line
    raise AssertionError(f"the run ended without a line starting {prefix!r}: {proc.stderr.read()}")


def listing(run_dir):
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in run_dir.iterdir()}


def test_a_second_process_is_refused_while_the_first_finishes_its_run_unharmed(tmp_path):
    first = script(*TINY, "--run-name", "r", cwd=tmp_path)
    wait_for_line(first, "step ")  # training: the run directory is locked and holds its first checkpoint
    first.send_signal(signal.SIGSTOP)  # paused, so that it still runs however long the second takes to look
    run_dir = tmp_path / "runs" / "r"
    before = listing(run_dir)
    for flags in (["--resume", "runs/r"], [*TINY, "--run-name", "r"]):
        second = script(*flags, cwd=tmp_path)
        try:
            out, err = second.communicate(timeout=300)
        except BaseException:
            first.send_signal(signal.SIGCONT)
            raise
        assert second.returncode == 2, out + err
        assert "Traceback" not in err
        if "--resume" in flags:
            assert f"runs/r is in use by another process (pid {first.pid} on {socket.gethostname()}, since" in err, err
        else:
            assert "run directory runs/r already exists" in err, err
        now = listing(run_dir)
        assert set(now) == set(before), set(now) ^ set(before)  # no new file (TensorBoard's, a .tmp, ...)
        assert all(now[name] == before[name] for name in ("config.json", "run.lock"))
    first.send_signal(signal.SIGCONT)
    out, err = first.communicate(timeout=600)
    assert first.returncode == 0, err
    final = json.loads((run_dir / "final_eval.json").read_text())
    config = json.loads((run_dir / "config.json").read_text())
    assert final["total_steps"] == 1200 and "resumes" not in config  # the refused resume is not recorded
    assert len([p for p in run_dir.iterdir() if p.name.startswith("events.")]) == 1  # one writer of TensorBoard events


def test_a_checkpoint_write_that_fails_keeps_the_previous_checkpoint_and_says_how_to_go_on(tmp_path):
    """The checkpoints grow with the replay buffer: the file size limit lets the first through and stops a later one,
    as a disk that fills up would (the kernel answers EFBIG instead of ENOSPC: the same failed write for torch)."""
    flags = [*TINY, "--checkpoint-interval", "300", "--run-name", "full"]
    proc = script(*flags, cwd=tmp_path, limit=32 * 10**6)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == longrun.EXIT_STORAGE, out + err
    assert "Traceback" not in err and "writing the checkpoint of step" in err and "failed" in err
    assert "the temporary file is removed and runs/full/checkpoint.pt still holds step" in err
    assert "then continue with --resume runs/full" in err
    run_dir = tmp_path / "runs" / "full"
    assert not (run_dir / "checkpoint.pt.tmp").exists()
    kept = torch.load(run_dir / "checkpoint.pt", weights_only=False, mmap=True)["global_step"]
    assert f"still holds step {kept:,}" in err
    resumed = script("--resume", "runs/full", cwd=tmp_path)  # room again: the run goes on from the kept checkpoint
    out, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err
    assert f"resumed runs/full at step {kept:,}" in out


def short_run(tmp_path, *flags):
    """A run of 700 steps, with a checkpoint every 300 steps and one at the end (step 700), which --resume with
    --total-timesteps 1200 extends."""
    proc = script(*TINY, "--total-timesteps", "700", "--checkpoint-interval", "300", "--run-name", "t", *flags,
                  cwd=tmp_path)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, out + err
    return tmp_path / "runs" / "t"


def truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def test_a_truncated_checkpoint_is_named_and_an_older_one_takes_over(tmp_path):
    run_dir = short_run(tmp_path, "--keep-checkpoints", "2")
    newest = torch.load(run_dir / "checkpoint.pt", weights_only=False, mmap=True)["global_step"]
    older = sorted(p.name for p in run_dir.glob("checkpoint_step*.pt"))
    assert older == ["checkpoint_step600.pt"] and newest == 700
    truncate(run_dir / "checkpoint.pt")
    (run_dir / "checkpoint.pt.unreadable").write_text("set aside by an earlier resume")  # is kept: a new name is found
    proc = script("--resume", "runs/t", "--total-timesteps", "1200", cwd=tmp_path)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, out + err
    assert "runs/t/checkpoint.pt cannot be read: truncated or corrupted" in err
    assert "resuming from the newest readable checkpoint, runs/t/checkpoint_step600.pt (step 600)" in err
    assert "set aside as runs/t/checkpoint.pt.unreadable1" in err
    assert "resumed runs/t at step 600" in out and (run_dir / "checkpoint.pt.unreadable1").exists()
    assert (run_dir / "checkpoint.pt.unreadable").read_text() == "set aside by an earlier resume"
    config = json.loads((run_dir / "config.json").read_text())
    assert [r["step"] for r in config["resumes"]] == [600]
    assert json.loads((run_dir / "final_eval.json").read_text())["total_steps"] == 1200


def test_a_truncated_checkpoint_with_nothing_older_gets_a_clear_error(tmp_path):
    run_dir = short_run(tmp_path)  # --keep-checkpoints 1: only checkpoint.pt
    assert not list(run_dir.glob("checkpoint_step*.pt"))
    truncate(run_dir / "checkpoint.pt")
    config_before = (run_dir / "config.json").read_text()
    proc = script("--resume", "runs/t", "--total-timesteps", "1200", cwd=tmp_path)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 2 and "Traceback" not in err, out + err
    assert "runs/t/checkpoint.pt cannot be read: truncated or corrupted" in err
    assert "no readable checkpoint is left" in err and "What remains: config.json" in err
    assert (run_dir / "config.json").read_text() == config_before  # no resume recorded
    assert (run_dir / "checkpoint.pt").exists() and not list(run_dir.glob("*.unreadable*"))  # a failed resume renames nothing


def test_a_filesystem_too_small_for_the_checkpoints_is_refused_before_anything_is_written(in_tmp, monkeypatch, capsys):
    monkeypatch.setattr(longrun.shutil, "disk_usage", lambda path: longrun.shutil._ntuple_diskusage(10**9, 10**9, 10**6))
    with pytest.raises(SystemExit) as stop:
        dqn.main(dqn.parse_args(TINY))
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "has 0.00 GB free, but this run's checkpoints need" in err and "--no-checkpoint-buffer makes one" in err
    assert not os.path.exists("runs")


def test_run_all_started_twice_on_one_plan_trains_each_run_once(tmp_path):
    args = ["--algos", "dqn", "--games", "pong", "--seeds", "1-2", "--k", "0", "--max-parallel", "2", "--",
            *TINY[2:], "--total-timesteps", "900"]
    env = {**os.environ, "PYTHON": sys.executable}
    first = subprocess.Popen(["bash", os.path.join(ROOT, "run_all.sh"), *args], cwd=tmp_path, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)
    logs = [tmp_path / "runs" / "_batch" / "logs" / f"pong__dqn__s{s}.log" for s in (1, 2)]
    deadline = time.time() + 300
    while not all(p.exists() and "\nstep " in p.read_text() for p in logs):  # both runs train (and hold their locks)
        assert time.time() < deadline and first.poll() is None, "the first batch did not start its runs"
        time.sleep(0.2)
    holders = [int((tmp_path / "runs" / f"pong__dqn__s{s}" / "run.lock").read_text().split()[1]) for s in (1, 2)]
    for pid in holders:  # paused, so that they are still running however long the second batch takes to look
        os.kill(pid, signal.SIGSTOP)
    for s in (1, 2):  # and still holding their run directories (not finished in the instant before the pause)
        with open(tmp_path / "runs" / f"pong__dqn__s{s}" / "run.lock") as f, pytest.raises(BlockingIOError):
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        second = subprocess.run(["bash", os.path.join(ROOT, "run_all.sh"), *args], cwd=tmp_path, capture_output=True,
                                text=True, env=env, timeout=300)
    finally:
        for pid in holders:
            os.kill(pid, signal.SIGCONT)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "0 finished now, 0 stopped with a checkpoint, 0 failed, 2 running elsewhere, 0 not started" in second.stdout
    for s in (1, 2):
        assert f"running elsewhere, not started here: pong__dqn__s{s}: (pid {holders[s - 1]} on " in second.stdout
    output, _ = first.communicate(timeout=600)
    assert first.returncode == 0 and "2 finished now" in output and "0 failed" in output, output
    for s in (1, 2):
        run_dir = tmp_path / "runs" / f"pong__dqn__s{s}"
        config = json.loads((run_dir / "config.json").read_text())
        assert "resumes" not in config and json.loads((run_dir / "final_eval.json").read_text())["total_steps"] == 900
        assert len([p for p in run_dir.iterdir() if p.name.startswith("events.")]) == 1


def test_a_resume_refused_after_taking_the_lock_records_nothing(in_tmp, monkeypatch, capsys):
    """The disk check runs after the run directory is locked: config.json must not yet record a resume."""
    dqn.main(dqn.parse_args([*TINY, "--total-timesteps", "300", "--run-name", "r"]))
    config_before = open("runs/r/config.json", "rb").read()
    monkeypatch.setattr(longrun.shutil, "disk_usage", lambda path: longrun.shutil._ntuple_diskusage(10**9, 10**9, 10**6))
    with pytest.raises(SystemExit) as stop:
        dqn.main(dqn.parse_args(["--resume", "runs/r", "--total-timesteps", "600"]))
    assert stop.value.code == 2 and "has 0.00 GB free" in capsys.readouterr().err
    assert open("runs/r/config.json", "rb").read() == config_before


def test_the_lock_waits_for_a_holder_that_is_ending(tmp_path):
    other = open(tmp_path / longrun.LOCK, "a+")  # another open file: flock conflicts even within one process
    fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    threading.Timer(0.5, other.close).start()  # a requeued job's old process, ending
    lock = longrun.lock_run_dir(str(tmp_path))
    with open(tmp_path / longrun.LOCK) as f, pytest.raises(BlockingIOError):  # held, by this process now
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    lock.close()


def test_env_workers_do_not_hold_the_run_lock(tmp_path):
    """AsyncVectorEnv forks its workers after the lock is taken: they close their copy, so that the lock ends with
    the main process (a kill -9 of it frees the run directory even while a worker lingers)."""
    lock = longrun.lock_run_dir(str(tmp_path))
    envs = dqn.make_train_envs(dqn.Args(env_id="ALE/Pong-v5", num_envs=2), run_dir="")
    envs.reset(seed=0)
    assert all(process.is_alive() for process in envs.processes)
    lock.close()
    try:
        with open(tmp_path / longrun.LOCK) as f:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # BlockingIOError where a worker still held it
    finally:
        envs.close()


def test_older_checkpoints_are_the_numbered_ones_newest_first(tmp_path):
    for name in ("checkpoint_step12.pt", "checkpoint_step3.pt", "checkpoint_step5.pt.tmp", "checkpoint_stepX.pt",
                 "checkpoint_step7.pt.unreadable", "checkpoint.pt"):
        (tmp_path / name).write_text("")
    assert longrun.older_checkpoints(str(tmp_path)) == ["checkpoint_step12.pt", "checkpoint_step3.pt"]


def test_atomic_save_keeps_the_previous_file_under_a_second_name(tmp_path, monkeypatch):
    path, older = str(tmp_path / "checkpoint.pt"), str(tmp_path / "checkpoint_step1.pt")
    longrun.atomic_save(path, lambda tmp: torch.save({"step": 1}, tmp))
    with open(older, "w") as f:
        f.write("left by a process killed between the link and the rename")
    replace, path_there = os.replace, []

    def watched_replace(src, dst):  # a process killed at any rename must still find checkpoint.pt
        path_there.append(os.path.exists(path))
        replace(src, dst)

    monkeypatch.setattr(longrun.os, "replace", watched_replace)
    longrun.atomic_save(path, lambda tmp: torch.save({"step": 2}, tmp), keep_previous_as=older)
    assert path_there and all(path_there)
    assert torch.load(path) == {"step": 2} and torch.load(older) == {"step": 1}
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.pt", "checkpoint_step1.pt"]


def test_a_new_run_that_cannot_write_its_config_says_to_start_again(tmp_path):
    proc = script(*TINY, "--run-name", "c", cwd=tmp_path, limit=1000)  # run.lock fits; config.json (kB) does not
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == longrun.EXIT_STORAGE and "Traceback" not in err, out + err
    assert "writing runs/c/config.json failed" in err
    assert "start the run again (it wrote no checkpoint: remove runs/c first, or choose another --run-name)" in err
    assert sorted(p.name for p in (tmp_path / "runs" / "c").iterdir()) == ["run.lock"]  # no config.json.tmp left
