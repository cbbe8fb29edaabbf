"""The long-run machinery that dqn_atari_meanexp.py and iqn_atari_meanexp.py call (as CleanRL's scripts call
cleanrl_utils): the run directory (locked: one process per run), config.json and the TensorBoard writer; checkpoint files
and finding the newest on resume; memory and disk checks; failed writes; stop signals and exit codes; the progress line;
--track; the pieces of --eval-model. A first reader can skip this file.

It is a library: the scripts call it, it never calls back into them. A script builds and reads its own checkpoint
contents, chooses its seed, device and k, and checks its own flags; this module reads only the flags of LONG_RUN_FLAGS
(where the run goes, how long it is, how it is kept and tracked) and changes no number a run reports.
"""

import collections
import dataclasses
import fcntl
import importlib.util
import itertools
import json
import os
import pickle
import platform
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import weakref
from typing import Optional

import gymnasium as gym
import numpy as np
import torch
import tyro
from torch.utils.tensorboard import SummaryWriter

LONG_RUN_FLAGS = ("run_name", "total_timesteps", "progress_interval", "checkpoint_interval", "checkpoint_buffer",
                  "keep_checkpoints", "resume", "eval_model", "track", "wandb_project_name", "wandb_entity", "wandb_group",
                  "capture_video")
"""The flags this module reads (a script that calls it has them in its Args); every other flag is the script's own."""

RESUME_MAY_CHANGE = ("total_timesteps", "checkpoint_interval", "checkpoint_buffer", "keep_checkpoints", "progress_interval",
                     "track", "wandb_project_name", "wandb_entity", "wandb_group")  # and a script's (check_command_line)


def range_errors(args, positive=(), non_negative=(), probabilities=()) -> list:
    """One message per flag, of those named, outside its range: finite and > 0, finite and >= 0, or in [0, 1]."""
    flag = lambda name: f"--{name.replace('_', '-')}"  # noqa: E731
    return ([f"{flag(n)} must be a finite number (got {getattr(args, n)})" for n in [*positive, *non_negative]
             if getattr(args, n) in (float("inf"), float("-inf"))] +  # inf passes the ranges below, NaN fails them
            [f"{flag(n)} must be > 0 (got {getattr(args, n)})" for n in positive if not getattr(args, n) > 0] +
            [f"{flag(n)} must be >= 0 (got {getattr(args, n)})" for n in non_negative if not getattr(args, n) >= 0] +
            [f"{flag(n)} must be in [0, 1] (got {getattr(args, n)})" for n in probabilities
             if not 0.0 <= getattr(args, n) <= 1.0])


def check_flags(args) -> list:
    """The checks of this module's own flags: one message per bad one."""
    errors = range_errors(args, positive=["total_timesteps", "progress_interval", "keep_checkpoints"],
                          non_negative=["checkpoint_interval"])
    if args.run_name is not None and (not args.run_name or "/" in args.run_name or args.run_name in (".", "..")):
        errors.append(f"--run-name {args.run_name!r} must be a plain directory name (no '/')")
    if args.track and importlib.util.find_spec("wandb") is None:
        errors.append("--track needs wandb: pip install -r requirements-track.txt (docs/long-runs.md, 'Experiment "
                      "tracking')")
    return errors


def check_command_line(args, algo: str, errors: list, resume_may_change: tuple = ()):
    """Refuses a bad command line before anything is built or written: names every problem (the script's `errors` of its
    own flags, this module's, and those of --resume), then exits with code 2. resume_may_change: the script's flags that
    a resumed run may change, besides RESUME_MAY_CHANGE."""
    errors = errors + check_flags(args)
    if args.resume is not None:
        errors += check_resume(args, algo, RESUME_MAY_CHANGE + tuple(resume_may_change))
    if errors:
        fail(errors)


CHECKPOINT = "checkpoint.pt"  # in the run directory: the newest checkpoint
OLDER_CHECKPOINT = "checkpoint_step{step}.pt"  # the ones --keep-checkpoints keeps besides it
LOCK = "run.lock"  # in the run directory: locked by the one process that runs it, and naming it
STEP = "global_step"  # the checkpoint's step: save_checkpoint writes it beside the script's contents (every checkpoint has it)


