"""Speed never changes what is learned: the fast paths give the plain path's losses; the benchmark runs."""

import copy
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import dqn_atari_meanexp as dqn
import iqn_atari_meanexp as iqn
from conftest import ROOT


def batches(script, count, seed=0):
    """Replay batches of random frames, as update() gets them."""
    rb = script.ReplayBuffer(2_000, 1, torch.device("cpu"), seed=seed)
    rng = np.random.default_rng(seed)
    for i in range(1_000):
        rb.add(rng.integers(0, 256, (1, 84, 84), dtype=np.uint8), np.array([i % 200 == 0]), rng.integers(18, size=1),
               rng.integers(-1, 2, size=1), np.array([i % 200 == 199]), np.zeros(1, bool))
    return [rb.sample(32) for _ in range(count)]


def losses(script, args, data, fast_optimizer, compiled):
    torch.manual_seed(0)
    network = script.make_network(args, 18, 18.0)
    target = copy.deepcopy(network)
    if fast_optimizer:
        optimizer = script.make_optimizer(args, network)
    else:  # plain PyTorch: Adam's loop over the parameters
        optimizer = torch.optim.Adam(network.parameters(), lr=args.learning_rate, eps=args.optimizer_eps)
    assert bool(optimizer.defaults["fused"]) == fast_optimizer
    loss_fn = torch.compile(script.LOSS, dynamic=False) if compiled else script.LOSS  # as main() compiles it
    out = []
    for i, batch in enumerate(data):
        torch.manual_seed(100 + i)  # IQN samples its quantile levels: the same ones on both paths
        out.append(script.update(network, target, optimizer, batch, args, loss_fn)[0].item())
    return np.array(out), network.state_dict()


@pytest.mark.parametrize("script", [dqn, iqn], ids=["dqn", "iqn"])
def test_fused_adam_and_compile_give_the_plain_losses(script):
    args = script.Args(learning_rate=1e-3)  # large steps, so that any difference would grow
    if script is iqn:
        args = script.Args(learning_rate=1e-3, num_tau_samples=8, num_tau_prime_samples=8, num_quantile_samples=8)
    data = batches(script, 12)
    plain, plain_weights = losses(script, args, data, fast_optimizer=False, compiled=False)
    fused, fused_weights = losses(script, args, data, fast_optimizer=True, compiled=False)
    with torch._inductor.config.patch(fallback_random=True):  # IQN's taus: compiled code draws PyTorch's own numbers
        fast, _ = losses(script, args, data, fast_optimizer=True, compiled=True)
    torch.manual_seed(0)
    start = script.make_network(args, 18, 18.0).state_dict()  # the weights all three paths started from
    moved = max((plain_weights[name] - start[name]).abs().max().item() for name in start)
    assert moved > 5e-3  # twelve large steps: the comparison is not between constants
    # fused Adam: the same arithmetic in another order, equal to float rounding
    np.testing.assert_allclose(fused, plain, rtol=1e-5)
    for name in plain_weights:
        torch.testing.assert_close(fused_weights[name], plain_weights[name], rtol=1e-5, atol=1e-6)
    # torch.compile fuses kernels and reorders sums: equal within 1e-4 over 12 updates
    np.testing.assert_allclose(fast, plain, rtol=1e-4)


BENCH = [sys.executable, os.path.join(ROOT, "benchmarks", "bench.py")]


