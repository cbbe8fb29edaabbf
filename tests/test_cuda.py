"""The CUDA path (issue 33): every paper row trains there, a run cut by SIGTERM resumes there bit for bit, checkpoints
and saved models move between the GPU and the CPU, one update agrees with the CPU's, --compile (with CUDA graphs too)
runs, and the learning step never waits for the GPU.

    python -m pytest -m cuda tests        # on a machine with a CUDA device; skipped elsewhere

benchmarks/gpu_check.py runs these first on a GPU machine. Its --dry-run runs them on the CPU
(MEANEXP_CUDA_TESTS_ON_CPU=1: "the device" is then the CPU), so that no GPU minute goes to a broken test.
"""

import copy
import json
import os

import numpy as np
import pytest
import torch

import dqn_atari_meanexp as dqn
import iqn_atari_meanexp as iqn
import longrun
from test_resume import SMALL_IQN, TINY, interrupt, load_model, run, scalars, start

ON_CPU = os.environ.get("MEANEXP_CUDA_TESTS_ON_CPU") == "1"  # the dry run: the same tests, the CPU standing in
DEVICE = "cpu" if ON_CPU or not torch.cuda.is_available() else "cuda"
pytestmark = [pytest.mark.cuda, pytest.mark.skipif(DEVICE == "cpu" and not ON_CPU, reason="needs a CUDA device")]
ON_DEVICE = [flag for flag in TINY if flag != "--no-cuda"] + ([] if DEVICE == "cuda" else ["--no-cuda"])
SCRIPTS = {"dqn": dqn, "iqn": iqn}
# the paper's rows (README.md), IQN with CPU-sized quantile samples
ROWS = {"dqn": ("dqn", ["--me-coef", "0"]), "ib_dqn": ("dqn", []), "ib_dqn1": ("dqn", ["--me-coef", "1"]),
        "dqn_rmsprop_huber": ("dqn", ["--me-coef", "0", "--optimizer", "rmsprop", "--loss", "huber"]),
        "ib_dqn_rmsprop_huber": ("dqn", ["--optimizer", "rmsprop", "--loss", "huber"]),
        "dueling_dqn": ("dqn", ["--network", "dueling"]), "rdq": ("dqn", ["--network", "rdq", "--loss", "mse"]),
        "iqn": ("iqn", ["--me-coef", "0", *SMALL_IQN]), "ib_iqn": ("iqn", SMALL_IQN)}


def final_eval(run_dir):
    return json.loads((run_dir / "final_eval.json").read_text())


@pytest.mark.parametrize("row", ROWS)
def test_every_paper_row_trains_on_the_device(tmp_path, row):
    algo, flags = ROWS[row]
    run(algo, tmp_path, *ON_DEVICE, *flags, "--total-timesteps", "600", "--run-name", "r")
    config = json.loads((tmp_path / "runs/r/config.json").read_text())
    assert config["device"].startswith(DEVICE) and config["tf32"] is False
    assert np.isfinite(final_eval(tmp_path / "runs/r")["mean"])
    assert all(np.isfinite(v).all() for _, v in scalars(tmp_path / "runs/r")["losses/td_loss"])