def older_checkpoints(run_dir: str) -> list:
    """The file names of the run's older checkpoints (--keep-checkpoints), the newest first."""
    steps = [int(m.group(1)) for m in map(re.compile(r"^checkpoint_step(\d+)\.pt$").match, os.listdir(run_dir)) if m]
    return [OLDER_CHECKPOINT.format(step=step) for step in sorted(steps, reverse=True)]


def lock_run_dir(run_dir: str, wait_seconds: float = 2.0, advice: Optional[str] = None):
    """Locks the run directory for this process's whole life (flock: the kernel lets go when the process ends, kill -9
    included). Where another process still holds it after wait_seconds (a requeued job may start while the old process
    is ending): exits with code 2, naming it as the lock file does, and what to do (advice). Returns the open lock file,
    which must stay open; name_holder() writes this process into it once the run writes anything (a refused command
    changes nothing)."""
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
        advice = advice or f"Let it finish, or stop it (it checkpoints on SIGTERM), then --resume {run_dir}"
        fail([f"{run_dir} is in use by another process ({holder}): one process per run directory. {advice}; nothing "
              "was written"])
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
            if not (isinstance(saved, dict) and STEP in saved):
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
            print(f"warning: resuming from the newest readable checkpoint, {path} (step {saved[STEP]:,}): the "
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


def parse_args(args_type: type, argv=None):
    """The command line, parsed into the script's Args dataclass. With --resume RUN_DIR (or --eval-model RUN_DIR/MODEL),
    the flags not given take the run's saved settings, not the defaults."""
    args = tyro.cli(args_type, args=argv)
    run_dir = args.resume
    if args.eval_model is not None:
        run_dir = os.path.dirname(args.eval_model) or "."
    config = read_config(run_dir) if run_dir is not None else None
    if config is None:
        return args  # check_command_line explains what is wrong with --resume; --eval-model without config.json uses the flags
    saved = {field.name: config[field.name] for field in dataclasses.fields(args_type) if field.name in config}
    if args.eval_model is not None:
        saved.pop("track", None)  # an evaluation is not tracked
    default = args_type(**{**saved, "resume": args.resume, "eval_model": args.eval_model})
    return tyro.cli(args_type, args=argv, default=default)


def check_resume(args, algo: str, may_change: tuple) -> list:
    """Returns one message per reason --resume cannot continue the run (empty when it can)."""
    run_dir = args.resume
    if not os.path.isdir(run_dir):
        return [f"--resume {run_dir!r}: no such directory"]
    config = read_config(run_dir)
    if config is None:
        return [f"--resume {run_dir!r} is not a run directory of these scripts (no readable config.json)"]
    if config["algo"] != algo:
        return [f"--resume {run_dir!r} is a run of {config['algo']}_atari_meanexp.py: resume it with that script"]
    errors = []
    if not os.path.isfile(os.path.join(run_dir, CHECKPOINT)) and not older_checkpoints(run_dir):
        errors.append(f"--resume {run_dir!r} has no {CHECKPOINT} (the run stopped before its first one): "
                      "remove or rename the directory, then start the run again")
    allowed = ", ".join(f"--{name.replace('_', '-')}" for name in may_change)
    for name in (field.name for field in dataclasses.fields(args)):
        if name in config and name not in (*may_change, "resume") and getattr(args, name) != config[name]:
            errors.append(f"--{name.replace('_', '-')} {getattr(args, name)} differs from the run's {config[name]}: "
                          f"a resumed run keeps its settings (only {allowed} may change)")
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


def start_run(args, algo: str, run_name: str, settings: dict, replay_bytes: int, checkpoint_bytes: int) -> Optional["Run"]:
    """The run of a command line that check_command_line passed. settings: what config.json records (the script's
    settings, "device" among them); replay_bytes: the replay buffer's size when full; checkpoint_bytes: one checkpoint
    without the buffer. Checks memory and disk before anything is written; None where a resumed run is finished."""
    resumed, lock = None, None  # resumed: the checkpoint we continue from (its tensors stay in the file until copied)
    if args.resume is not None:
        lock = lock_run_dir(args.resume)  # before anything is read or written: one process per run directory
        resumed = load_newest_checkpoint(args.resume)
        if resumed[STEP] > args.total_timesteps:
            fail([f"--total-timesteps {args.total_timesteps} is below the {resumed[STEP]} steps done"])
        if resumed[STEP] == args.total_timesteps and os.path.exists(os.path.join(args.resume, "final_eval.json")):
            print(f"{args.resume} is finished ({args.total_timesteps:,} steps and final_eval.json): nothing to do "
                  "(a larger --total-timesteps extends it)")
            return None
    check_memory(replay_bytes)  # its lock is held until the script's buffer is written (Run.memory_taken)
    run_dir = os.path.join("runs", run_name) if resumed is None else args.resume
    if resumed is None and os.path.exists(run_dir):
        fail([f"run directory {run_dir} already exists; choose another --run-name (nothing was overwritten)"])
    one = checkpoint_bytes + (replay_bytes if args.checkpoint_buffer else 0)
    check_disk(args, run_dir, one, checkpoint_bytes, replay_bytes)
    signals = StopSignals()  # from before the run directory exists
    settings = recorded_settings(settings, run_dir, resumed)
    if args.track:  # before the run directory exists: a failed login leaves nothing behind
        settings["wandb_run_id"] = start_tracking(args, run_name, settings, run_dir)
    return Run(args, algo, run_dir, lock, settings, resumed, one, signals)


def machine() -> str:
    """The CPU's model and cores, for a run's or a part's record: results equal to the bit hold per CPU model (an AMD EPYC
    with AVX-512 rounds the batched products otherwise than the Intel Xeons that made the first LunarLander sweep)."""
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or platform.machine()
    return f"{model}, {os.cpu_count()} cores"


def code_version() -> Optional[str]:
    """The git commit of the code beside this file, "+modified" where its tracked files differ from it; None outside git."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                                timeout=30)
        clean = subprocess.run(["git", "-C", here, "diff", "--quiet", "HEAD", "--"], timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return None
    return commit.stdout.strip() + ("" if clean else "+modified")


def recorded_settings(settings: dict, run_dir: str, resumed: Optional[dict]) -> dict:
    """What config.json records: the script's settings, the command, the code's commit and the machine (CPU model); a
    resumed run keeps its first command, code, machine and wandb run, and adds this resume, with its own, to its resumes."""
    settings = {**settings, "command": " ".join(sys.argv), "code": code_version(), "machine": machine()}
    if resumed is None:
        return settings
    previous = read_config(run_dir)
    resume = {"step": resumed[STEP], "time": time.time(), "command": settings["command"], "device": settings["device"],
              "code": settings["code"], "machine": settings["machine"]}
    # the run's own command, code and machine are its first start's; a record older than a field says None, not this one's
    kept = {name: previous.get(name) for name in ("command", "code", "machine")}
    kept |= {"wandb_run_id": previous["wandb_run_id"]} if "wandb_run_id" in previous else {}
    return {**settings, **kept, "resumes": previous.get("resumes", []) + [resume]}


class RunDirectory:
    """What a run writes: its directory (locked: one process per run), config.json, the TensorBoard events (`writer`),
    the checkpoints, --save-model's networks and final_eval.json; and what a failed write does."""

    def __init__(self, args, algo: str, run_dir: str, lock, settings: dict, resumed: Optional[dict], checkpoint_bytes: int):
        self.args, self.algo, self.dir, self.lock, self.settings = args, algo, run_dir, lock, settings
        self.checkpoints = Checkpoints(run_dir, args.keep_checkpoints, None if resumed is None else resumed[STEP])
        self.checkpoint_bytes = checkpoint_bytes
        if resumed is None:
            try:
                os.makedirs(self.dir)
            except FileExistsError:  # another process took this --run-name since start_run's check
                fail([f"run directory {self.dir} already exists; choose another --run-name (nothing was overwritten)"])
            self.lock = lock_run_dir(self.dir)
        name_holder(self.lock)  # every check passed: from here on the run writes
        if resumed is None:
            self.write_config()
        # on resume, TensorBoard drops what a killed process logged after the checkpoint: no step twice, none missing
        self.writer = SummaryWriter(self.dir, purge_step=None if resumed is None else resumed[STEP] + 1)
        if resumed is None:
            table = "\n".join(f"|{k}|{v}|" for k, v in settings.items())
            self.writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + table)

    def write_config(self):
        try:
            write_json(os.path.join(self.dir, "config.json"), self.settings)
        except StorageError as e:
            self.fail_storage(f"writing {os.path.join(self.dir, 'config.json')} failed ({e.__cause__})")

    def save_checkpoint(self, contents: dict, step: int):
        """Writes the dict the script built of its state (everything its loop needs to go on exactly as if it had never
        stopped) as the run's checkpoint of `step`: atomically, keeping --keep-checkpoints of them."""
        try:
            self.writer.flush()  # the events up to this step are on disk before the checkpoint that follows them
        except OSError as e:
            self.fail_storage(f"writing the TensorBoard events of step {step:,} failed ({e})")
        try:
            self.checkpoints.write({"algo": self.algo, **contents, STEP: step}, step)
        except StorageError as e:
            self.fail_storage(f"writing the checkpoint of step {step:,} failed ({e.__cause__}); the temporary file is "
                              f"removed and {self.checkpoints.kept()}")

    def save_network(self, name: str, state_dict: dict):
        """--save-model: the network's weights as run_dir/name, written as the checkpoints are."""
        path = os.path.join(self.dir, name)
        try:
            atomic_save(path, lambda tmp: torch.save(state_dict, tmp))
        except StorageError as e:
            self.fail_storage(f"writing {path} failed ({e.__cause__}); the checkpoint holds the whole run, so --resume "
                              "saves it again")

    def write_final(self, final: dict) -> str:
        """Writes final_eval.json (an extended run's earlier one kept as final_eval_stepN.json); returns its path."""
        path = os.path.join(self.dir, "final_eval.json")
        if os.path.exists(path):  # a run extended with a larger --total-timesteps keeps its earlier result
            with open(path) as f:
                previous = json.load(f)
            os.replace(path, os.path.join(self.dir, f"final_eval_step{previous['total_steps']}.json"))
        try:
            write_json(path, final)
        except StorageError as e:
            self.fail_storage(f"writing {path} failed ({e.__cause__}); the checkpoint holds the whole run, so --resume "
                              "plays the final evaluation again")
        return path

    def fail_storage(self, what: str):
        """A write failed (a full disk, a quota, an I/O error): says what is kept and how to go on, then exits with a
        code of its own, which run_all.sh reports as failed and SLURM does not requeue (the disk will not free itself)."""
        self.release()
        go_on = (f"continue with --resume {self.dir}" if self.checkpoints.step is not None else
                 f"start the run again (it wrote no checkpoint: remove {self.dir} first, or choose another --run-name)")
        fail([f"{what}. The next checkpoint needs about {self.checkpoint_bytes / 1e9:.2f} GB free beside the ones kept "
              f"({self.dir}; free room, or lower --keep-checkpoints, or use --no-checkpoint-buffer), then {go_on}"],
             EXIT_STORAGE)

    def release(self):
        """Closes the logs and lets go of the run directory (the process is about to end, or a test goes on)."""
        if hasattr(self, "writer"):
            try:
                self.writer.close()
            except OSError as e:  # on the way out anyway (a full disk): the checkpoint is what counts
                print(f"warning: closing the TensorBoard log failed ({e})", file=sys.stderr)
        if self.lock is not None:
            self.lock.close()  # closing the file drops its flock


