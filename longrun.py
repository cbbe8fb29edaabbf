"""The long-run machinery of dqn_atari_meanexp.py and iqn_atari_meanexp.py, kept once (as CleanRL keeps what is not the
algorithm in cleanrl_utils): flag checks, the run directory (locked: one process per run) and config.json, checkpoints
and exact resume, memory and disk checks, failed writes, signals and exit codes, the progress line, --track, --eval-model.

A first reader can skip this file. Nothing in it changes a number a run reports: the experiment (network, loss,
environment, replay buffer, evaluation, the loop) is in the scripts, which hand it what it calls as an `Experiment`.
"""

import collections
import dataclasses
import difflib
import fcntl
import importlib.util
import itertools
import json
import os
import pickle
import random
import re
import shutil
import signal
import socket
import sys
import tempfile
import time
import weakref
from dataclasses import dataclass
from typing import Callable, Optional

import ale_py
import gymnasium as gym
import numpy as np
import torch
import tyro
from torch.utils.tensorboard import SummaryWriter


@dataclass(frozen=True)
class Experiment:
    """What a script hands the machinery: its algorithm's name and the pieces of its experiment the machinery calls (to
    probe |A|, check and size the replay buffer, record the settings, and play a saved network for --eval-model)."""

    algo: str  # "dqn" or "iqn": names the script; config.json and checkpoints record it
    args_type: type  # the script's Args dataclass
    fixed_settings: dict  # what config.json records of the algorithm besides the flags
    algo_errors: Callable  # args -> messages about the algorithm's own flags
    make_env: Callable  # (args, seed) -> a thunk that builds one env
    make_eval_env: Callable  # (args, capture_video, video_dir) -> (the evaluation env, its epsilon generator)
    make_network: Callable  # (args, n_actions, me_coef) -> the network
    default_me_coef: Callable  # (args, n_actions) -> k where --me-coef is not given
    replay_buffer: type  # the script's ReplayBuffer: its bytes_needed() and MIN_SLOTS_PER_ENV
    evaluate: Callable  # the script's evaluate()
    final_statistics: Callable  # what final_eval.json reports of an evaluation


def check_args(args, x: Experiment) -> list:
    """Returns one message per bad setting (empty when all are fine)."""
    errors = []
    if args.env_id not in gym.registry:
        close = difflib.get_close_matches(args.env_id, [i for i in gym.registry if "ALE/" in i or "NoFrameskip-v4" in i])
        hint = f"did you mean {' or '.join(map(repr, close))}?" if close else "use e.g. ALE/Breakout-v5"
        errors.append(f"--env-id {args.env_id!r} is not a registered gymnasium id; {hint}")
    elif "ale_py" not in str(gym.registry[args.env_id].entry_point):
        errors.append(f"--env-id {args.env_id!r} is not an Atari (ale-py) game; use e.g. ALE/Breakout-v5")
    positive = ["total_timesteps", "num_envs", "buffer_size", "batch_size", "target_network_frequency", "train_frequency",
                "frame_skip", "max_episode_steps", "eval_steps", "final_eval_episodes", "log_interval", "learning_rate",
                "optimizer_eps", "progress_interval", "keep_checkpoints"]
    non_negative = ["noop_max", "eval_interval", "exploration_steps", "learning_starts", "checkpoint_interval"]
    probabilities = ["start_e", "end_e", "eval_epsilon"]
    for name in positive:
        if not getattr(args, name) > 0:
            errors.append(f"--{name.replace('_', '-')} must be > 0 (got {getattr(args, name)})")
    for name in non_negative:
        if not getattr(args, name) >= 0:
            errors.append(f"--{name.replace('_', '-')} must be >= 0 (got {getattr(args, name)})")
    for name in probabilities:
        if not 0.0 <= getattr(args, name) <= 1.0:
            errors.append(f"--{name.replace('_', '-')} must be in [0, 1] (got {getattr(args, name)})")
    if not 0.0 <= args.sticky_action_prob < 1.0:
        errors.append(f"--sticky-action-prob must be in [0, 1) (got {args.sticky_action_prob})")
    if not 0.0 < args.gamma <= 1.0:
        errors.append(f"--gamma must be in (0, 1] (got {args.gamma})")
    if args.me_coef is not None and not (0.0 <= args.me_coef < float("inf")):
        errors.append(f"--me-coef must be a finite number >= 0 (got {args.me_coef}); 0 is plain {x.algo.upper()}")
    if args.batch_size > args.learning_starts:
        errors.append(f"--batch-size {args.batch_size} is larger than --learning-starts {args.learning_starts}: "
                      "the first update would sample more transitions than the buffer holds")
    if args.num_envs > 0 and args.buffer_size < x.replay_buffer.MIN_SLOTS_PER_ENV * args.num_envs:
        errors.append(f"--buffer-size {args.buffer_size} is too small for {args.num_envs} envs "
                      f"(at least {x.replay_buffer.MIN_SLOTS_PER_ENV} per env)")
    if args.batch_size > args.buffer_size > 0:
        errors.append(f"--batch-size {args.batch_size} is larger than --buffer-size {args.buffer_size}")
    if args.run_name is not None and (not args.run_name or "/" in args.run_name or args.run_name in (".", "..")):
        errors.append(f"--run-name {args.run_name!r} must be a plain directory name (no '/')")
    if args.compile_mode != "default" and not args.compile:
        errors.append(f"--compile-mode {args.compile_mode} applies with --compile only")
    if args.capture_video and importlib.util.find_spec("moviepy") is None:
        errors.append("--capture-video needs moviepy: pip install moviepy")
    if args.track and importlib.util.find_spec("wandb") is None:
        errors.append("--track needs wandb: pip install -r requirements-track.txt (docs/long-runs.md, 'Experiment "
                      "tracking')")
    return errors + x.algo_errors(args)


