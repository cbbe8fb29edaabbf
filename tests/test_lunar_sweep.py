"""dqn_meanexp_sweep.py: the population's members are dqn_meanexp.py's single runs, its gradients are autograd's,
the sweep runs in parts into one folder, and the figure's numbers are the authors' (AUC and its interval)."""

import glob
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import dqn_meanexp as dqn
import dqn_meanexp_sweep as sweep
from benchmarks import sweep_bound
from conftest import ROOT

MEMBERS = [(4.0, 1), (0.0, 2), (65536.0, 3), (16.0, 1)]  # one seed twice: the members must not share anything


def networks(members, offset=0):
    nets = []
    for k, seed in members:
        torch.manual_seed(seed + offset)
        nets.append(dqn.QNetwork(8, 4, k, 10.0))
    return nets


def random_batch(m, b=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(m, b, 8, generator=g) * 5, torch.randint(0, 4, (m, b), generator=g), torch.randn(m, b, generator=g),
            torch.randn(m, b, 8, generator=g) * 5, (torch.rand(m, b, generator=g) < 0.1).float())


def autograd_gradients(net, target, batch):
    """The single run's gradients, in the population's layout (weights transposed, biases (1, out))."""
    net.zero_grad()
    dqn.td_loss(net, target, batch, 0.99)[0].backward()
    return [t for i in (0, 2, 4) for t in (net.network[i].weight.grad.T, net.network[i].bias.grad[None])]


COPY = ("dqn_meanexp_sweep.forward is the population's copy of dqn_meanexp.QNetwork.forward (in a stacked layout; "
        "its gradients are those of dqn_meanexp.td_loss itself): change it with the network")


@pytest.mark.parametrize("compiled", [False, True])
def test_batched_gradients_are_each_members_autograd_gradients(compiled):
    try:
        check_batched_gradients(compiled)
    except Exception as e:  # a change to QNetwork fails here: say where the population's copy of it lives
        raise AssertionError(f"{COPY}\n{type(e).__name__}: {e}") from e


def check_batched_gradients(compiled):
    nets, targets = networks(MEMBERS), networks(MEMBERS, offset=100)
    k = torch.tensor([m[0] for m in MEMBERS])[:, None, None]
    batch = random_batch(len(MEMBERS))
    gradients = torch.compile(sweep.gradients, dynamic=False) if compiled else sweep.gradients
    grads, gaps, q_taken = gradients(sweep.stack_networks(nets), sweep.stack_networks(targets), k, 10.0, 0.99, batch)
    for i, (net, target) in enumerate(zip(nets, targets)):
        member_batch = tuple(t[i] for t in batch)
        for got, expected in zip(grads, autograd_gradients(net, target, member_batch)):
            torch.testing.assert_close(got[i], expected, rtol=1e-4, atol=1e-6 * expected.abs().max().item())
        top2 = net(member_batch[0]).topk(2).values
        torch.testing.assert_close(gaps[i], (top2[:, 0] - top2[:, 1]).mean())
        want = net(member_batch[0]).gather(1, member_batch[1][:, None]).squeeze(1)  # k = 65536 amplifies rounding
        torch.testing.assert_close(q_taken[i], want, rtol=1e-3, atol=1e-6 * want.abs().max().item())


def batched_arithmetic_rounds_as_plain():
    """Whether this machine's batched products give each member exactly what its single run computes, at the sweep's
    own shapes: the forward at batch 1 and 128 (nn.Linear) and one update's gradients (autograd). True on the Intel
    Xeons the sweep ran on: then a member's run is its single run to the bit. Not on every x86 CPU (an AMD EPYC with
    AVX-512 rounds them otherwise, issue 31): then rounding differs from the first update and Q-learning's ReLU kinks
    amplify it, so only a few updates can agree within float tolerance."""
    nets, targets = networks(MEMBERS), networks(MEMBERS, offset=100)
    k = torch.tensor([m[0] for m in MEMBERS])[:, None, None]
    params, batch = sweep.stack_networks(nets), random_batch(len(MEMBERS))
    grads, *_ = sweep.gradients(params, sweep.stack_networks(targets), k, 10.0, 0.99, batch)
    for i, (net, target) in enumerate(zip(nets, targets)):
        expected = autograd_gradients(net, target, tuple(t[i] for t in batch))
        if not all(torch.equal(got[i], want) for got, want in zip(grads, expected)):
            return False
    for b in (1, 128):
        x = torch.randn(len(MEMBERS), b, 8, generator=torch.Generator().manual_seed(b)) * 5
        q = sweep.forward(params, x, k, 10.0)[0]
        if not all(torch.equal(q[i], net(x[i])) for i, net in enumerate(nets)):
            return False
    return True