class Run(RunDirectory):
    """The run as the script's loop lives it: a RunDirectory, with when a checkpoint is due, the stop signals, the progress
    line, a stop on divergence, and the end. `resumed`: the checkpoint a resumed run continues from (None for a new run),
    the dict the script gave save_checkpoint, for the script to read back before begin()."""

    def __init__(self, args, algo, run_dir, lock, settings, resumed, checkpoint_bytes, signals: "StopSignals"):
        super().__init__(args, algo, run_dir, lock, settings, resumed, checkpoint_bytes)
        self.resumed, self.signals, self.interval_due, self.training_done = resumed, signals, False, False

    def begin(self, step: int):
        """The script's loop state is set up, or restored, at `step`: a resume is recorded in config.json now that the run
        really goes on, and the progress line counts from here."""
        if self.resumed is not None:
            self.write_config()
            self.resumed = None  # closes the checkpoint file's memory map
        self.progress = Progress(self.args.total_timesteps, self.args.progress_interval, step, time.time())

    def memory_taken(self):
        """The script calls this once its replay buffer's pages are written: lets go of check_memory's lock."""
        release_memory_lock()

    def checkpoint_due(self, before: int, step: int) -> bool:
        """A checkpoint is due: every --checkpoint-interval steps (a multiple in (before, step], as the loop's crossed()),
        and after SIGINT, SIGTERM or SIGUSR1. A due checkpoint stays due until checkpoint_written()."""
        interval = self.args.checkpoint_interval
        self.interval_due |= interval > 0 and step // interval > before // interval
        return self.interval_due or bool(self.signals.received)

    def checkpoint_written(self):
        """After a due checkpoint: where a signal asked for it, exits (for a requeue, or 130 after Ctrl-C)."""
        self.interval_due = False
        if self.signals.received:
            self.exit_for_requeue(self.signals.received[0])

    def report_progress(self, step: int, episodes: int, recent_returns: list, learning_starts: int):
        """Prints the progress line where one is due (Progress.line)."""
        line = self.progress.line(step, episodes, recent_returns, learning_starts, time.time())
        if line is not None:
            print(line, flush=True)

    def stop_if_not_finite(self, bad_step: int, weights_finite: bool, step: int):
        """Stops the run, keeping the last good checkpoint, where the script found a loss or Q-value (first at bad_step;
        -1: none) or a weight that is not finite."""
        if bad_step >= 0 or not weights_finite:
            where = f"at step {bad_step:,}" if bad_step >= 0 else f"in the network's weights by step {step:,}"
            kept = f"its last good checkpoint, of step {self.checkpoints.step:,}, is kept in {self.checkpoints.path}"
            self.release()
            fail([f"a loss or Q-value that is not finite appeared {where}; the run stops ({kept})"], EXIT_NON_FINITE)

    def exit_for_requeue(self, signum, frame=None):
        """After a checkpoint: says how to continue, then exits: 130 after Ctrl-C, else the code a batch system requeues on."""
        code = EXIT_INTERRUPTED if signum == signal.SIGINT else EXIT_REQUEUE
        self.release()
        stage = " (it holds the whole training: the resumed run plays the final evaluation)" if self.training_done else ""
        print(f"signal {signal.Signals(signum).name}: checkpoint at step {self.checkpoints.step:,} in "
              f"{self.checkpoints.path}{stage}; continue with --resume {self.dir} (exit code {code})", flush=True)
        sys.exit(code)

    def training_ended(self):
        """Training is over and checkpointed: from here a signal stops the final evaluation at once."""
        self.training_done = True
        self.signals.obey_at_once(self.exit_for_requeue)
        if self.signals.received:  # one came on the last training step, while an env was due to autoreset
            self.exit_for_requeue(self.signals.received[0])

    def finish(self, final: dict):
        """Writes final_eval.json, closes the logs and ends --track's wandb run."""
        path = self.write_final(final)
        self.release()
        if self.args.track:  # the final evaluation goes into the wandb run's summary; then the upload (or offline write) ends
            import wandb

            wandb.run.summary.update({f"final_eval/{k}": v for k, v in final.items() if isinstance(v, (int, float))})
            wandb.finish()
        print(f"final evaluation: mean {final['mean']:.1f}, median {final['median']:.1f} over {final['episodes']} episodes "
              f"-> {path}")
        self.signals.restore()  # for callers that go on after main(), such as tests