@pytest.mark.parametrize("algo", ["dqn", "iqn"])
def test_a_run_cut_by_sigterm_and_resumed_on_the_device_equals_the_straight_run(tmp_path, algo):
    """cuDNN is deterministic (--torch-deterministic, the default) and nothing else in an update adds in a varying
    order, so the weights, losses and scores are equal to the bit, as on the CPU (tests/test_resume.py)."""
    flags = [*ON_DEVICE, *(SMALL_IQN if algo == "iqn" else []), "--save-model", "--progress-interval", "0.001"]
    run(algo, tmp_path, *flags, "--run-name", "straight")
    proc = start(algo, tmp_path, *flags, "--run-name", "cut")
    output = interrupt(proc, at_step=500)
    assert proc.returncode == longrun.EXIT_REQUEUE, output
    run(algo, tmp_path, "--resume", "runs/cut")
    name = f"{algo}_atari_meanexp.cleanrl_model"
    a, b = (load_model(tmp_path / f"runs/{r}/{name}") for r in ("straight", "cut"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    logs_a, logs_b = scalars(tmp_path / "runs/straight"), scalars(tmp_path / "runs/cut")
    assert logs_a["losses/td_loss"] == logs_b["losses/td_loss"]
    assert final_eval(tmp_path / "runs/straight")["scores"] == final_eval(tmp_path / "runs/cut")["scores"]


@pytest.mark.parametrize("there,back", [("device", "cpu"), ("cpu", "device")])
def test_a_checkpoint_resumes_on_the_other_device(tmp_path, there, back):
    """--cuda / --no-cuda may change on --resume: the checkpoint is read onto whichever device the run goes on with."""
    on = {"device": ["--cuda"] if DEVICE == "cuda" else ["--no-cuda"], "cpu": ["--no-cuda"]}
    flags = [f for f in ON_DEVICE if f != "--no-cuda"] + [*SMALL_IQN, "--progress-interval", "0.001", "--save-model"]
    proc = start("iqn", tmp_path, *flags, *on[there], "--run-name", "moved")
    output = interrupt(proc, at_step=500)
    assert proc.returncode == longrun.EXIT_REQUEUE, output
    resumed = run("iqn", tmp_path, "--resume", "runs/moved", *on[back])
    assert "resumed runs/moved at step" in resumed.stdout
    config = json.loads((tmp_path / "runs/moved/config.json").read_text())
    devices = {"device": DEVICE, "cpu": "cpu"}
    assert config["device"].startswith(devices[there]) and config["resumes"][0]["device"].startswith(devices[back])
    assert all(w.isfinite().all() for w in load_model(tmp_path / "runs/moved/iqn_atari_meanexp.cleanrl_model").values())
    assert np.isfinite(final_eval(tmp_path / "runs/moved")["mean"])


def test_a_model_trained_on_the_device_plays_on_the_cpu(tmp_path):
    run("dqn", tmp_path, *ON_DEVICE, "--total-timesteps", "400", "--save-model", "--seed", "5", "--run-name", "m")
    proc = run("dqn", tmp_path, "--eval-model", "runs/m/dqn_atari_meanexp.cleanrl_model", "--no-cuda")
    result = json.loads((tmp_path / "runs/m/dqn_atari_meanexp_eval_seed5.json").read_text())
    assert result["episodes"] == 2 and np.isfinite(result["mean"]) and "evaluation of runs/m" in proc.stdout


def random_replay(script, device, seed=0):
    """The script's replay buffer on `device`, holding 300 random frames in episodes of 50."""
    rb = script.ReplayBuffer(400, 1, torch.device(device), seed=seed)
    rng = np.random.default_rng(seed)
    for i in range(300):
        rb.add(rng.integers(0, 256, (1, 84, 84), dtype=np.uint8), np.array([i % 50 == 0]), rng.integers(18, size=1),
               rng.integers(-1, 2, size=1), np.array([i % 50 == 49]), np.zeros(1, bool))
    return rb


def replay_batch(script, device, seed=0):
    return random_replay(script, device, seed).sample(32)


@pytest.fixture
def float32_on_cuda():
    """TF32 off in matmuls and convolutions (the scripts' default, --tf32 off), as the scripts' main() sets it."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


class CpuRandom:
    """torch.rand drawn on the CPU from one seeded generator, then moved: IQN's taus are the same on both devices."""

    rand = staticmethod(torch.rand)  # PyTorch's own, kept before any test replaces it

    def __init__(self, seed):
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, *size, device=None):
        return self.rand(*size, generator=self.generator).to(device)


@pytest.mark.parametrize("algo,flags", [("dqn", []), ("dqn", ["--optimizer", "rmsprop", "--loss", "huber"]),
                                        ("dqn", ["--network", "rdq", "--loss", "mse"]), ("iqn", SMALL_IQN)])
def test_one_update_on_the_cpu_and_on_the_device_agree(monkeypatch, float32_on_cuda, algo, flags):
    """The stated tolerance, TF32 off: the loss within a relative 1e-5, and every weight's step within 1e-5, 1% of
    the learning rate, the size of Adam's first step (float32 sums in another order; on the CPU standing in, equal)."""
    script = SCRIPTS[algo]
    args = script.parse_args(["--learning-rate", "1e-3", *flags])  # large steps: differences would show
    torch.manual_seed(0)
    network = script.make_network(args, 18, 18.0)
    start_weights = copy.deepcopy(network.state_dict())
    results = []
    for device in ("cpu", DEVICE):
        monkeypatch.setattr(torch, "rand", CpuRandom(seed=1))
        net = copy.deepcopy(network).to(device)
        target, optimizer = copy.deepcopy(net), script.make_optimizer(args, net)
        loss = script.update(net, target, optimizer, replay_batch(script, device), args)[0].item()
        results.append((loss, {k: v.cpu() - start_weights[k] for k, v in net.state_dict().items()}))
    (cpu_loss, cpu_steps), (device_loss, device_steps) = results
    assert device_loss == pytest.approx(cpu_loss, rel=1e-5)
    for name in cpu_steps:
        torch.testing.assert_close(device_steps[name], cpu_steps[name], rtol=0, atol=1e-5)
    assert max(step.abs().max().item() for step in cpu_steps.values()) > 5e-4  # the update moved the weights


@pytest.mark.parametrize("algo", ["dqn", "iqn"])
def test_the_compiled_loss_gives_the_eager_losses_on_the_device(float32_on_cuda, algo):
    script = SCRIPTS[algo]
    args = script.parse_args(["--learning-rate", "1e-3", *(SMALL_IQN if algo == "iqn" else [])])
    torch.manual_seed(0)
    network = script.make_network(args, 18, 18.0).to(DEVICE)
    losses = {}
    for compiled in (False, True):
        net = copy.deepcopy(network)
        target, optimizer = copy.deepcopy(net), script.make_optimizer(args, net)
        loss_fn = torch.compile(script.LOSS, dynamic=False) if compiled else script.LOSS
        torch.manual_seed(1)
        with torch._inductor.config.patch(fallback_random=True):  # IQN's taus: the same numbers as eager mode draws
            losses[compiled] = [script.update(net, target, optimizer, replay_batch(script, DEVICE, seed=i), args, loss_fn)[0]
                                .item() for i in range(4)]
    np.testing.assert_allclose(losses[True], losses[False], rtol=1e-4)  # fused kernels, sums in another order


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_a_compiled_run_trains_on_the_device(tmp_path, mode):
    """--compile, and --compile-mode reduce-overhead: CUDA graphs on a GPU (on the CPU the same code without them)."""
    run("dqn", tmp_path, *ON_DEVICE, "--total-timesteps", "500", "--compile", "--compile-mode", mode, "--run-name", "c")
    assert np.isfinite(final_eval(tmp_path / "runs/c")["mean"])
    assert all(np.isfinite(v) for _, v in scalars(tmp_path / "runs/c")["losses/td_loss"])


@pytest.mark.skipif(DEVICE == "cpu", reason="a CPU has no device to wait for")
@pytest.mark.parametrize("algo,flags", [("dqn", []), ("dqn", ["--optimizer", "rmsprop", "--loss", "huber"]),
                                        ("dqn", ["--network", "rdq", "--loss", "mse"]), ("iqn", [])])
def test_learning_never_waits_for_the_gpu(algo, flags):
    """learn(): sampling a batch (pinned host memory), the update, the loss's statistics and the check for non-finite
    values queue work on the GPU and never wait for it (torch.cuda.set_sync_debug_mode raises on any wait)."""
    script = SCRIPTS[algo]
    args = script.parse_args(flags)
    device = torch.device("cuda")
    network = script.make_network(args, 18, 18.0).to(device)
    rb = random_replay(script, device)
    setup = script.TrainingSetup(device, 18, 18.0, network, copy.deepcopy(network), script.make_optimizer(args, network), rb,
                                 envs=None, eval_env=None, rng=None, eval_rng=None, loss_fn=script.LOSS)
    state = script.LoopState(obs=None, resetting=None, sums=torch.zeros(3, device=device),
                             bad_step=torch.tensor(-1, device=device), updates_from=(0, 0), global_step=4,
                             q_record=torch.zeros(script.Q_RECORD, device=device))
    script.learn(args, setup, state)  # the first update creates the optimizer's state
    torch.cuda.synchronize()
    state.global_step = 4 * 11
    torch.cuda.set_sync_debug_mode("error")
    try:
        script.learn(args, setup, state)  # ten more updates
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert state.updates == 11 and int(state.bad_step) == -1 and state.sums.isfinite().all()