def test_each_member_of_a_population_is_its_single_run(in_tmp):
    exact = batched_arithmetic_rounds_as_plain()
    # cuda=False: the population runs on the CPU, so must its members' single runs, GPU or not (issue 33)
    settings = dict(total_timesteps=800 if exact else 330, learning_starts=300, eval_interval=400 if exact else 320, eval_episodes=2,
                    cuda=False)
    pop = sweep.Population(dqn.Args(**settings), MEMBERS, compile=False)
    evaluations, clock = sweep.train(pop)
    assert set(clock) == {"act", "env", "update", "evaluate"}
    for i, (k, seed) in enumerate(MEMBERS):  # 500 updates of each
        single = dqn.main(dqn.Args(**settings, me_coef=k, seed=seed, save_model=True, exp_name=f"m{i}"))
        (run_dir,) = glob.glob(f"runs/*__m{i}__*")
        state = torch.load(os.path.join(run_dir, f"m{i}.cleanrl_model"))
        expected = [t for j in (0, 2, 4) for t in (state[f"network.{j}.weight"].T, state[f"network.{j}.bias"][None])]
        for got, want in zip(pop.params, expected):
            if exact:
                assert torch.equal(got[i], want), f"member {(k, seed)} differs from its single run"
            else:
                torch.testing.assert_close(got[i], want, rtol=1e-4, atol=1e-6)
        assert [e["step"] for e in evaluations[i]] == [e["step"] for e in single]
        for got, want in zip(evaluations[i], single):
            assert got["mean"] == want["mean"]
            assert got["action_gap"] == (None if want["action_gap"] is None else pytest.approx(want["action_gap"], rel=1e-5))
            # the evaluation's Q comes from a batched forward: equal up to rounding
            assert got["overestimation"] == pytest.approx(want["overestimation"], rel=1e-5, abs=1e-6)
            for key in ("average_q", "average_action_gap", "relative_action_gap"):  # the same states, the same Q
                assert got[key] == (None if want[key] is None else pytest.approx(want[key], rel=1e-4, abs=1e-7)), key
        assert [e["average_action_gap"] is None for e in single] == [True] + [False] * (len(single) - 1)  # syncs from step 100


def cpu_model():
    with open("/proc/cpuinfo") as f:
        return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))


def write_run(folder, k, seed, scores, steps=(0, 10, 20), gap=0.5, over=1.0, name=None, **flags):
    rows = [{"step": s, "mean": float(v), "overestimation": over, "normalized_overestimation": over / 2,
             "action_gap": None if s == 0 else gap} for s, v in zip(steps, scores)]
    os.makedirs(os.path.join(folder, name or f"k{k}_s{seed}"))
    with open(os.path.join(folder, name or f"k{k}_s{seed}", "evaluations.json"), "w") as f:
        json.dump({"config": {"me_coef": float(k), "seed": seed, **flags}, "evaluations": rows}, f)