class Checkpoints:
    """The run's checkpoint files: the newest is checkpoint.pt, written atomically; --keep-checkpoints N keeps N in all.
    `step`: that of the newest one written (None: none yet)."""

    def __init__(self, run_dir: str, keep: int, step: Optional[int]):
        self.dir, self.keep, self.step, self.path = run_dir, keep, step, os.path.join(run_dir, CHECKPOINT)

    def write(self, saved: dict, step: int):
        """Writes `saved` as the newest checkpoint (StorageError where it fails: the previous one stays)."""
        keep_previous = self.keep > 1 and self.step is not None
        older = os.path.join(self.dir, OLDER_CHECKPOINT.format(step=self.step)) if keep_previous else None
        atomic_save(self.path, lambda tmp: torch.save(saved, tmp), keep_previous_as=older)
        self.step = step
        for name in older_checkpoints(self.dir)[self.keep - 1:]:  # the newest first: keep N in all
            try:
                os.remove(os.path.join(self.dir, name))
            except OSError as e:  # the new checkpoint is written: an old one left over costs room, not the run
                print(f"warning: could not remove {name} ({e}); the run goes on", file=sys.stderr)

    def kept(self) -> str:
        return f"{self.path} still holds step {self.step:,}" if self.step is not None else "there is no earlier checkpoint"


