"""run_all.sh: the plan of the paper's comparison, the local backend, a real one-node SLURM, and bad input."""

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT

RUN_ALL = os.path.join(ROOT, "run_all.sh")
SHARED_GAMES = os.path.join(ROOT, "..", "shared", "atari57.csv")
TINY = ["--total-timesteps", "600", "--learning-starts", "200", "--buffer-size", "1000", "--batch-size", "8",
        "--eval-interval", "300", "--eval-steps", "100", "--final-eval-episodes", "2", "--max-episode-steps", "120",
        "--log-interval", "100", "--no-cuda"]


def run_all(cwd, *args, env=None, timeout=600, code=0):
    proc = subprocess.run(["bash", RUN_ALL, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHON": sys.executable, **(env or {})})
    assert proc.returncode == code, proc.stdout + proc.stderr
    return proc


def games_table(path=os.path.join(ROOT, "atari57.csv")):
    with open(path) as f:
        return list(csv.DictReader(f))


def planned(stdout):
    """(script, flags as a dict) for every command a dry run printed."""
    runs = []
    for line in stdout.splitlines():
        words = line.split()
        flags = dict(zip(words[2::2], words[3::2]))
        runs.append((os.path.basename(words[1]), flags))
    return runs


# ---------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------


# The one intended difference between the authors' random scores (their ale_utils) and DQN Zoo's, which the shared
# table holds: plot_results.py uses the authors' by default (docs/human_normalized_scores.md)
AUTHORS_RANDOM_SCORES = {"video_pinball": 0.0}  # DQN Zoo's: 16,256.9


def test_the_games_are_the_57_of_the_shared_table():
    games = games_table()
    assert len(games) == 57 and len({g["game"] for g in games}) == 57
    breakout = next(g for g in games if g["game"] == "breakout")
    assert (breakout["ale_v5_id"], breakout["random_score"], breakout["human_score"]) == ("ALE/Breakout-v5", "1.7", "30.5")
    differ = {g["game"]: float(g["authors_random_score"]) for g in games
              if float(g["authors_random_score"]) != float(g["random_score"])}
    assert differ == AUTHORS_RANDOM_SCORES
    if not os.path.exists(SHARED_GAMES):
        pytest.skip("../shared/atari57.csv is not beside this checkout (as on CI): the copy was compared where it is")
    shared = games_table(SHARED_GAMES)
    assert list(games[0]) == list(shared[0]) + ["authors_random_score"]  # the shared columns, then the authors' one
    assert [{column: g[column] for column in shared[0]} for g in games] == shared  # every shared column as it is there


def test_dry_run_plans_the_paper_comparison(tmp_path):
    proc = run_all(tmp_path, "--dry-run")
    runs = planned(proc.stdout)
    assert len(runs) == 57 * 4 * 3
    assert "684 runs: 57 games x 4 variants (dqn ib_dqn iqn ib_iqn) x 3 seeds" in proc.stderr
    env_ids = {g["ale_v5_id"] for g in games_table()}
    assert {flags["--env-id"] for _, flags in runs} == env_ids
    names = [flags["--run-name"] for _, flags in runs]
    assert len(set(names)) == len(names)
    combos = {(script, flags["--env-id"], flags.get("--me-coef", "default"), flags["--seed"]) for script, flags in runs}
    assert combos == {(f"{a}_atari_meanexp.py", e, k, s) for a in ("dqn", "iqn") for e in env_ids
                      for k in ("0", "default") for s in ("1", "2", "3")}
    assert {f["--run-name"] for _, f in runs if f["--env-id"] == "ALE/Pong-v5" and f["--seed"] == "2"} == {
        "pong__dqn__s2", "pong__ib_dqn__s2", "pong__iqn__s2", "pong__ib_iqn__s2"}  # the name carries the variant
    assert all(set(f) == {"--env-id", "--seed", "--me-coef", "--run-name"} or set(f) == {"--env-id", "--seed", "--run-name"}
               for _, f in runs)  # the paper's defaults otherwise: sse, Adam, the Nature network
    assert not (tmp_path / "runs").exists()  # a dry run writes nothing


def test_minatar_plans_dqn_at_k_0_and_6_over_the_five_games_on_every_core(tmp_path):
    proc = run_all(tmp_path, "--dry-run", "--games", "minatar", "--seeds", "1-5", "--", "--total-timesteps", "1500000")
    runs = planned(proc.stdout)
    assert "50 runs: 5 games x 2 variants (dqn ib_dqn) x 5 seeds" in proc.stderr
    with open(os.path.join(ROOT, "minatar5.csv")) as f:
        ids = {row["game"]: row["env_id"] for row in csv.DictReader(f)}
    assert ids == {f"minatar_{g.lower() if g != 'SpaceInvaders' else 'space_invaders'}": f"MinAtar/{g}-v1"
                   for g in ("Asterix", "Breakout", "Freeway", "Seaquest", "SpaceInvaders")}
    assert {(script, f["--env-id"], f.get("--me-coef", "default"), f["--seed"], f["--total-timesteps"]) for script, f in runs} == {
        ("dqn_minatar_meanexp.py", e, k, str(s), "1500000") for e in ids.values() for k in ("0", "default") for s in range(1, 6)}
    assert {f["--run-name"] for _, f in runs if f["--seed"] == "2" and "Breakout" in f["--env-id"]} == {
        "minatar_breakout__dqn__s2", "minatar_breakout__ib_dqn__s2"}  # never the name of an Atari breakout run
    k1 = planned(run_all(tmp_path, "--dry-run", "--games", "minatar_seaquest", "--variants", "ib_dqn1", "--seeds", "3").stdout)
    assert k1 == [("dqn_minatar_meanexp.py", {"--env-id": "MinAtar/Seaquest-v1", "--seed": "3", "--me-coef": "1",
                                               "--run-name": "minatar_seaquest__ib_dqn1__s3"})]
    both = planned(run_all(tmp_path, "--dry-run", "--games", "minatar_asterix,asterix", "--variants", "dqn",
                           "--seeds", "1").stdout)
    assert [(s, f["--env-id"]) for s, f in both] == [("dqn_minatar_meanexp.py", "MinAtar/Asterix-v1"),
                                                     ("dqn_atari_meanexp.py", "ALE/Asterix-v5")]
    assert not (tmp_path / "runs").exists()


PAPER_ROWS = {  # variant: (script, the flags that make it the paper's row)
    "dqn": ("dqn", {"--me-coef": "0"}),
    "ib_dqn": ("dqn", {}),
    "ib_dqn1": ("dqn", {"--me-coef": "1"}),
    "dqn_rmsprop_huber": ("dqn", {"--me-coef": "0", "--optimizer": "rmsprop", "--loss": "huber"}),
    "ib_dqn_rmsprop_huber": ("dqn", {"--optimizer": "rmsprop", "--loss": "huber"}),
    "dueling_dqn": ("dqn", {"--network": "dueling"}),
    "rdq": ("dqn", {"--network": "rdq", "--loss": "mse"}),
    "iqn": ("iqn", {"--me-coef": "0"}),
    "ib_iqn": ("iqn", {}),
}
ATARI5 = ["battle_zone", "double_dunk", "name_this_game", "phoenix", "qbert"]
ATARI11 = ATARI5 + ["alien", "asterix", "seaquest", "space_invaders", "wizard_of_wor", "zaxxon"]


def test_variants_run_the_papers_rows_by_name(tmp_path):
    runs = planned(run_all(tmp_path, "--dry-run", "--variants", "all", "--games", "atari5", "--seeds", "7").stdout)
    assert len(runs) == 5 * 9
    for script, flags in runs:
        game, variant, seed = flags["--run-name"].split("__")
        assert seed == "s7" and flags["--seed"] == "7" and game in ATARI5
        row_script, row_flags = PAPER_ROWS[variant]
        assert script == f"{row_script}_atari_meanexp.py"
        assert {k: v for k, v in flags.items() if k not in ("--env-id", "--seed", "--run-name")} == row_flags, variant
    assert {flags["--run-name"].split("__")[1] for _, flags in runs} == set(PAPER_ROWS)
    some = planned(run_all(tmp_path, "--dry-run", "--variants", "rdq,dueling_dqn", "--games", "atari11,pong,qbert",
                           "--seeds", "1").stdout)
    games = [f["--run-name"].split("__")[0] for _, f in some[::2]]
    assert games == ATARI11 + ["pong"]  # the sets expand in order, and a game named twice runs once


def test_dry_run_options_and_extra_flags(tmp_path):
    (tmp_path / "games.txt").write_text("# two games\npong\n\nms_pacman  # and a comment\n")
    proc = run_all(tmp_path, "--dry-run", "--algos", "iqn", "--games-file", "games.txt", "--seeds", "1,4-5", "--k", "0,1.5",
                   "--", "--total-timesteps", "1000", "--num-envs", "2")
    runs = planned(proc.stdout)
    assert len(runs) == 2 * 2 * 3
    assert all(script == "iqn_atari_meanexp.py" and flags["--total-timesteps"] == "1000" and flags["--num-envs"] == "2"
               for script, flags in runs)
    assert {(f["--env-id"], f["--me-coef"], f["--seed"]) for _, f in runs} == {
        (e, k, s) for e in ("ALE/Pong-v5", "ALE/MsPacman-v5") for k in ("0", "1.5") for s in ("1", "4", "5")}
    assert {f["--run-name"] for _, f in runs if f["--seed"] == "4"} == {
        "pong__iqn__s4", "pong__ib_iqn_k1.5__s4", "ms_pacman__iqn__s4", "ms_pacman__ib_iqn_k1.5__s4"}
    assert not (tmp_path / "runs").exists()
    v4 = planned(run_all(tmp_path, "--dry-run", "--v4", "--games", "breakout", "--algos", "dqn", "--seeds", "1", "--k", "0").stdout)
    assert [(f["--env-id"], f["--run-name"]) for _, f in v4] == [("BreakoutNoFrameskip-v4", "breakout__dqn__s1__v4")]
    k1 = planned(run_all(tmp_path, "--dry-run", "--games", "pong", "--algos", "dqn", "--seeds", "1", "--k", "1,default").stdout)
    assert [f["--run-name"] for _, f in k1] == ["pong__ib_dqn1__s1", "pong__ib_dqn__s1"]  # the paper's rows by their names


K_SENSITIVITY = ["name_this_game", "demon_attack", "star_gunner"]  # the authors' plotting/plot_hypers_perf.py, its order
AUTHORS_KS = ["0", "1", "32", "64", "128", "256", "512", "1024"]  # its k values, and k = 0 for its dashed lines


def test_one_command_plans_the_authors_k_sensitivity_sweep(tmp_path):
    proc = run_all(tmp_path, "--dry-run", "--algos", "dqn", "--k", ",".join(AUTHORS_KS), "--games", "k_sensitivity")
    runs = planned(proc.stdout)
    assert len(runs) == 3 * 8 * 3
    assert "72 runs: 3 games x 8 variants (dqn ib_dqn1 ib_dqn_k32 ib_dqn_k64 ib_dqn_k128 ib_dqn_k256 ib_dqn_k512 " \
           "ib_dqn_k1024) x 3 seeds" in proc.stderr
    env_ids = {g["game"]: g["ale_v5_id"] for g in games_table()}
    assert {(script, f["--env-id"], f["--me-coef"], f["--seed"]) for script, f in runs} == {
        ("dqn_atari_meanexp.py", env_ids[g], k, s) for g in K_SENSITIVITY for k in AUTHORS_KS for s in ("1", "2", "3")}
    assert all(set(f) == {"--env-id", "--seed", "--me-coef", "--run-name"} for _, f in runs)  # Adam, sse, Nature CNN
    assert [f["--run-name"].split("__")[0] for _, f in runs[::24]] == K_SENSITIVITY
    assert [f["--run-name"] for _, f in runs[48::3]] == ["star_gunner__dqn__s1", "star_gunner__ib_dqn1__s1",
                                                         *(f"star_gunner__ib_dqn_k{k}__s1" for k in AUTHORS_KS[2:])]


def test_slurm_dry_run_prints_the_sbatch_script_and_writes_nothing(tmp_path):
    finished = tmp_path / "runs" / "pong__dqn__s1"  # a finished run gets no array task
    finished.mkdir(parents=True)
    (finished / "final_eval.json").write_text("{}")
    proc = run_all(tmp_path, "--dry-run", "--backend", "slurm", "--games", "pong", "--seeds", "1", "--throttle", "2",
                   "--partition", "gpu", "--account", "acme", "--time", "2-00:00:00", "--gpus-per-task", "1",
                   env={"PATH": "/usr/bin:/bin"})  # no sbatch needed to see what would be submitted
    assert len(planned(proc.stdout)) == 4
    script = proc.stderr[proc.stderr.index("#!/bin/bash"):]
    for line in ("#SBATCH --array=0-2%2", "#SBATCH --partition=gpu", "#SBATCH --account=acme", "#SBATCH --time=2-00:00:00",
                 "#SBATCH --gres=gpu:1", "#SBATCH --requeue", "#SBATCH --signal=B:USR1@300"):
        assert line + "\n" in script, line
    assert "3 runs not finished yet (not written, not submitted)" in proc.stderr and "--run-one" in script
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["pong__dqn__s1"]  # nothing written


# ---------------------------------------------------------------------------
# Bad input: a clear message, exit code 2, nothing launched or written
# ---------------------------------------------------------------------------

BAD = [
    (["--games", "breakout,pongg"], "unknown game 'pongg'"),
    (["--algos", "dqn,ppo"], "unknown algorithm 'ppo'"),
    (["--seeds", "1,two"], "--seeds takes numbers and ranges"),
    (["--seeds", "3-1"], "'3-1'"),
    (["--k", "0,-1"], "--k takes numbers >= 0"),
    (["--backend", "cloud"], "--backend must be local or slurm (got 'cloud')"),
    (["--games-file", "nope.txt"], "--games-file 'nope.txt' does not exist"),
    (["--runs-per-gpu", "0"], "--runs-per-gpu must be a whole number >= 1 (got '0')"),
    (["--max-parallel", "x"], "--max-parallel must be a whole number >= 1"),
    (["--gpus", "0,a"], "--gpus takes GPU indices"),
    (["--v4", "--games", "surround"], "game 'surround' has no NoFrameskip-v4 id"),
    (["--frobnicate"], "unknown option '--frobnicate'"),
    (["--seeds"], "--seeds needs a value"),
    (["--", "--seed", "7"], "--seed after -- is set by run_all.sh"),
    (["--", "--learning-rate", "fast"], "not a valid command line for dqn_atari_meanexp.py"),
    (["--algos", "iqn", "--", "--num-tau-samples", "0"], "--num-tau-samples must be > 0"),
    (["--variants", "dqn,ddqn"], "unknown variant 'ddqn' in --variants (allowed: dqn ib_dqn"),
    (["--variants", "dqn", "--algos", "dqn"], "--variants and --algos/--k both choose what to run"),
    (["--games", "atari7"], "unknown game 'atari7'"),
    (["--variants", "rdq", "--", "--loss", "sse"], "--loss after -- is set by the variant"),
    (["--", "--network", "rdq"], "--network after -- is set by the variant"),
    (["--variants", "rdq,dqn", "--", "--rdq-penalty", "0.1"],
     "variant dqn (dqn_atari_meanexp.py): --rdq-penalty applies to --network rdq only"),
    (["--games", "minatar", "--variants", "dqn,iqn"], "variant 'iqn' has no MinAtar run"),
    (["--games", "minatar_breakout", "--variants", "dueling_dqn"], "variant 'dueling_dqn' has no MinAtar run"),
    (["--games", "minatar_breakout,breakout"], "variant 'iqn' has no MinAtar run"),  # the Atari default plans IQN
    (["--v4", "--games", "minatar_freeway"], "MinAtar's game 'minatar_freeway' has no v4 id"),
    (["--games", "minatar_pong"], "the MinAtar games of minatar5.csv: minatar_asterix minatar_breakout"),
    (["--games", "minatar", "--", "--network", "dueling"], "--network after -- is set by the variant"),
    (["--games", "minatar", "--", "--eval-epsilon", "2"], "variant dqn (dqn_minatar_meanexp.py): --eval-epsilon"),
]


@pytest.mark.parametrize("args,message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_is_refused_before_anything_starts(tmp_path, args, message):
    proc = run_all(tmp_path, *args, code=2)
    assert message in proc.stderr
    assert not (tmp_path / "runs").exists()


def test_a_python_without_the_packages_is_named_as_the_cause(tmp_path):
    bare = tmp_path / "bare-python"  # the same Python without its site-packages: no torch, no gymnasium
    bare.write_text(f'#!/bin/sh\nexec {sys.executable} -S "$@"\n')
    bare.chmod(0o755)
    proc = run_all(tmp_path, "--dry-run", env={"PYTHON": str(bare)}, code=2)
    assert "cannot import dqn_atari_meanexp.py" in proc.stderr and "No module named" in proc.stderr
    assert "not valid" not in proc.stderr and not proc.stdout  # the flags are not blamed, nothing is planned
    assert not (tmp_path / "runs").exists()


def test_slurm_backend_without_sbatch_is_refused(tmp_path):
    bin_dir = tmp_path / "bin"  # every command of PATH but sbatch
    bin_dir.mkdir()
    for directory in os.environ["PATH"].split(os.pathsep):
        if os.path.isdir(directory):
            for name in os.listdir(directory):
                if name != "sbatch" and not (bin_dir / name).exists():
                    os.symlink(os.path.join(directory, name), bin_dir / name)
    proc = run_all(tmp_path, "--backend", "slurm", "--games", "pong", env={"PATH": str(bin_dir)}, code=2)
    assert "--backend slurm needs sbatch on PATH" in proc.stderr
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------------------
# Local backend
# ---------------------------------------------------------------------------


def run_times(log):
    """(start, end) in seconds of each attempt a run's log records."""
    stamps = re.findall(r"^run_all\.sh: (\S+ \S+) (start|end) ", log, re.M)
    seconds = [time.mktime(time.strptime(s, "%Y-%m-%d %H:%M:%S")) for s, _ in stamps]
    return list(zip(seconds[::2], seconds[1::2]))


def test_local_backend_runs_in_parallel_and_skips_finished_runs(tmp_path):
    args = ["--algos", "dqn", "--games", "pong,breakout", "--seeds", "1-2", "--k", "0", "--max-parallel", "2", "--", *TINY]
    proc = run_all(tmp_path, *args)
    assert "4 planned, 0 skipped (finished before), 4 finished now, 0 stopped with a checkpoint, 0 failed" in proc.stdout
    names = [f"{g}__dqn__s{s}" for g in ("pong", "breakout") for s in (1, 2)]
    intervals = []
    for name in names:
        final = json.loads((tmp_path / "runs" / name / "final_eval.json").read_text())
        assert final["total_steps"] == 600 and final["me_coef"] == 0.0
        log = (tmp_path / "runs" / "_batch" / "logs" / f"{name}.log").read_text()
        assert "CPU" in log and "exit code 0" in log
        intervals += run_times(log)
    # two at a time, never more: at some moment two runs overlapped
    overlap = max(sum(start <= t < end for start, end in intervals) for t, _ in intervals)
    assert overlap == 2
    mtimes = {n: (tmp_path / "runs" / n / "final_eval.json").stat().st_mtime_ns for n in names}
    again = run_all(tmp_path, *args)
    assert "4 runs planned: 4 already finished (skipped), 0 to run" in again.stdout
    assert {n: (tmp_path / "runs" / n / "final_eval.json").stat().st_mtime_ns for n in names} == mtimes


def test_minatar_runs_take_every_core_and_record_the_cpu_model(tmp_path):
    tiny = ["--total-timesteps", "600", "--learning-starts", "200", "--buffer-size", "1000", "--batch-size", "8",
            "--eval-interval", "300", "--eval-steps", "100", "--final-eval-episodes", "2", "--target-network-frequency",
            "100", "--no-cuda"]
    proc = run_all(tmp_path, "--games", "minatar_breakout,minatar_freeway", "--seeds", "1", "--variants", "ib_dqn", "--",
                   *tiny, env={"OMP_NUM_THREADS": ""})
    cores = os.cpu_count()
    assert f"at most {cores} at a time, on CPU, 1 CPU threads each" in proc.stdout  # one run per core, one thread each
    assert "2 planned, 0 skipped (finished before), 2 finished now" in proc.stdout
    sys.path.insert(0, ROOT)
    import longrun

    for game in ("breakout", "freeway"):
        run = tmp_path / "runs" / f"minatar_{game}__ib_dqn__s1"
        final = json.loads((run / "final_eval.json").read_text())
        assert final["me_coef"] == 6.0 and final["total_steps"] == 600  # k = |A| = 6: the full action set
        config = json.loads((run / "config.json").read_text())
        assert config["machine"] == longrun.machine() and config["machine"].endswith(f", {cores} cores")


def test_ctrl_c_checkpoints_every_run_and_the_next_call_resumes_them(tmp_path):
    flags = [*TINY, "--total-timesteps", "1500", "--progress-interval", "0.5"]
    args = ["--algos", "dqn", "--games", "pong", "--seeds", "1-2", "--k", "0", "--max-parallel", "2", "--", *flags]
    proc = subprocess.Popen(["bash", RUN_ALL, *args], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ, "PYTHON": sys.executable}, start_new_session=True)
    logs = [tmp_path / "runs" / "_batch" / "logs" / f"pong__dqn__s{s}.log" for s in (1, 2)]
    deadline = time.time() + 300
    while not all(p.exists() and "step 2" in p.read_text() for p in logs):  # both runs are past step 200
        assert time.time() < deadline and proc.poll() is None, proc.stdout.read() if proc.poll() is not None else "timeout"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in a terminal: the whole foreground process group
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 130, output
    assert "0 finished now, 2 stopped with a checkpoint, 0 failed" in output
    for s in (1, 2):  # each run's step and where it resumes from
        assert re.search(rf"stopped: pong__dqn__s{s}: checkpoint at step [0-9,]+ in runs/pong__dqn__s{s}/checkpoint.pt, "
                         "resumed when this command runs again", output), output
    for s in (1, 2):
        run_dir = tmp_path / "runs" / f"pong__dqn__s{s}"
        assert (run_dir / "checkpoint.pt").exists() and not (run_dir / "final_eval.json").exists()
    assert subprocess.run(["pgrep", "-f", str(tmp_path)], capture_output=True).stdout == b""  # no run left behind
    again = run_all(tmp_path, *args)
    assert "2 finished now" in again.stdout
    for s in (1, 2):
        log = logs[s - 1].read_text()
        assert f"--resume runs/pong__dqn__s{s}" in log and "resumed runs/" in log
        assert json.loads((tmp_path / "runs" / f"pong__dqn__s{s}" / "final_eval.json").read_text())["total_steps"] == 1500


def test_failed_runs_are_listed_with_their_logs(tmp_path):
    # passes the scripts' own checks, fails in each run: 700 GB of replay does not fit in memory
    proc = run_all(tmp_path, "--algos", "dqn", "--games", "pong", "--seeds", "1-2", "--k", "0", "--",
                   *TINY, "--buffer-size", "100000000", code=1)
    assert "0 finished now, 0 stopped with a checkpoint, 2 failed" in proc.stdout
    for s in (1, 2):
        assert f"failed: pong__dqn__s{s} (exit code 2): runs/_batch/logs/pong__dqn__s{s}.log" in proc.stdout
        command = re.search(rf"failed: pong__dqn__s{s} .*\nrun_all\.sh:   command: (.*)", proc.stdout).group(1).split()
        assert command[:2] == [sys.executable, os.path.join(ROOT, "dqn_atari_meanexp.py")]
        assert command[command.index("--seed") + 1] == str(s) and command[-4:] == ["--buffer-size", "100000000", "--run-name",
                                                                                  f"pong__dqn__s{s}"]
        assert "the replay buffer needs 706.50 GB" in (tmp_path / f"runs/_batch/logs/pong__dqn__s{s}.log").read_text()


# ---------------------------------------------------------------------------
# SLURM backend, against a real one-node SLURM started for these tests
# ---------------------------------------------------------------------------

SLURM_SCRIPT = os.path.join(ROOT, "tests", "slurm", "local-slurm.sh")


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """Starts slurmctld, slurmd (and munged where needed) on localhost; stops them by PID afterwards."""
    why = None
    if os.geteuid() != 0:
        why = "the one-node SLURM needs root"
    elif os.path.exists("/etc/slurm/slurm.conf") and "ClusterName=meanexp-test" not in open("/etc/slurm/slurm.conf").read():
        why = "/etc/slurm/slurm.conf belongs to another SLURM: not touching it"
    if why:
        if os.environ.get("REQUIRE_SLURM_TEST"):
            pytest.fail(f"REQUIRE_SLURM_TEST is set but {why}")
        pytest.skip(why)
    state = tmp_path_factory.mktemp("slurm")
    try:
        subprocess.run(["bash", SLURM_SCRIPT, "start", str(state)], check=True, timeout=600)
        yield state
    finally:  # also when start-up failed halfway: the daemons it did start are stopped
        subprocess.run(["bash", SLURM_SCRIPT, "stop", str(state)], check=True, timeout=60)


def wait_for(job, done, timeout=400, grace=30):
    """Until done() and the job array has left the queue. A requeued task may be out of the queue for a moment;
    out of it for grace seconds with done() still false, the job has ended without doing its work: fail now."""
    deadline, left_at = time.time() + timeout, None
    while True:
        queued = subprocess.run(["squeue", "-h", "-j", job], capture_output=True, text=True).stdout.strip()
        finished = done()
        if finished and not queued:
            return
        left_at = None if queued else (left_at or time.time())
        assert left_at is None or time.time() - left_at < grace, f"job {job} left the queue without finishing its runs"
        assert time.time() < deadline, subprocess.run(["squeue", "-j", job], capture_output=True, text=True).stdout
        time.sleep(0.5)


def submitted_job(stdout):
    return re.search(r"submitted job array (\d+)", stdout).group(1)


SLURM_TASK = ["--backend", "slurm", "--gpus-per-task", "0", "--cpus-per-task", "1", "--mem", "2G", "--time", "10:00"]


def test_slurm_array_runs_every_planned_run(slurm, tmp_path):
    proc = run_all(tmp_path, *SLURM_TASK, "--games", "pong", "--seeds", "1", "--throttle", "2", "--", *TINY)
    job = submitted_job(proc.stdout)
    sbatch = next((tmp_path / "runs" / "_batch").glob("slurm-*.sbatch")).read_text()
    assert "#SBATCH --array=0-3%2" in sbatch and "#SBATCH --signal=B:USR1@300" in sbatch and "#SBATCH --requeue" in sbatch
    outputs = tmp_path / "runs" / "_batch" / "slurm"
    wait_for(job, done=lambda: sum("exit code" in p.read_text() for p in outputs.glob(f"{job}_*.out")) == 4)
    for algo in ("dqn", "iqn"):
        for variant, coef in ((algo, 0.0), (f"ib_{algo}", 18.0)):
            name = f"pong__{variant}__s1"
            final = json.loads((tmp_path / "runs" / name / "final_eval.json").read_text())
            assert (final["algo"], final["me_coef"], final["total_steps"]) == (algo, coef, 600), name
    assert all("exit code 0" in p.read_text() for p in outputs.glob(f"{job}_*.out"))
    again = run_all(tmp_path, *SLURM_TASK, "--games", "pong", "--seeds", "1", "--", *TINY)
    assert "4 already finished (skipped), 0 to run" in again.stdout and "submitted" not in again.stdout


def submit_one_learning_task(tmp_path, flags):
    """Submits one DQN run as a SLURM array task; returns (job, its log) once learning has started in it."""
    proc = run_all(tmp_path, *SLURM_TASK, "--algos", "dqn", "--games", "pong", "--seeds", "1", "--k", "0", "--", *flags)
    job = submitted_job(proc.stdout)
    out = tmp_path / "runs" / "_batch" / "slurm" / f"{job}_0.out"
    deadline = time.time() + 300
    while not (out.exists() and "step 2" in out.read_text()):  # past step 200: learning has started
        assert time.time() < deadline
        time.sleep(0.2)
    return job, out


def test_slurm_task_preempted_by_sigterm_requeues_and_ends_as_an_uninterrupted_run(slurm, tmp_path):
    flags = [*TINY, "--total-timesteps", "1500", "--progress-interval", "0.5"]
    straight = tmp_path / "straight"
    straight.mkdir()
    run_all(straight, "--algos", "dqn", "--games", "pong", "--seeds", "1", "--k", "0", "--", *flags)
    job, out = submit_one_learning_task(tmp_path, flags)
    # a preemption: SIGTERM to every process of the task (the batch shell and the run), with no warning signal first
    subprocess.run(["scancel", "--signal=TERM", "--full", job], check=True)
    wait_for(job, done=lambda: out.read_text().rstrip().endswith("exit code 0"))
    text = out.read_text()
    assert "signal SIGTERM: checkpoint at step" in text and "exit code 75" in text and f"requeueing array task {job}_0" in text
    final, expected = (json.loads((d / "runs" / "pong__dqn__s1" / "final_eval.json").read_text()) for d in (tmp_path, straight))
    assert (final["total_steps"], final["scores"]) == (1500, expected["scores"])


def test_slurm_task_warned_of_its_time_limit_requeues_and_resumes(slurm, tmp_path):
    flags = [*TINY, "--total-timesteps", "1500", "--progress-interval", "0.5"]
    job, out = submit_one_learning_task(tmp_path, flags)
    # what --signal=B:USR1@300 sends before the time limit (or a preemption notice): to the batch shell
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True)

    # SLURM holds a requeued task for cred_expire seconds (10 in tests/slurm/local-slurm.sh) before it starts again
    wait_for(job, done=lambda: out.read_text().rstrip().endswith("exit code 0"))
    text = out.read_text()
    assert "exit code 75" in text and f"requeueing array task {job}_0" in text
    assert "resumed runs/pong__dqn__s1 at step" in text and text.rstrip().endswith("exit code 0")
    run_dir = tmp_path / "runs" / "pong__dqn__s1"
    assert json.loads((run_dir / "final_eval.json").read_text())["total_steps"] == 1500
    assert len(json.loads((run_dir / "config.json").read_text())["resumes"]) == 1


def test_track_puts_the_whole_batch_in_one_wandb_group_the_same_on_the_next_call(tmp_path):
    args = ["--dry-run", "--algos", "dqn", "--games", "pong", "--seeds", "1-2", "--", "--track"]
    first, again = run_all(tmp_path, *args).stdout, run_all(tmp_path, *args).stdout
    groups = set(re.findall(r"--wandb-group (\S+)", first))
    assert len(groups) == 1 and first.count("--wandb-group") == 4 and first == again
    other = run_all(tmp_path, *[a if a != "1-2" else "1-3" for a in args]).stdout  # another batch: another group
    assert set(re.findall(r"--wandb-group (\S+)", other)) != groups
    mine = run_all(tmp_path, *args, "--wandb-group", "campaign").stdout  # a group given after -- is kept
    assert set(re.findall(r"--wandb-group (\S+)", mine)) == {"campaign"}


def test_run_all_names_the_scripts_exit_codes_and_lock_file_as_longrun_py_does():
    """run_all.sh is bash and cannot import longrun.py, so it repeats the scripts' exit codes and the run directory's
    lock file name (issue 32): here they are checked against longrun.py, every one of them."""
    import longrun

    with open(RUN_ALL) as f:
        text = f.read()
    codes = {name: int(value) for name, value in re.findall(r"^(EXIT_[A-Z_]+)=(\d+)", text, re.MULTILINE)}
    assert codes == {name: getattr(longrun, name) for name in codes}
    assert set(codes) == {"EXIT_REQUEUE", "EXIT_INTERRUPTED", "EXIT_NON_FINITE", "EXIT_STORAGE"}
    assert f'[ -f "$1/{longrun.LOCK}" ]' in text  # lock_holder looks for the lock file the scripts take


def test_a_plan_of_one_says_one_run_not_1_runs(tmp_path):
    proc = run_all(tmp_path, "--dry-run", "--algos", "dqn", "--games", "pong", "--seeds", "1", "--k", "0")
    assert "# 1 run: 1 game x 1 variant (dqn) x 1 seed" in proc.stderr, proc.stderr  # issue 34: "1 runs", "1 games"