def test_auc_and_its_interval_are_the_authors_on_hand_made_curves(tmp_path):
    write_run(tmp_path, 0, 1, [1, 2, 3])
    write_run(tmp_path, 0, 2, [3, 4, 5])
    write_run(tmp_path, 4, 1, [0, 10, 20], gap=2.0, over=-1.0)
    table = sweep.plot(str(tmp_path), str(tmp_path / "figures"))
    # k = 0: across-seed means 2, 3, 4 -> AUC 3; per-seed AUCs 2 and 4: std (ddof 1) sqrt(2), SE 1 -> interval 1.96
    assert table[0.0]["auc"] == pytest.approx(3.0) and table[0.0]["ci"] == pytest.approx(1.959963984540054, abs=1e-12)
    assert table[0.0]["final_score"] == 4.0 and table[0.0]["final_action_gap"] == 0.5
    assert table[4.0]["auc"] == pytest.approx(10.0) and np.isnan(table[4.0]["ci"])  # one seed: no interval
    assert table[4.0]["final_overestimation"] == -1.0 and table[4.0]["final_normalized_overestimation"] == -0.5
    for name in ("lunar_k_auc.png", "lunar_curves.png", "lunar_overestimation_gap.png", "lunar_table.md"):
        assert os.path.getsize(tmp_path / "figures" / name) > 0
    assert "| 0 | 2 | 3.0 | ± 2.0 | 4.0 |" in (tmp_path / "figures" / "lunar_table.md").read_text()
    assert "| 4 | 1 | 10.0 | none | 20.0 |" in (tmp_path / "figures" / "lunar_table.md").read_text()  # one seed: no interval


def test_claims_2_and_3_are_whole_run_means_compared_with_k_0_as_the_authors_plotting_code_does(tmp_path):
    """plotting/two_alg_aux.py: per seed the mean over its rows that have the statistic, then over seeds; the gap's
    increase is k's - DQN's, the overestimation's % decrease -(k's - DQN's) / (|DQN's| + 1e-8) x 100."""
    runs = {(0, 1): ([None, 0.25, 0.75], [1.0, 2.0, 3.0]), (0, 2): ([None, 1.0, 1.0], [3.0, 3.0, 3.0]),
            (4, 1): ([None, 2.0, 4.0], [1.0, 1.0, 1.0]), (16, 1): ([None, None, None], [2.5, 2.5, 2.5])}
    for (k, seed), (gaps, over) in runs.items():
        rows = [{"step": s, "mean": 1.0, "overestimation": o, "normalized_overestimation": 0.0, "action_gap": None,
                 "relative_action_gap": g} for s, g, o in zip((0, 10, 20), gaps, over)]
        os.makedirs(tmp_path / f"k{k}_s{seed}")
        (tmp_path / f"k{k}_s{seed}" / "evaluations.json").write_text(json.dumps({"config": {"me_coef": float(k), "seed": seed},
                                                                                 "evaluations": rows}))
    table = sweep.plot(str(tmp_path), str(tmp_path / "figures"))
    assert table[0.0]["relative_action_gap"] == (0.5 + 1.0) / 2 and table[0.0]["overestimation"] == (2.0 + 3.0) / 2
    assert table[4.0]["relative_action_gap_increase"] == 3.0 - 0.75
    assert table[4.0]["overestimation_decrease_pct"] == -(1.0 - 2.5) / (2.5 + 1e-8) * 100
    assert np.isnan(table[16.0]["relative_action_gap"]) and table[16.0]["overestimation_decrease_pct"] == pytest.approx(0.0)
    text = (tmp_path / "figures" / "lunar_table.md").read_text()
    assert "| 4 | 1 | 1.0 | none | 1.0 |" in text and "| 3.0000 | +2.2500 | 1.000 | 60.0 |" in text
    assert "| n/a | n/a | 2.500 | 0.0 |" in text  # k = 16's runs predate the statistic


def test_runs_evaluated_at_other_steps_are_not_averaged_together(tmp_path):
    write_run(tmp_path, 0, 1, [1, 2, 3])
    write_run(tmp_path, 4, 1, [1, 2], steps=(0, 10))
    with pytest.raises(SystemExit, match="evaluated at different steps"):
        sweep.load_sweep(str(tmp_path))