class StopSignals:
    """Ctrl-C (SIGINT), SIGTERM and SIGUSR1 (a batch system's warning) are recorded in `received`, which the loop polls
    (Run.checkpoint_due): it stops at its next safe point, after a checkpoint. A second one while the checkpoint is
    written is only recorded too, so the write always completes."""

    def __init__(self):
        self.received = []
        self.previous = {sig: signal.signal(sig, lambda signum, frame: self.received.append(signum)) for sig in STOP_SIGNALS}

    def obey_at_once(self, handler):
        """From here on a signal calls handler(signum, frame) at once (the final evaluation: the checkpoint holds it all)."""
        for sig in self.previous:
            signal.signal(sig, handler)

    def restore(self):
        """The handlers from before."""
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


class Progress:
    """The console progress line. Its rate and ETA are those of the last `window` lines: the whole run's average
    would count the fast collection before learning starts (an ETA of 31 h for a run that needed 4 days)."""

    def __init__(self, total_steps: int, interval_seconds: float, step: int, now: float, window: int = 10):
        self.total, self.interval, self.start_step, self.start_time, self.eval_time = (
            total_steps, interval_seconds, step, now, 0.0)
        self.marks = collections.deque([(now, step)], maxlen=window + 1)  # (time, step) of the recent lines

    def training_rate(self, step: int) -> float:
        """Agent steps per second since the start of this process, evaluations left out (TensorBoard's charts/SPS)."""
        return (step - self.start_step) / max(time.time() - self.start_time - self.eval_time, 1e-9)

    def line(self, step: int, episodes: int, recent_returns: list, learning_starts: int, now: float) -> Optional[str]:
        """The progress line when one is due (every interval_seconds, and at the end), else None: the step, the recent
        rate, the elapsed time and ETA, the training episodes and the mean of the recent training scores."""
        total = self.total
        if now - self.marks[-1][0] < self.interval and step < total:
            return None
        self.marks.append((now, step))
        learning = [mark for mark in self.marks if mark[1] >= learning_starts]  # the fast steps before learning left out
        (then, step_then), elapsed = learning[0] if len(learning) > 1 else self.marks[0], now - self.start_time
        rate = (step - step_then) / max(now - then, 1e-9)
        eta = format_duration((total - step) / rate) if rate > 0 else "n/a"
        if step_then < learning_starts < total:  # no two lines since learning started yet
            eta = f"not known yet (learning starts at step {learning_starts:,})"
        if step >= total:
            eta = "none: training is done"
        recent = f"{np.mean(recent_returns):.1f}" if recent_returns else "n/a"
        return (f"step {step:,}/{total:,} ({100 * step / total:.1f}%) | {rate:,.0f} SPS recently | "
                f"elapsed {format_duration(elapsed)} | ETA {eta} | {episodes:,} episodes, "
                f"return (last {len(recent_returns)}) {recent}")