RESUME_MAY_CHANGE = ("total_timesteps", "checkpoint_interval", "checkpoint_buffer", "keep_checkpoints", "progress_interval",
                     "cuda", "save_model", "compile", "compile_mode", "track", "wandb_project_name", "wandb_entity",
                     "wandb_group")


CHECKPOINT = "checkpoint.pt"  # in the run directory: the newest checkpoint
OLDER_CHECKPOINT = "checkpoint_step{step}.pt"  # the ones --keep-checkpoints keeps besides it
LOCK = "run.lock"  # in the run directory: locked by the one process that runs it, and naming it


def older_checkpoints(run_dir: str) -> list:
    """The file names of the run's older checkpoints (--keep-checkpoints), the newest first."""
    steps = [int(m.group(1)) for m in map(re.compile(r"^checkpoint_step(\d+)\.pt$").match, os.listdir(run_dir)) if m]
    return [OLDER_CHECKPOINT.format(step=step) for step in sorted(steps, reverse=True)]


def lock_run_dir(run_dir: str, wait_seconds: float = 2.0):
    """Locks the run directory for this process's whole life (flock: the kernel lets go when the process ends, kill -9
    included). Where another process still holds it after wait_seconds (a requeued job may start while the old process
    is ending): exits with code 2, naming it as the lock file does. Returns the open lock file, which must stay open;
    name_holder() writes this process into it once the run writes anything (a refused command changes nothing)."""
    lock = open(os.path.join(run_dir, LOCK), "a+")  # creates it where missing (a run from before the lock)
    try:
        taken = flock_within(lock, wait_seconds)
    except OSError as e:  # a filesystem without flock: NFS with local_lock=none, Lustre mounted without -o flock
        print(f"warning: {run_dir}: this filesystem does not lock files ({e}): nothing keeps a second process out "
              "of this run directory (docs/long-runs.md, 'One process per run')", file=sys.stderr)
        return lock
    if not taken:
        lock.seek(0)
        holder = lock.read().strip() or "a process that has not written its name yet"
        fail([f"{run_dir} is in use by another process ({holder}): one process per run directory. Let it finish, "
              f"or stop it (it checkpoints on SIGTERM), then --resume {run_dir}; nothing was written"])
    HELD_LOCKS.add(lock)  # forked env workers close their copy (leave_signals_to_main_process)
    return lock


def flock_within(lock, wait_seconds: float, waiting: Optional[str] = None) -> bool:
    """Takes an exclusive flock on the open file `lock`, trying every 0.1 s for up to wait_seconds (printing `waiting`
    once where it must wait). False where another process still holds it; OSError where the filesystem has no locks."""
    deadline = time.monotonic() + wait_seconds
    while True:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() > deadline:
                return False
            if waiting:
                print(waiting, flush=True)
                waiting = None
            time.sleep(0.1)


def name_holder(lock):
    """Writes who holds the lock (pid, host, start time) into the lock file, for a process that finds it taken."""
    lock.seek(0)
    lock.truncate()
    lock.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S %Z')}\n")
    lock.flush()