def test_a_folder_with_a_member_twice_or_two_settings_is_refused(tmp_path):
    write_run(tmp_path / "twice", 0, 1, [1, 2, 3])
    write_run(tmp_path / "twice", 0, 1, [3, 4, 5], name="again")  # the same k and seed run again, say under runs/
    with pytest.raises(SystemExit, match="k = 0, seed 1 twice"):
        sweep.load_sweep(str(tmp_path / "twice"))
    write_run(tmp_path / "mixed", 0, 1, [1, 2, 3], gamma=0.99, exp_name="a")
    write_run(tmp_path / "mixed", 4, 1, [1, 2, 3], gamma=0.99, exp_name="b")  # another name changes no number
    assert set(sweep.load_sweep(str(tmp_path / "mixed"))) == {0.0, 4.0}
    write_run(tmp_path / "mixed", 16, 1, [1, 2, 3], gamma=0.9)
    with pytest.raises(SystemExit, match="trained with different flags"):
        sweep.load_sweep(str(tmp_path / "mixed"))


def run_sweep(out, *flags):
    tiny = ["--dqn.total-timesteps", "400", "--dqn.learning-starts", "200", "--dqn.eval-interval", "200",
            "--dqn.eval-episodes", "1", "--no-compile"]
    return subprocess.run([sys.executable, os.path.join(ROOT, "dqn_meanexp_sweep.py"), "--out", str(out), *tiny, *flags],
                          capture_output=True, text=True, cwd=ROOT)


def test_the_sweep_runs_in_parts_into_one_folder_and_refuses_to_mix_settings(tmp_path):
    out = tmp_path / "sweep"
    first = run_sweep(out, "--ks", "0", "--seeds", "1", "2")
    assert first.returncode == 0, first.stderr
    assert "training 2 members in 2 worker(s)" in first.stdout
    second = run_sweep(out, "--ks", "0", "4", "--seeds", "1", "2", "--workers", "1", "--dqn.exp-name", "renamed")
    assert second.returncode == 0, second.stderr
    assert "training 2 members in 1 worker(s)" in second.stdout  # k = 0 was there already
    assert sorted(os.listdir(out / "runs")) == ["k0__seed1", "k0__seed2", "k4__seed1", "k4__seed2"]
    parts = sorted(glob.glob(str(out / "parts" / "*.json")))
    assert len(parts) == 2
    with open(parts[-1]) as f:
        record = json.load(f)
    assert record["members"] == [[4.0, 1], [4.0, 2]] and record["workers"] == 1
    assert record["flop"] == 2 * 201 * 3 * 2 * 128 * (8 * 256 + 256 * 256 + 256 * 4)  # 2 members, updates at 200..400
    assert record["ratio_to_floor"] == pytest.approx(record["wall_seconds"] / record["floor_seconds"])
    assert record["gemm_gflops_before"] > 0
    assert record["machine"] == f"{cpu_model()}, {os.cpu_count()} cores"  # bit-equality holds per CPU model (issue 31)
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    assert record["code"].split()[0] == head  # the commit the part ran, for the committed results
    assert set(record["workers_detail"][0]["phases"]) == {"act", "env", "update", "evaluate"}
    assert "| 4 | 2 |" in (out / "lunar_table.md").read_text() and (out / "lunar_k_auc.png").exists()

    # benchmarks/sweep_time.py adds the parts up from these records, as benchmarks/README.md quotes it
    records = [json.load(open(path)) for path in parts]
    summary = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "sweep_time.py"), "--folder", str(out)],
                             capture_output=True, text=True, cwd=ROOT)
    assert summary.returncode == 0, summary.stderr
    last = summary.stdout.splitlines()[-1].split("|")
    ratio = sum(r["wall_seconds"] for r in records) / sum(r["floor_seconds"] for r in records)
    assert last[1].strip() == "all 2 parts" and last[3].strip() == "4" and last[7].strip() == f"{ratio:.2f}x"
    eval_steps = 0  # every member: 3 evaluations (steps 0, 200, 400) of 1 episode
    for path in glob.glob(str(out / "runs" / "*" / "evaluations.json")):
        eval_steps += round(sum(row["length"] for row in json.load(open(path))["evaluations"]))
    assert last[10].strip() == f"{eval_steps:,}" and eval_steps >= 4 * 3
    phases = [sum(sum(w["phases"][name] for w in r["workers_detail"]) / len(r["workers_detail"]) / 60 for r in records)
              for name in ("update", "evaluate", "env", "act")]  # one worker's minutes a phase, summed over the parts
    assert last[9].strip() == " / ".join(f"{m:.1f}" for m in phases) and phases[0] > 0
    # benchmarks/sweep_bound.py counts what each worker of each part had to do, from the same records
    counts = sweep_bound.sweep_counts(str(out))
    lengths = {}  # env steps of each member's evaluations
    for path in glob.glob(str(out / "runs" / "*" / "evaluations.json")):
        lengths[os.path.basename(os.path.dirname(path))] = [row["length"] for row in json.load(open(path))["evaluations"]]
    assert [len(part["workers"]) for part in counts] == [2, 1]
    for worker, member in zip(counts[0]["workers"], ("k0__seed1", "k0__seed2")):  # one member each
        assert worker == {"updates": 201, "train_env_steps": 400, "act_forwards": pytest.approx(sum(
            1 - (1 - 0.95 * t / 10_000) for t in range(400))), "eval_env_steps": sum(lengths[member]),
            "eval_forwards": sum(lengths[member]), "members": 1}
    (both,) = counts[1]["workers"]  # k = 4, seeds 1 and 2 in lockstep: an evaluation lasts as long as the longer one
    assert both["train_env_steps"] == 800 and both["act_forwards"] == pytest.approx(
        sum(1 - (1 - 0.95 * t / 10_000) ** 2 for t in range(400)))
    assert both["eval_forwards"] == sum(map(max, lengths["k4__seed1"], lengths["k4__seed2"]))
    assert both["eval_env_steps"] == sum(lengths["k4__seed1"]) + sum(lengths["k4__seed2"])

    before = sorted(os.listdir(out / "runs"))
    mixed = subprocess.run([sys.executable, os.path.join(ROOT, "dqn_meanexp_sweep.py"), "--out", str(out), "--ks", "0",
                            "--seeds", "1", "--dqn.total-timesteps", "600"], capture_output=True, text=True, cwd=ROOT)
    assert mixed.returncode == 2 and "trained with other flags" in mixed.stderr
    assert sorted(os.listdir(out / "runs")) == before
    # a member not yet in the folder, with flags other than the folder's: refused before training too (issue 34)
    new_k = subprocess.run([sys.executable, os.path.join(ROOT, "dqn_meanexp_sweep.py"), "--out", str(out), "--ks", "3",
                            "--seeds", "1", "--dqn.total-timesteps", "600"], capture_output=True, text=True, cwd=ROOT)
    assert new_k.returncode == 2 and "--dqn.total-timesteps 400 (here 600)" in new_k.stderr, new_k.stderr
    assert sorted(os.listdir(out / "runs")) == before