def check_eval_model(args, algo: str, out: str, errors: list):
    """--eval-model: refuses (exit 2, naming every problem, the script's `errors` of its flags among them) a model that
    is missing or of the other algorithm, --resume beside it, or a result `out` that exists."""
    path = args.eval_model
    errors = errors + ([] if args.resume is None else ["--eval-model and --resume exclude each other"])
    config = read_config(os.path.dirname(path) or ".")
    if not os.path.isfile(path):
        errors.append(f"--eval-model {path!r}: no such file (--save-model writes runs/RUN/EXP_NAME.cleanrl_model, and "
                      "EXP_NAME_best.cleanrl_model only where the run had periodic evaluations)")
    elif config is not None and config["algo"] != algo:
        errors.append(f"--eval-model {path!r} is a model of {config['algo']}_atari_meanexp.py: evaluate it with that "
                      "script")
    if os.path.exists(out):
        errors.append(f"{out} exists (this model, this seed): move it away or choose another --seed (nothing was overwritten)")
    if errors:
        fail(errors)


def load_network(network: torch.nn.Module, path: str, algo: str, what_it_fits: str):
    """Loads --eval-model's saved weights into `network`; refuses (exit 2) a file that is not such a network, or one of
    other shapes (what_it_fits: the game and its actions, for the message)."""
    saved = torch.load(path, map_location="cpu", weights_only=True)
    mine = network.state_dict()
    if not isinstance(saved, dict) or saved.keys() != mine.keys():
        fail([f"--eval-model {path!r} is not a network {algo}_atari_meanexp.py saves with these settings (another "
              "algorithm, or another --network?)"])
    wrong = [f"{k} {tuple(v.shape)} (here {tuple(mine[k].shape)})" for k, v in saved.items() if v.shape != mine[k].shape]
    if wrong:
        fail([f"--eval-model {path!r} does not fit {what_it_fits}: {', '.join(wrong)}"])
    network.load_state_dict(saved)