def load_newest_checkpoint(run_dir: str) -> dict:
    """The newest checkpoint that can be read: checkpoint.pt, else the older ones --keep-checkpoints kept, newest first.
    An unreadable one (truncated, corrupted) is named and set aside as NAME.unreadable; none readable: exits with code 2."""
    unreadable = []  # (path, what is wrong)
    if not os.path.exists(os.path.join(run_dir, CHECKPOINT)):  # only a kill between two renames of an old version
        print(f"warning: {run_dir} has no {CHECKPOINT}: trying the older checkpoints", file=sys.stderr)
    for name in [CHECKPOINT] * os.path.exists(os.path.join(run_dir, CHECKPOINT)) + older_checkpoints(run_dir):
        path = os.path.join(run_dir, name)
        try:
            saved = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
            if not (isinstance(saved, dict) and "global_step" in saved):
                raise ValueError("not a checkpoint of these scripts")
        except OSError as e:  # the file is there but cannot be read now (permissions, I/O): not its content's fault
            fail([f"{path} cannot be opened ({e}); nothing was changed: fix the access, then --resume {run_dir} again"],
                 EXIT_STORAGE)
        except (RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as e:  # "failed finding central directory", ...
            unreadable.append((path, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"))
            continue
        for bad, why in unreadable:  # only once a readable one is found: a failed resume renames nothing
            names = (f"{bad}.unreadable{n or ''}" for n in itertools.count())  # .unreadable, .unreadable1, ...
            aside = next(name for name in names if not os.path.exists(name))
            print(f"warning: {bad} cannot be read: truncated or corrupted ({why}); set aside as {aside}", file=sys.stderr)
            os.replace(bad, aside)  # keeps the evidence, and frees the name for the next checkpoint
        if unreadable:
            print(f"warning: resuming from the newest readable checkpoint, {path} (step {saved['global_step']:,}): the "
                  "steps after it are trained again", file=sys.stderr)
        return saved
    fail([f"{bad} cannot be read: truncated or corrupted ({why})" for bad, why in unreadable] +
         [f"--resume {run_dir}: no readable checkpoint is left (--keep-checkpoints 2 or more keeps older ones). What "
          "remains: config.json (the settings and command) and the TensorBoard logs; start the run again under another "
          "--run-name"])


def read_config(run_dir: str) -> Optional[dict]:
    """The settings a run recorded in its config.json, or None where there is no readable one."""
    try:
        with open(os.path.join(run_dir, "config.json")) as f:
            config = json.load(f)
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) and "algo" in config else None


def parse_args(x: Experiment, argv=None):
    """The command line. With --resume RUN_DIR (or --eval-model RUN_DIR/MODEL), the flags not given take the run's
    saved settings, not the defaults."""
    args = tyro.cli(x.args_type, args=argv)
    run_dir = args.resume
    if args.eval_model is not None:
        run_dir = os.path.dirname(args.eval_model) or "."
    config = read_config(run_dir) if run_dir is not None else None
    if config is None:
        return args  # main() explains what is wrong with --resume; --eval-model without config.json uses the flags
    saved = {field.name: config[field.name] for field in dataclasses.fields(x.args_type) if field.name in config}
    if args.eval_model is not None:
        saved.pop("track", None)  # an evaluation is not tracked
    default = x.args_type(**{**saved, "resume": args.resume, "eval_model": args.eval_model})
    return tyro.cli(x.args_type, args=argv, default=default)


def check_command_line(args, x: Experiment):
    """Refuses a bad command line before anything is built or written: names every problem, exits with code 2."""
    errors = check_args(args, x) + (check_resume(args, x) if args.resume is not None else [])
    if errors:
        fail(errors)


def check_resume(args, x: Experiment) -> list:
    """Returns one message per reason --resume cannot continue the run (empty when it can)."""
    run_dir = args.resume
    if not os.path.isdir(run_dir):
        return [f"--resume {run_dir!r}: no such directory"]
    config = read_config(run_dir)
    if config is None:
        return [f"--resume {run_dir!r} is not a run directory of these scripts (no readable config.json)"]
    if config["algo"] != x.algo:
        return [f"--resume {run_dir!r} is a {config['algo'].upper()} run: resume it with {config['algo']}_atari_meanexp.py"]
    errors = []
    if not os.path.isfile(os.path.join(run_dir, CHECKPOINT)) and not older_checkpoints(run_dir):
        errors.append(f"--resume {run_dir!r} has no {CHECKPOINT} (the run stopped before its first one): "
                      "remove or rename the directory, then start the run again")
    may_change = ", ".join(f"--{name.replace('_', '-')}" for name in RESUME_MAY_CHANGE)
    for name in (field.name for field in dataclasses.fields(x.args_type)):
        if name in config and name not in (*RESUME_MAY_CHANGE, "resume") and getattr(args, name) != config[name]:
            errors.append(f"--{name.replace('_', '-')} {getattr(args, name)} differs from the run's {config[name]}: "
                          f"a resumed run keeps its settings (only {may_change} may change)")
    return errors


def available_memory_bytes() -> int:
    """Memory this process can still get: the machine's MemAvailable, or less where a cgroup
    (a container, a SLURM job) sets a lower limit."""
    def read_int(path):
        try:
            with open(path) as f:
                return int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            return None  # no such file, or "max": no limit

    try:
        with open("/proc/meminfo") as f:
            free = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    for limit, usage in [("memory.max", "memory.current"), ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes")]:
        limit, usage = read_int(f"/sys/fs/cgroup/{limit}"), read_int(f"/sys/fs/cgroup/{usage}")
        if limit is not None and usage is not None:
            free = min(free, limit - usage)
    return free


class Run:
    """One run's directory, config.json, TensorBoard writer, progress line, checkpoints and signals."""

    @classmethod
    def start(cls, args, x: Experiment, n_actions: int, me_coef: float, device: torch.device) -> Optional["Run"]:
        """The run of a command line that check_command_line passed, with the game's |A|, the run's k and the device the
        script chose: checks memory and disk before anything is written; None where a resumed run is already finished."""
        resumed, lock = None, None  # resumed: the checkpoint we continue from (its tensors stay in the file until copied)
        if args.resume is not None:
            lock = lock_run_dir(args.resume)  # before anything is read or written: one process per run directory
            resumed = load_newest_checkpoint(args.resume)
            if resumed["global_step"] > args.total_timesteps:
                fail([f"--total-timesteps {args.total_timesteps} is below the {resumed['global_step']} steps done"])
            if resumed["global_step"] == args.total_timesteps and os.path.exists(os.path.join(args.resume, "final_eval.json")):
                print(f"{args.resume} is finished ({args.total_timesteps:,} steps and final_eval.json): nothing to do "
                      "(a larger --total-timesteps extends it)")
                return None
        return cls(args, x, resumed, lock, n_actions, me_coef, device)

    def __init__(self, args, x: Experiment, resumed: Optional[dict], lock, n_actions: int, me_coef: float,
                 device: torch.device):
        self.args, self.x, self.resumed, self.lock = args, x, resumed, lock
        self.n_actions, self.me_coef, self.device = n_actions, me_coef, device
        check_memory(args, x)  # its lock is held until the script's buffer is written (memory_taken)
        if resumed is None:
            game = args.env_id.replace("/", "-")
            run_name = args.run_name or f"{game}__{args.exp_name}__k{self.me_coef:g}__{args.seed}__{int(time.time())}"
            self.dir = os.path.join("runs", run_name)
            if os.path.exists(self.dir):
                fail([f"run directory {self.dir} already exists; choose another --run-name (nothing was overwritten)"])
        else:
            self.dir, run_name = args.resume, args.run_name
        self.checkpoint_path = os.path.join(self.dir, CHECKPOINT)
        self.checkpoint_step = None if resumed is None else resumed["global_step"]  # of the last checkpoint written
        self.checkpoint_bytes = check_disk(args, x, self.dir, self.n_actions, self.me_coef)

        # Ctrl-C (SIGINT), SIGTERM or SIGUSR1 (a batch system's warning): checkpoint at the next safe point, then exit;
        # a second one while the checkpoint is written is only recorded, so the write always completes
        self.stop_signals = []
        self.previous_handlers = {sig: signal.signal(sig, lambda signum, frame: self.stop_signals.append(signum))
                                  for sig in STOP_SIGNALS}  # from before the run directory exists
        self.training_done = False
        settings = effective_settings(args, x, run_name, self.n_actions, self.me_coef, self.device)
        if resumed is not None:  # the first command stays; each resume is recorded after it, once the run goes on (begin)
            previous = read_config(self.dir)
            resume = {"step": resumed["global_step"], "time": time.time(), "command": settings["command"],
                      "device": str(self.device)}
            # me_coef_default too: the resumed Args hold the run's k as a number, but whether it was |A| by default stays
            settings.update(command=previous["command"], me_coef_default=previous["me_coef_default"],
                            resumes=previous.get("resumes", []) + [resume])
            if "wandb_run_id" in previous:  # a tracked run continues its wandb run
                settings["wandb_run_id"] = previous["wandb_run_id"]
        if args.track:  # before the run directory exists: a failed login leaves nothing behind
            settings["wandb_run_id"] = start_tracking(args, run_name, settings, self.dir)
        self.settings = settings
        if resumed is None:
            try:
                os.makedirs(self.dir)
            except FileExistsError:  # another process took this --run-name since the check above
                fail([f"run directory {self.dir} already exists; choose another --run-name (nothing was overwritten)"])
            self.lock = lock_run_dir(self.dir)
            name_holder(self.lock)
            self.write_config()
        else:
            name_holder(self.lock)  # every check passed: from here on the run writes
        # on resume, TensorBoard drops what a killed process logged after the checkpoint: no step twice, none missing
        self.writer = SummaryWriter(self.dir, purge_step=None if resumed is None else resumed["global_step"] + 1)
        if resumed is None:
            table = "\n".join(f"|{k}|{v}|" for k, v in settings.items())
            self.writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + table)
        self.interval_due = False  # a --checkpoint-interval checkpoint is due (checkpoint_due)

    def write_config(self):
        try:
            write_json(os.path.join(self.dir, "config.json"), self.settings)
        except StorageError as e:
            self.fail_storage(f"writing {os.path.join(self.dir, 'config.json')} failed ({e.__cause__})")

    def start_progress(self, step: int):
        """The progress line counts from here: the script calls it once its loop state is set up (or restored)."""
        self.progress = Progress(self.args, step, time.time())

    def memory_taken(self):
        """The script calls this once its replay buffer's pages are written: lets go of check_memory's lock."""
        release_memory_lock()

    def save_checkpoint(self, contents: dict, step: int):
        """Writes the dict the script built of its state (everything its loop needs to go on exactly as if it had never
        stopped) as the run's checkpoint: atomically, keeping --keep-checkpoints of them."""
        try:
            self.writer.flush()  # the events up to this step are on disk before the checkpoint that follows them
        except OSError as e:
            self.fail_storage(f"writing the TensorBoard events of step {step:,} failed ({e})")
        saved = {"algo": self.x.algo, **contents}
        keep_previous = self.args.keep_checkpoints > 1 and self.checkpoint_step is not None
        older = os.path.join(self.dir, OLDER_CHECKPOINT.format(step=self.checkpoint_step)) if keep_previous else None
        try:
            atomic_save(self.checkpoint_path, lambda tmp: torch.save(saved, tmp), keep_previous_as=older)
        except StorageError as e:
            kept = (f"{self.checkpoint_path} still holds step {self.checkpoint_step:,}" if self.checkpoint_step is not None
                    else "there is no earlier checkpoint")
            self.fail_storage(f"writing the checkpoint of step {step:,} failed ({e.__cause__}); the "
                              f"temporary file is removed and {kept}")
        self.checkpoint_step = step
        for name in older_checkpoints(self.dir)[self.args.keep_checkpoints - 1:]:  # the newest first: keep N in all
            try:
                os.remove(os.path.join(self.dir, name))
            except OSError as e:  # the new checkpoint is written: an old one left over costs room, not the run
                print(f"warning: could not remove {name} ({e}); the run goes on", file=sys.stderr)

    def save_network(self, name: str, state_dict: dict):
        """--save-model: the network's weights as run_dir/name, written as the checkpoints are."""
        path = os.path.join(self.dir, name)
        try:
            atomic_save(path, lambda tmp: torch.save(state_dict, tmp))
        except StorageError as e:
            self.fail_storage(f"writing {path} failed ({e.__cause__}); the checkpoint holds the whole run, so --resume "
                              "saves it again")

    def checkpoint_due(self, before: int, step: int) -> bool:
        """A checkpoint is due: every --checkpoint-interval steps (a multiple in (before, step], as the loop's crossed()),
        and after SIGINT, SIGTERM or SIGUSR1. A due checkpoint stays due until checkpoint_written()."""
        interval = self.args.checkpoint_interval
        self.interval_due |= interval > 0 and step // interval > before // interval
        return self.interval_due or bool(self.stop_signals)

    def checkpoint_written(self):
        """After a due checkpoint: where a signal asked for it, exits (for a requeue, or 130 after Ctrl-C)."""
        self.interval_due = False
        if self.stop_signals:
            self.exit_for_requeue(self.stop_signals[0])

    def stop_if_not_finite(self, bad_step: int, weights_finite: bool, step: int):
        """Stops the run, keeping the last good checkpoint, where the script found a loss or Q-value (first at bad_step;
        -1: none) or a weight that is not finite."""
        if bad_step >= 0 or not weights_finite:
            where = f"at step {bad_step:,}" if bad_step >= 0 else f"in the network's weights by step {step:,}"
            kept = f"its last good checkpoint, of step {self.checkpoint_step:,}, is kept in {self.checkpoint_path}"
            self.release()
            fail([f"a loss or Q-value that is not finite appeared {where}; the run stops ({kept})"], EXIT_NON_FINITE)

    def fail_storage(self, what: str):
        """A write failed (a full disk, a quota, an I/O error): says what is kept and how to go on, then exits with a
        code of its own, which run_all.sh reports as failed and SLURM does not requeue (the disk will not free itself)."""
        need = f"{self.checkpoint_bytes / 1e9:.2f} GB"
        self.release()
        go_on = (f"continue with --resume {self.dir}" if self.checkpoint_step is not None else
                 f"start the run again (it wrote no checkpoint: remove {self.dir} first, or choose another --run-name)")
        fail([f"{what}. The next checkpoint needs about {need} free beside the ones kept ({self.dir}; free room, or "
              f"lower --keep-checkpoints, or use --no-checkpoint-buffer), then {go_on}"], EXIT_STORAGE)

    def release(self):
        """Closes the logs and lets go of the run directory (the process is about to end, or a test goes on)."""
        if hasattr(self, "writer"):
            try:
                self.writer.close()
            except OSError as e:  # on the way out anyway (a full disk): the checkpoint is what counts
                print(f"warning: closing the TensorBoard log failed ({e})", file=sys.stderr)
        if self.lock is not None:
            self.lock.close()  # closing the file drops its flock

    def exit_for_requeue(self, signum, frame=None):
        """After a checkpoint: says how to continue, then exits: 130 after Ctrl-C, else the code a batch system requeues on."""
        code = EXIT_INTERRUPTED if signum == signal.SIGINT else EXIT_REQUEUE
        self.release()
        stage = " (it holds the whole training: the resumed run plays the final evaluation)" if self.training_done else ""
        print(f"signal {signal.Signals(signum).name}: checkpoint at step {self.checkpoint_step:,} in {self.checkpoint_path}"
              f"{stage}; continue with --resume {self.dir} (exit code {code})", flush=True)
        sys.exit(code)

    def report_progress(self, state):
        line = self.progress.line(state, time.time())
        if line is not None:
            print(line, flush=True)

    def training_ended(self):
        """Training is over and checkpointed: from here a signal stops the final evaluation at once."""
        self.training_done = True
        for sig in self.previous_handlers:  # the checkpoint holds the whole run: a signal stops the final evaluation now
            signal.signal(sig, self.exit_for_requeue)
        if self.stop_signals:  # one came on the last training step, while an env was due to autoreset
            self.exit_for_requeue(self.stop_signals[0])

    def finish(self, final: dict):
        """Writes final_eval.json (keeping an earlier result of an extended run) and closes the logs."""
        final_path = os.path.join(self.dir, "final_eval.json")
        if os.path.exists(final_path):  # a run extended with a larger --total-timesteps keeps its earlier result
            with open(final_path) as f:
                previous = json.load(f)
            os.replace(final_path, os.path.join(self.dir, f"final_eval_step{previous['total_steps']}.json"))
        try:
            write_json(final_path, final)
        except StorageError as e:
            self.fail_storage(f"writing {final_path} failed ({e.__cause__}); the checkpoint holds the whole run, so "
                              "--resume plays the final evaluation again")
        self.release()
        if self.args.track:  # the final evaluation goes into the wandb run's summary; then the upload (or offline write) ends
            import wandb

            wandb.run.summary.update({f"final_eval/{k}": v for k, v in final.items() if isinstance(v, (int, float))})
            wandb.finish()
        print(f"final evaluation: mean {final['mean']:.1f}, median {final['median']:.1f} over {final['episodes']} episodes "
              f"-> {final_path}")
        for sig, handler in self.previous_handlers.items():  # for callers that go on after main(), such as tests
            signal.signal(sig, handler)


class Progress:
    """The console progress line. Its rate and ETA are those of the last `window` lines: the whole run's average
    would count the fast collection before learning starts (an ETA of 31 h for a run that needed 4 days)."""

    def __init__(self, args, step: int, now: float, window: int = 10):
        self.args, self.start_step, self.start_time, self.eval_time = args, step, now, 0.0
        self.marks = collections.deque([(now, step)], maxlen=window + 1)  # (time, step) of the recent lines

    def training_rate(self, step: int) -> float:
        """Agent steps per second since the start of this process, evaluations left out (TensorBoard's charts/SPS)."""
        return (step - self.start_step) / max(time.time() - self.start_time - self.eval_time, 1e-9)

    def line(self, state, now: float) -> Optional[str]:
        """The progress line when one is due (every --progress-interval seconds, and at the end), else None."""
        total = self.args.total_timesteps
        if now - self.marks[-1][0] < self.args.progress_interval and state.global_step < total:
            return None
        self.marks.append((now, state.global_step))
        (then, step_then), elapsed = self.marks[0], now - self.start_time
        rate = (state.global_step - step_then) / max(now - then, 1e-9)
        eta = format_duration((total - state.global_step) / rate) if rate > 0 else "n/a"
        if step_then < state.update_origin[0] < total:  # the window still holds the fast steps before learning
            eta = f"not known yet (learning starts at step {state.update_origin[0]:,})"
        if state.global_step >= total:
            eta = "none: training is done"
        recent = f"{np.mean(state.recent_returns):.1f}" if state.recent_returns else "n/a"
        return (f"step {state.global_step:,}/{total:,} ({100 * state.global_step / total:.1f}%) | {rate:,.0f} SPS recently | "
                f"elapsed {format_duration(elapsed)} | ETA {eta} | {state.episodes:,} episodes, "
                f"return (last {len(state.recent_returns)}) {recent}")


def evaluate_saved_model(args, x: Experiment):
    """--eval-model: the saved network plays --final-eval-episodes games on the evaluation env (seeded 2^31 - 1 - seed,
    the run's evaluation epsilon), as the run's final evaluation; prints the statistics and writes them beside it."""
    path = args.eval_model
    out = f"{os.path.splitext(path)[0]}_eval_seed{args.seed}.json"
    errors = check_args(args, x) + ([] if args.resume is None else ["--eval-model and --resume exclude each other"])
    config = read_config(os.path.dirname(path) or ".")
    if not os.path.isfile(path):
        errors.append(f"--eval-model {path!r}: no such file (--save-model writes runs/RUN/EXP_NAME.cleanrl_model, and "
                      "EXP_NAME_best.cleanrl_model only where the run had periodic evaluations)")
    elif config is not None and config["algo"] != x.algo:
        errors.append(f"--eval-model {path!r} is a {config['algo'].upper()} model: "
                      f"evaluate it with {config['algo']}_atari_meanexp.py")
    if os.path.exists(out):
        errors.append(f"{out} exists (this model, this seed): move it away or choose another --seed (nothing was overwritten)")
    if errors:
        fail(errors)
    n_actions, me_coef = actions_and_coef(args, x)
    network = x.make_network(args, n_actions, me_coef)
    saved = torch.load(path, map_location="cpu", weights_only=True)
    mine = network.state_dict()
    if not isinstance(saved, dict) or saved.keys() != mine.keys():
        fail([f"--eval-model {path!r} is not a network {x.algo}_atari_meanexp.py saves with these settings (another "
              "algorithm, or another --network?)"])
    wrong = [f"{k} {tuple(v.shape)} (here {tuple(mine[k].shape)})" for k, v in saved.items() if v.shape != mine[k].shape]
    if wrong:
        fail([f"--eval-model {path!r} does not fit {args.env_id} with {n_actions} actions (full action set: "
              f"{args.full_action_space}): {', '.join(wrong)}"])
    network.load_state_dict(saved)
    device = seed_and_device(args)
    env, eval_rng = x.make_eval_env(args, args.capture_video, os.path.dirname(path) or ".")
    forget_seeding_clip(env)
    result = x.evaluate(network.to(device), env, device, args.eval_epsilon, args.gamma, eval_rng,
                      max_episodes=args.final_eval_episodes)
    env.close()
    stats = x.final_statistics(result)
    try:
        write_json(out, {"algo": x.algo, "model": path, "env_id": args.env_id, "seed": args.seed,
                         "epsilon": args.eval_epsilon, **stats})
    except StorageError as e:
        fail([f"writing {out} failed ({e.__cause__}); the evaluation's mean was {stats['mean']:.1f}"], EXIT_STORAGE)
    print(f"evaluation of {path}: mean {stats['mean']:.1f}, median {stats['median']:.1f} over {stats['episodes']} episodes, "
          f"overestimation {stats['overestimation']} -> {out}")


def forget_seeding_clip(env: gym.Env):
    """With --capture-video, RecordVideo began a clip at the reset that seeds the evaluation env, which plays no game
    (evaluate() resets again): forget it, so that every clip written is a whole game."""
    while env is not env.unwrapped:
        if isinstance(env, gym.wrappers.RecordVideo) and env.recording:
            env.recording, env.recorded_frames = False, []
        env = env.env


def start_tracking(args, run_name: str, settings: dict, run_dir: str) -> str:
    """--track: a Weights & Biases run that mirrors the TensorBoard logs (CleanRL's setup); a resumed run continues
    its wandb run. Returns the wandb run id, which config.json keeps."""
    import wandb  # only here: wandb is optional

    try:
        tracked = wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, group=args.wandb_group,
                             name=run_name, id=settings.get("wandb_run_id"), resume="allow", config=settings,
                             sync_tensorboard=True, save_code=True)
    except Exception as e:  # no login, no network: say so now, not hours in
        fail([f"--track: wandb could not start ({type(e).__name__}: {e}); run `wandb login`, or set WANDB_MODE=offline "
              "and upload later with `wandb sync`"])
    if args.capture_video:  # uploads each video as it is written
        run_dir = os.path.abspath(run_dir)
        wandb.save(os.path.join(run_dir, "videos", "*.mp4"), base_path=run_dir, policy="live")
    return tracked.id


def actions_and_coef(args, x: Experiment) -> tuple:
    """|A| of the game (one env built and closed, before anything large is allocated) and the run's k."""
    probe = x.make_env(args, args.seed)()
    n_actions = int(probe.action_space.n)
    probe.close()
    return n_actions, x.default_me_coef(args, n_actions) if args.me_coef is None else float(args.me_coef)


def seed_and_device(args) -> torch.device:
    """Seeds Python's, NumPy's and PyTorch's generators; the device: CUDA where there is one and --cuda."""
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    return torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")


def check_memory(args, x: Experiment):
    """Refuses a replay buffer that does not fit (numpy would take its pages only as they fill: a failure hours in).
    Runs starting together on one machine check in turn: each holds a machine-wide lock from its check until its
    buffer's pages are written (the scripts write them all at once, then call Run.memory_taken), so the next run's
    check sees them. (Where the lock cannot be had, a warning says so, and the check goes on alone.)"""
    take_memory_lock()
    replay_bytes, free_bytes = x.replay_buffer.bytes_needed(args.buffer_size, args.num_envs), available_memory_bytes()
    print(f"replay buffer: {args.buffer_size:,} transitions need {replay_bytes / 1e9:.2f} GB "
          f"({replay_bytes / args.buffer_size:,.0f} bytes each); {free_bytes / 1e9:.2f} GB available")
    if replay_bytes + HEADROOM_BYTES > free_bytes:
        fail([f"--buffer-size {args.buffer_size} needs {replay_bytes / 1e9:.2f} GB (plus {HEADROOM_BYTES / 1e9:.0f} GB for "
              f"the rest of the run) but only {free_bytes / 1e9:.2f} GB of memory is available (other runs on this "
              "machine included); lower --buffer-size (each transition takes about 7 kB)"])


def release_memory_lock():
    global held_memory_lock
    if held_memory_lock is not None:
        held_memory_lock.close()  # closing the file drops its flock
        held_memory_lock = None


def take_memory_lock(wait_seconds: float = 600.0):
    """Takes the machine-wide lock of check_memory (flock on a file in the temporary directory), waiting for up to
    wait_seconds while another run holds it; where it cannot be had, warns and goes on without it."""
    global held_memory_lock
    if held_memory_lock is not None:  # this process holds it already (an earlier Run in the same process, a test's)
        return
    try:
        try:
            lock = open(MEMORY_LOCK, "a+")
        except PermissionError:  # made by another user: a lock needs only a file open for reading
            lock = open(MEMORY_LOCK)
        if not flock_within(lock, wait_seconds, f"waiting for another run on this machine to take its memory ({MEMORY_LOCK})"):
            lock.close()
            raise OSError(f"another run has held it for {wait_seconds:.0f} s")
    except OSError as e:
        print(f"warning: {MEMORY_LOCK}: {e}; the memory check goes on without counting runs starting at the same time",
              file=sys.stderr)
        return
    HELD_LOCKS.add(lock)  # forked env workers close their copy (leave_signals_to_main_process)
    held_memory_lock = lock


def check_disk(args, x: Experiment, run_dir: str, n_actions: int, me_coef: float) -> int:
    """Refuses a run whose filesystem cannot hold its checkpoints and the temporary copy each new one is written as
    (with the replay buffer, when full, where --checkpoint-buffer is on). Returns the bytes of one checkpoint."""
    weights = sum(t.numel() * t.element_size() for t in x.make_network(args, n_actions, me_coef).state_dict().values())
    replay = x.replay_buffer.bytes_needed(args.buffer_size, args.num_envs)
    # the online and target networks, the optimizer's two running averages, the best network so far; envs, RNGs
    one = 5 * weights + (replay if args.checkpoint_buffer else 0) + CHECKPOINT_EXTRA_BYTES
    there, held = run_dir, 0  # where the checkpoints go, and what the run's checkpoints already take there
    while not os.path.isdir(there):  # a new run: its directory does not exist yet
        there = os.path.dirname(there) or "."
    if there == run_dir:
        held = sum(os.path.getsize(os.path.join(run_dir, n)) for n in [CHECKPOINT, *older_checkpoints(run_dir)]
                   if os.path.isfile(os.path.join(run_dir, n)))
    need, free = max(one, (args.keep_checkpoints + 1) * one - held), shutil.disk_usage(there).free  # at least the next
    print(f"checkpoints: {one / 1e9:.2f} GB each, {args.keep_checkpoints} kept; {free / 1e9:.2f} GB free where they go")
    if need > free:
        lighter = 5 * weights + CHECKPOINT_EXTRA_BYTES
        fail([f"the filesystem of {os.path.abspath(there)} has {free / 1e9:.2f} GB free, but this run's checkpoints "
              f"need {need / 1e9:.2f} GB more: {args.keep_checkpoints} of {one / 1e9:.2f} GB each (the replay buffer, "
              f"{replay / 1e9:.2f} GB when full, included) and room to write the next; --no-checkpoint-buffer makes one "
              f"{lighter / 1e9:.2f} GB (a resumed run then refills its buffer), and a smaller --buffer-size or "
              "--keep-checkpoints also lowers it"])
    return one


class SnapshotEnv(gym.Wrapper):
    """The outermost wrapper: `env.snapshot` is the whole env's state as bytes, and assigning it restores
    that state, so a resumed run plays on exactly as if never stopped. (A property, so that a vector env
    reaches it in its worker processes with get_attr and set_attr.)"""

    reset_on_next_step = False  # set on resume where the env was due to autoreset when the checkpoint was written

    def step(self, action):
        if self.reset_on_next_step:  # what the vector env's autoreset would have done: the action is ignored
            self.reset_on_next_step = False
            obs, info = self.env.reset()
            return obs, 0.0, False, False, info
        return self.env.step(action)

    @property
    def snapshot(self) -> bytes:
        layers, env = [], self.env
        while env is not env.unwrapped:  # every wrapper's own state: frame stack, step counts, lives, returns, ...
            state = {name: value for name, value in vars(env).items() if name != "env" and not callable(value)}
            layers.append({} if isinstance(env, gym.wrappers.RecordVideo) else state)  # a clip being recorded is not resumed
            env = env.env
        game = env.clone_state(include_rng=True)  # the emulator, with its RNG
        return pickle.dumps((layers, game, env.np_random.bit_generator.state, env.action_space.np_random.bit_generator.state))

    @snapshot.setter
    def snapshot(self, data: bytes):
        layers, game, np_random, action_space_random = pickle.loads(data)
        env = self.env
        for layer in layers:
            vars(env).update(layer)
            env = env.env
        env.restore_state(game)
        env.np_random.bit_generator.state = np_random  # the no-op starts draw from it
        env.action_space.np_random.bit_generator.state = action_space_random


def leave_signals_to_main_process(thunk):
    """Wraps an env thunk for a worker process: SIGINT, SIGTERM and SIGUSR1 are for the main process,
    which checkpoints and then closes its workers."""
    main_pid = os.getpid()

    def worker_thunk():
        if os.getpid() != main_pid:  # AsyncVectorEnv also calls a thunk in the main process, to read the spaces
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
                signal.signal(sig, signal.SIG_IGN)
            for lock in HELD_LOCKS:  # a forked worker's copy of the run's lock: the lock must end with the main process
                lock.close()
        return thunk()

    return worker_thunk


def effective_settings(args, x: Experiment, run_name: str, n_actions: int, me_coef: float, device: torch.device) -> dict:
    """Every setting the run used, including those derived from the env and the machine."""
    settings = {**dataclasses.asdict(args), **x.fixed_settings}  # loss, optimizer, network; learning rate and eps as used
    settings.update(
        algo=x.algo,
        run_name=run_name,
        me_coef=me_coef,
        me_coef_default=args.me_coef is None,
        n_actions=n_actions,
        life_loss="ends the training episode" if args.episodic_life else "does not end the episode",
        replay_bytes=x.replay_buffer.bytes_needed(args.buffer_size, args.num_envs),
        device=str(device),
        versions={"torch": torch.__version__, "gymnasium": gym.__version__, "ale_py": ale_py.__version__,
                  "numpy": np.__version__},
        command=" ".join(sys.argv),
    )
    return settings


def format_duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m{seconds % 60:02d}s"


class StorageError(Exception):
    """Writing a file failed for want of storage (no space, a quota, an I/O error); __cause__ says which."""


def is_storage_error(e: BaseException) -> bool:
    """OSError, or torch's writer's own words for a failed write (it reports ENOSPC as "unexpected pos ...")."""
    words = ("unexpected pos", "file write failed", "PytorchStreamWriter failed")
    return isinstance(e, OSError) or (isinstance(e, RuntimeError) and any(w in str(e) for w in words))


def atomic_save(path: str, save, keep_previous_as: Optional[str] = None):
    """save(tmp) writes a temporary file, which is flushed to disk and then renamed over path: a process
    killed at any moment leaves path holding either its previous content or the new one, never a torn file.
    keep_previous_as: where path's previous content goes instead of being replaced (--keep-checkpoints).
    A failed write removes the temporary file (a full disk stays usable) and raises StorageError."""
    tmp = path + ".tmp"
    try:
        save(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        if keep_previous_as is not None and os.path.exists(path):
            if os.path.exists(keep_previous_as):  # a kill between the link and the rename below left it: the same file
                os.remove(keep_previous_as)
            os.link(path, keep_previous_as)  # a second name, then the rename: path is never missing, not for an instant
        os.replace(tmp, path)
    except Exception as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if is_storage_error(e):
            raise StorageError(str(e)) from e
        raise


def write_json(path: str, data: dict):
    def save(tmp):
        with open(tmp, "w") as f:
            json.dump(data, f, indent=2)

    atomic_save(path, save)


def rng_states(device: torch.device) -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else None}


def set_rng_states(states: dict, device: torch.device):
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if device.type == "cuda" and states["cuda"] is not None:
        torch.cuda.set_rng_state_all(states["cuda"])


MEMORY_LOCK = os.path.join(tempfile.gettempdir(), "meanexp-memory.lock")  # machine-wide (check_memory)
HEADROOM_BYTES = 10**9  # PyTorch, the networks, the envs: what a run needs besides its replay buffer
CHECKPOINT_EXTRA_BYTES = 50 * 10**6  # a checkpoint besides its networks and buffer: env snapshots, RNG states, pickling
EXIT_BAD_INPUT = 2  # a bad command line: nothing was written
EXIT_NON_FINITE = 3  # the run diverged (a loss or Q-value not finite): the last good checkpoint is kept; do not requeue
EXIT_REQUEUE = 75  # stopped by SIGTERM or SIGUSR1 after writing a checkpoint: run again with --resume (EX_TEMPFAIL)
EXIT_STORAGE = 74  # a write failed (no space, quota, I/O): the last checkpoint is kept; free room, then --resume (EX_IOERR)
EXIT_INTERRUPTED = 130  # stopped by Ctrl-C after writing a checkpoint: run again with --resume (the shell's code for SIGINT)
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)  # each checkpoints the run and exits
held_memory_lock = None  # the memory lock while this process holds it (take_memory_lock)
HELD_LOCKS = weakref.WeakSet()  # the run directories' lock files this process has open (lock_run_dir)


def fail(errors: list, code: int = EXIT_BAD_INPUT):
    release_memory_lock()  # a refused or stopped run takes no more memory: the next run's check need not wait
    for message in errors:
        print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