@pytest.mark.parametrize("flags,message", [
    (["--ks", "-1"], "k must be a finite number >= 0"),
    (["--ks", "nan"], "k must be a finite number >= 0, got nan"),  # issue 34: it wrote NaN into evaluations.json
    (["--ks", "1000000", "1000001"], "--ks 1000000 and 1000001 would share one folder (k1e+06__seed1)"),
    (["--seeds", "-1"], "--seeds: a seed must be in [0, 2^32 - 2], got -1"),
    (["--out", "{tmp}/a_file/sweep"], "a_file is not a folder this user can write into"),  # it was found after training
    (["--seeds", "1", "1"], "without repeats"),
    (["--workers", "0"], "--workers must be at least 1"),
    (["--dqn.batch-size", "0"], "--dqn.batch-size must be in [1, inf]"),  # as the user typed it (issue 34)
    (["--dqn.seed", "5"], "--dqn.seed is set for each member by --seeds (got 5)"),  # these were silently ignored
    (["--dqn.me-coef", "7"], "--dqn.me-coef is set for each member by --ks (got 7.0)"),
])
def test_bad_sweep_flags_are_refused_before_anything_is_written(tmp_path, flags, message):
    (tmp_path / "a_file").write_text("")
    result = run_sweep(tmp_path / "sweep", *(flag.format(tmp=tmp_path) for flag in flags))
    assert result.returncode == 2 and message in result.stderr
    assert not (tmp_path / "sweep").exists()