def write_result(path: str, result: dict):
    """Writes an evaluation's result (exit 74 where the write fails, saying the mean it would have held)."""
    try:
        write_json(path, result)
    except StorageError as e:
        fail([f"writing {path} failed ({e.__cause__}); the evaluation's mean was {result['mean']:.1f}"], EXIT_STORAGE)


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


def check_memory(replay_bytes: int):
    """Refuses a replay buffer that does not fit (numpy would take its pages only as they fill: a failure hours in).
    Runs starting together on one machine check in turn: each holds a machine-wide lock from its check until its
    buffer's pages are written (the scripts write them all at once, then call Run.memory_taken), so the next run's
    check sees them. (Where the lock cannot be had, a warning says so, and the check goes on alone.)"""
    take_memory_lock()
    free_bytes = available_memory_bytes()
    print(f"replay buffer: {replay_bytes / 1e9:.2f} GB when full; {free_bytes / 1e9:.2f} GB available")
    if replay_bytes + HEADROOM_BYTES > free_bytes:
        fail([f"the replay buffer needs {replay_bytes / 1e9:.2f} GB (plus {HEADROOM_BYTES / 1e9:.0f} GB for the rest of "
              f"the run) but only {free_bytes / 1e9:.2f} GB of memory is available (other runs on this machine "
              "included); lower --buffer-size (each transition takes about 7 kB)"])


def check_disk(args, run_dir: str, one: int, lighter: int, replay_bytes: int):
    """Refuses a run whose filesystem cannot hold its checkpoints (`one` bytes each: `lighter` without the replay buffer
    of replay_bytes) and the temporary copy each new one is written as."""
    there, held = run_dir, 0  # where the checkpoints go, and what the run's checkpoints already take there
    while not os.path.isdir(there):  # a new run: its directory does not exist yet
        there = os.path.dirname(there) or "."
    if there == run_dir:
        held = sum(os.path.getsize(os.path.join(run_dir, n)) for n in [CHECKPOINT, *older_checkpoints(run_dir)]
                   if os.path.isfile(os.path.join(run_dir, n)))
    need, free = max(one, (args.keep_checkpoints + 1) * one - held), shutil.disk_usage(there).free  # at least the next
    print(f"checkpoints: {one / 1e9:.2f} GB each, {args.keep_checkpoints} kept; {free / 1e9:.2f} GB free where they go")
    if need > free:
        fail([f"the filesystem of {os.path.abspath(there)} has {free / 1e9:.2f} GB free, but this run's checkpoints "
              f"need {need / 1e9:.2f} GB more: {args.keep_checkpoints} of {one / 1e9:.2f} GB each (the replay buffer, "
              f"{replay_bytes / 1e9:.2f} GB when full, included) and room to write the next; --no-checkpoint-buffer makes "
              f"one {lighter / 1e9:.2f} GB (a resumed run then refills its buffer), and a smaller --buffer-size or "
              "--keep-checkpoints also lowers it"])


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
            own = {name: value for name, value in vars(env).items() if name != "env" and not callable(value)}
            layers.append({} if isinstance(env, gym.wrappers.RecordVideo) else own)  # a clip being recorded is not resumed
            env = env.env
        # an emulator (ALE) is cloned with its RNG; a game that is plain Python objects (MinAtar) is pickled whole
        game = env.clone_state(include_rng=True) if hasattr(env, "clone_state") else {
            name: value for name, value in vars(env).items() if not callable(value)}
        return pickle.dumps((layers, game, env.np_random.bit_generator.state, env.action_space.np_random.bit_generator.state))

    @snapshot.setter
    def snapshot(self, data: bytes):
        layers, game, np_random, action_space_random = pickle.loads(data)
        env = self.env
        for layer in layers:
            vars(env).update(layer)
            env = env.env
        if isinstance(game, dict):
            vars(env).update(game)
        else:
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