def test_quick_benchmark_writes_the_documented_json_with_concurrent_runs(tmp_path):
    out = tmp_path / "bench.json"
    start = time.time()
    proc = subprocess.run([*BENCH, "--quick", "--no-cuda", "--concurrent", "1", "2", "--json", str(out)],
                          capture_output=True, text=True, timeout=600)
    elapsed = time.time() - start
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # about 60 s on 2 quiet cores, 200 s beside a 2-process sweep: a guard on the suite's time, not a benchmark
    assert elapsed < 450, f"--quick took {elapsed:.0f} s"
    result = json.loads(out.read_text())
    assert set(result) == {"device", "date", "command", "versions", "machine", "rows"}
    assert result["device"].startswith("cpu") and result["date"] == time.strftime("%Y-%m-%d")
    assert result["command"] == f"python benchmarks/bench.py --quick --no-cuda --concurrent 1 2 --json {out}"
    assert result["versions"]["torch"] == torch.__version__ and result["versions"]["cuda"] is None
    assert result["machine"]["cpu"].endswith(f", {os.cpu_count()} cores")  # the CPU model: bit-equality holds per model
    rows = result["rows"]
    assert [(r["algo"], r["num_envs"], r["concurrent_runs"]) for r in rows] == [
        ("dqn", 1, 1), ("dqn", 1, 2), ("iqn", 1, 1), ("iqn", 1, 2)]
    for row in rows:
        n = row["concurrent_runs"]
        assert row["sps_is_per_run"] is True and len(row["per_run_training_sps"]) == n
        assert row["training_sps"] == pytest.approx(np.mean(row["per_run_training_sps"]))
        assert row["total_training_sps"] == pytest.approx(sum(row["per_run_training_sps"]))
        assert row["threads_per_run"] == int(os.environ.get("OMP_NUM_THREADS") or max(1, os.cpu_count() // n))
        assert row["updates_per_step"] == 0.25  # the paper's replay ratio: one update every 4 agent steps
        assert row["replay_bytes_per_transition"] == 7065
        assert row["env_ms"] == pytest.approx(1e3 / row["env_sps"])
        assert row["env_sps"] > row["training_sps"] > 0 and row["update_ms"] > row["sample_ms"] > 0 and row["act_ms"] > 0
        assert row["allowed_sps"] == pytest.approx(1 / (row["env_ms"] / 1e3 + row["act_ms"] / 1e3 + row["update_ms"] / 4e3))
        assert row["peak_rss_bytes"] > 100e6
        # a few dozen updates beside other load: --quick gives no share of the allowed rate (issue 34: it printed 515%)
        assert row["share_of_allowed"] is None and row["share_of_env_only"] is None
    assert "dqn x1: env-only" in proc.stdout and "2 runs at once" in proc.stdout
    assert "% of allowed" not in proc.stdout and "--quick: too few steps for a share of either" in proc.stdout


@pytest.mark.parametrize("flags, message", [(["--concurrent", "0"], "must be >= 1"), (["--num-envs", "0"], "must be >= 1"),
                                            (["--json", "EXISTING"], "exists: choose a new file")])
def test_benchmark_refuses_bad_flags_before_measuring(tmp_path, flags, message):
    existing = tmp_path / "old.json"
    existing.write_text("{}")
    flags = [str(existing) if flag == "EXISTING" else flag for flag in flags]
    proc = subprocess.run([*BENCH, "--quick", "--no-cuda", *flags], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert existing.read_text() == "{}"  # nothing overwritten


GPU_CHECK = [sys.executable, os.path.join(ROOT, "benchmarks", "gpu_check.py")]


def test_the_gpu_checks_dry_run_runs_every_phase_on_the_cpu_and_writes_its_results(tmp_path):
    """benchmarks/gpu_check.py --dry-run: the GPU check's phases on the CPU at tiny sizes, so that a GPU's minutes go to
    measuring. Under load a phase may run out of its time (its deadline stops it), but none may fail."""
    start = time.time()
    proc = subprocess.run([*GPU_CHECK, "--dry-run", "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert time.time() - start < 300  # the budget is 240 s of phases; about 90 s on 2 quiet cores
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert {"device", "cpu", "versions", "date", "command", "phases", "dry_run", "seconds"} <= set(result)
    assert result["dry_run"] is True and result["versions"]["torch"] == torch.__version__
    phases = {p["name"]: p for p in result["phases"]}
    assert list(phases) == ["parts", "dqn_1env", "iqn_1env", "concurrent", "lunar", "profile", "tests", "envs"]
    assert all(p["status"] in ("ok", "out of time") for p in phases.values()), {n: p.get("error") for n, p in phases.items()}
    if phases["parts"]["status"] == "ok":
        assert [r["algo"] for r in phases["parts"]["results"]] == ["dqn", "iqn"]
        assert all(r["env_sps"] > 0 and r["update_ms"] > r["sample_ms"] > 0 for r in phases["parts"]["results"])
    speed = [r for name in ("dqn_1env", "iqn_1env", "concurrent", "envs") for r in phases[name]["results"]]
    assert speed and all(r["updates_per_step"] == pytest.approx(0.25, abs=0.01) for r in speed)  # the paper's ratio
    assert all(r["total_training_sps"] == pytest.approx(sum(r["per_run_training_sps"])) for r in speed)
    if phases["tests"]["status"] == "ok":
        tests = phases["tests"]["results"][0]
        assert tests["returncode"] == 0 and tests["failed"] == [] and len(tests["passed"]) >= 5
    if phases["profile"]["status"] == "ok":
        assert (tmp_path / "profile.txt").exists() and len(phases["profile"]["results"]) == 25
    if phases["lunar"]["status"] == "ok":
        assert phases["lunar"]["results"][0]["device"] == "cpu" and phases["lunar"]["results"][0]["training_sps"] > 0
    table = (tmp_path / "gpu_check.md").read_text()
    assert "| algo | envs | runs at once | mode |" in table and "- tests: " in table


def test_the_gpu_check_without_a_gpu_asks_for_the_dry_run(tmp_path):
    proc = subprocess.run([*GPU_CHECK, "--out", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "no CUDA device here: use --dry-run" in proc.stderr
    assert not (tmp_path / "gpu_check.json").exists()


def test_the_minatar_bound_times_every_update_action_and_env_step_of_one_real_run(tmp_path):
    """benchmarks/minatar_bound.py: the script's own run, its updates, actions and env steps timed inside it; the bound
    is their sum and never more than the loop's wall time over the same span (the share is no timing claim here)."""
    out = tmp_path / "bound.json"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "minatar_bound.py"), "--steps", "400",
                           "--learning-starts", "200", "--json", str(out)], capture_output=True, text=True, timeout=600,
                          cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(out.read_text())
    (row,) = result["rows"]
    assert row["updates"] == 400 // 4 and row["env_id"] == "MinAtar/Breakout-v1"  # one update per 4 steps after 200
    assert row["act_calls"] == row["env_calls"] >= 396  # every step from the first update on (and the autoreset steps)
    parts = row["seconds_per_part"]
    assert parts["update"] + parts["act"] + parts["env"] == pytest.approx(row["bound_seconds"])
    assert 0 < row["bound_seconds"] <= row["loop_seconds"] and row["share_of_bound"] == row["bound_seconds"] / row["loop_seconds"]
    assert result["machine"] and not os.path.exists(tmp_path / "runs")  # the run went to a folder of its own, then away
    refused = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "minatar_bound.py"), "--json", str(out)],
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "exists" in refused.stderr
    assert "| Breakout | " in proc.stdout and "| game | steps/s |" in proc.stdout  # the table it prints for the README


def test_the_readme_minatar_bound_table_is_what_the_committed_json_gives():
    """benchmarks/README.md's MinAtar table is minatar_bound.py's own table of the committed result file: not retyped."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import minatar_bound
    finally:
        sys.path.pop(0)
    with open(os.path.join(ROOT, "benchmarks", "results", "2026-12-06_cpu-2core_minatar_bound.json")) as f:
        rows = json.load(f)["rows"]
    assert len(rows) == 5
    with open(os.path.join(ROOT, "benchmarks", "README.md")) as f:
        assert "\n".join(minatar_bound.markdown(rows)) in f.read()