def test_the_time_bound_adds_each_parts_slowest_worker_and_its_profile_finds_the_kernels():
    costs = {"products": 0.004, "elementwise": 0.0005, "adam": 0.001, "env_step": 1e-4, "forward": 2e-4}
    fast = {"updates": 1000, "train_env_steps": 5000, "act_forwards": 900, "eval_env_steps": 10_000, "eval_forwards": 3000}
    slow = {**fast, "eval_env_steps": 20_000, "eval_forwards": 5000}
    result = sweep_bound.bound([{"wall": 60.0, "floor": 5.0, "flop": 1e12, "workers": [fast, slow]},
                                {"wall": 30.0, "floor": 2.5, "flop": 5e11, "workers": [fast]}], costs)
    # slow: 4 + 0.5 + 1 + 0.5 + 0.18 + 2 + 1 = 9.18 s; fast: 4 + 0.5 + 1 + 0.5 + 0.18 + 1 + 0.6 = 7.78 s
    assert result["bound"] == pytest.approx(9.18 + 7.78) and result["floor"] == 7.5 and result["wall"] == 90.0
    assert result["seconds"]["evaluation forwards"] == pytest.approx(1.0 + 0.6)
    assert result["seconds"]["products"] == pytest.approx(8.0) and result["seconds"]["Adam kernel"] == pytest.approx(2.0)
    table = sweep_bound.markdown(result, costs, 5, gemm_gflops=100.0)  # a floor of 1.5e12 / 1e11 = 15 s
    assert "| **lower bound** | 0.3 | 1.13x |" in table and "against them the bound is 2.26x" in table
    measured = sweep_bound.measure(members=2, calls=20)  # the profile's kernel names are this torch's
    assert all(measured[piece] > 0 for piece in ("products", "elementwise", "adam", "env_step", "forward"))


def test_the_claim_statistic_changes_no_training_of_a_single_run(in_tmp, monkeypatch):
    """The gap's states come from a generator of its own: a run that measures it and one whose measurement is a stub
    end with the same weights and scores, bit for bit."""
    settings = dict(total_timesteps=700, learning_starts=300, eval_interval=350, eval_episodes=2, save_model=True)
    measured = dqn.main(dqn.Args(**settings, exp_name="measured"))
    monkeypatch.setattr(dqn, "measure_action_gap", lambda *args: 0.0)
    stub = dqn.main(dqn.Args(**settings, exp_name="stub"))
    assert [r["mean"] for r in measured] == [r["mean"] for r in stub]
    assert [r["overestimation"] for r in measured] == [r["overestimation"] for r in stub]
    assert [r["average_action_gap"] for r in stub] == [None, 0.0, 0.0] != [r["average_action_gap"] for r in measured]
    a, b = (torch.load(glob.glob(f"runs/*__{name}__*/{name}.cleanrl_model")[0]) for name in ("measured", "stub"))
    assert all(torch.equal(a[key], b[key]) for key in a)


def test_the_claim_statistic_changes_no_training_of_a_compiled_population(monkeypatch):
    """The sweep's compiled update returns the batches' Q for average_q besides the gradients, and each sync measures
    the gap: members trained so, and members whose update drops that output and whose gap is a stub, are equal."""
    settings = dqn.Args(total_timesteps=500, learning_starts=300, eval_interval=250, eval_episodes=1)
    members = [(4.0, 1), (0.0, 2)]
    measured = sweep.Population(settings, members, compile=True)
    rows, _ = sweep.train(measured)
    original = sweep.gradients

    def without_q(*args):
        grads, gaps, q_taken = original(*args)
        return grads, gaps, torch.zeros(q_taken.shape)

    monkeypatch.setattr(sweep, "gradients", without_q)
    monkeypatch.setattr(sweep.Population, "action_gaps", lambda self, n: np.zeros(len(self.members)))
    stub = sweep.Population(settings, members, compile=True)
    stub_rows, _ = sweep.train(stub)
    assert all(torch.equal(a, b) for a, b in zip(measured.params, stub.params))
    for i in range(len(members)):
        assert [r["mean"] for r in rows[i]] == [r["mean"] for r in stub_rows[i]]
        assert [r["average_q"] for r in stub_rows[i]] == [None, None, 0.0] != [r["average_q"] for r in rows[i]]


def test_stopping_the_sweeps_main_process_stops_its_workers(tmp_path):
    """SIGTERM to the main process (a batch system, kill) used to leave its workers training, writing members without
    a part record, then waiting on a pipe forever (issue 34). They end with it now, and write nothing."""
    proc = subprocess.Popen([sys.executable, "-u", os.path.join(ROOT, "dqn_meanexp_sweep.py"), "--out", str(tmp_path / "s"),
                             "--ks", "0", "--seeds", "1", "2", "--dqn.total-timesteps", "100000", "--no-compile"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    workers = set()
    for line in proc.stdout:  # each worker prints its pid once it has evaluated its untrained members
        if line.startswith("worker "):
            workers.add(int(line.split()[1].rstrip(":")))
        if len(workers) == 2:
            break
    proc.terminate()
    proc.wait(timeout=60)
    deadline = time.time() + 30
    while time.time() < deadline and any(os.path.exists(f"/proc/{pid}") for pid in workers):
        time.sleep(0.2)
    alive = [pid for pid in workers if os.path.exists(f"/proc/{pid}")]
    for pid in alive:
        os.kill(pid, signal.SIGKILL)
    assert not alive, f"workers {alive} outlived the sweep's main process"
    assert not (tmp_path / "s" / "runs").exists()


@pytest.mark.parametrize("content", ['{"config": {"me_coef": 0.0, "se', "{}", '{"config": {"me_coef": 0.0, "seed": 2}, '
                                     '"evaluations": [{"step": 0}]}'])
def test_a_damaged_member_is_named_not_a_traceback(tmp_path, content):
    write_run(tmp_path, 0, 1, [1, 2, 3])
    os.makedirs(tmp_path / "bad")
    (tmp_path / "bad" / "evaluations.json").write_text(content)
    result = subprocess.run([sys.executable, os.path.join(ROOT, "dqn_meanexp_sweep.py"), "--out", str(tmp_path),
                             "--plot-only"], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
    assert f"{tmp_path / 'bad' / 'evaluations.json'} cannot be read" in result.stderr


def test_a_part_that_never_learns_says_so_and_still_draws_its_figures(tmp_path):
    """--dqn.total-timesteps below --dqn.learning-starts: no update, so no floor (a ZeroDivisionError once, issue 34)."""
    result = run_sweep(tmp_path / "s", "--ks", "0", "4", "--seeds", "1", "--dqn.total-timesteps", "150",
                       "--dqn.eval-interval", "150")
    assert result.returncode == 0, result.stderr
    assert "made no update" in result.stderr
    (part,) = glob.glob(str(tmp_path / "s" / "parts" / "*.json"))
    assert json.load(open(part))["ratio_to_floor"] is None
    again = subprocess.run([sys.executable, os.path.join(ROOT, "dqn_meanexp_sweep.py"), "--out", str(tmp_path / "s"),
                            "--plot-only"], capture_output=True, text=True, cwd=ROOT)
    assert again.returncode == 0, again.stderr


def test_a_second_sweep_into_a_folder_in_use_is_refused_before_it_trains(tmp_path):
    """Issue 34: two sweeps into one --out both trained the same members, and one printed the other's numbers as its own.
    One sweep per folder: the second is refused (exit 2) naming the first, and trains nothing."""
    import fcntl

    out = tmp_path / "sweep"
    out.mkdir()
    with open(out / "run.lock", "a+") as held:  # the first sweep, as its lock file says
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("pid 12345 on elsewhere, since 2026-12-05 10:00:00 UTC\n")
        held.flush()
        result = run_sweep(out, "--ks", "0", "--seeds", "1", "--dqn.total-timesteps", "600")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert f"{out} is in use by another process (pid 12345 on elsewhere" in result.stderr
    assert "Wait for it to end, or choose another --out" in result.stderr
    assert not (out / "runs").exists()
