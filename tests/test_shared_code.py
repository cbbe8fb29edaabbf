"""Each script holds its whole experiment, so the two repeat the parts that do not depend on the algorithm (the
environment, the replay buffer, evaluation, the loop): those parts must stay word for word the same, so that `diff`
shows only the algorithm. The long-run machinery is not repeated: it is one module, longrun.py."""

import ast
import difflib
import os

from conftest import ROOT

# Top-level definitions allowed to differ: the algorithm. Everything else must be identical.
ALGORITHM = {"ALGO", "Args", "PAPER_OPTIMIZER_SETTINGS", "FIXED_SETTINGS", "algo_errors", "pfrl_init", "nature_convolutions",
             "QNetwork", "DuelingNetwork", "IQNNetwork", "make_network", "default_me_coef", "td_error_loss", "td_loss",
             "quantile_huber_loss", "iqn_loss", "taken", "LOSS", "update", "CenteredRMSprop", "make_optimizer"}
SHARED = {"make_env", "make_train_envs", "mean_expansion", "Batch", "ReplayBuffer", "action_gap", "linear_schedule",
          "discounted_returns", "episode_statistics", "evaluate", "EVAL_STATISTICS", "crossed", "main", "LoopState",
          "train", "act", "record_episodes", "learn", "log_training", "periodic_evaluation", "final_evaluation",
          "FireAfterLifeLoss", "final_statistics", "make_eval_env", "EVAL_LOGGED", "parse_args", "check_args",
          "RESUME_MAY_CHANGE", "evaluate_saved_model", "game_actions", "run_settings", "TrainingSetup",
          "Q_RECORD", "measure_action_gap", "record_q", "claim_statistics", "save_checkpoint", "restore_checkpoint",
          "check_finite", "RENAMED_FIELDS"}
# shared flags whose default, type or text differ (the paper's protocol): the optimizer's values, IQN's 200 final episodes, k's default
ARGS_DIFFERENCES = {"exp_name", "learning_rate", "optimizer_eps", "final_eval_episodes", "me_coef"}
DQN_ONLY_FLAGS = {"network", "loss", "optimizer", "rdq_penalty"}  # IQN has one network, loss and optimizer


def parse(name):
    with open(os.path.join(ROOT, name)) as f:
        text = f.read()
    tree = ast.parse(text)
    nodes = {}
    for node in tree.body:
        names = [node.name] if hasattr(node, "name") else [t.id for t in getattr(node, "targets", []) if isinstance(t, ast.Name)]
        for n in names:
            nodes[n] = node
    return text.splitlines(), tree, nodes


def allowed_lines(tree, nodes):
    """Line numbers (0-based) inside the module docstring, the imports and the algorithm's definitions."""
    lines = set(range(tree.body[0].lineno - 1, tree.body[0].end_lineno))  # the docstring
    for node in tree.body:  # the imports: the algorithm may need a name the other one does not
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            lines |= set(range(node.lineno - 1, node.end_lineno))
    for name in ALGORITHM & nodes.keys():
        node = nodes[name]
        start = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
        lines |= set(range(start - 1, node.end_lineno))
    return lines


def test_shared_definitions_are_identical():
    dqn_lines, _, dqn = parse("dqn_atari_meanexp.py")
    iqn_lines, _, iqn = parse("iqn_atari_meanexp.py")
    for name in SHARED:
        assert name in dqn and name in iqn, name
        a = dqn_lines[dqn[name].lineno - 1: dqn[name].end_lineno]
        b = iqn_lines[iqn[name].lineno - 1: iqn[name].end_lineno]
        assert a == b, f"{name} differs between the scripts:\n" + "\n".join(difflib.unified_diff(a, b, lineterm=""))


def test_diff_touches_only_the_algorithm():
    dqn_lines, dqn_tree, dqn = parse("dqn_atari_meanexp.py")
    iqn_lines, iqn_tree, iqn = parse("iqn_atari_meanexp.py")
    dqn_ok, iqn_ok = allowed_lines(dqn_tree, dqn), allowed_lines(iqn_tree, iqn)
    outside = []
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(None, dqn_lines, iqn_lines, autojunk=False).get_opcodes():
        if tag == "equal":
            continue
        outside += [f"dqn:{i + 1}: {dqn_lines[i]}" for i in range(i1, i2) if i not in dqn_ok and dqn_lines[i].strip()]
        outside += [f"iqn:{j + 1}: {iqn_lines[j]}" for j in range(j1, j2) if j not in iqn_ok and iqn_lines[j].strip()]
    assert not outside, "lines outside the algorithm differ:\n" + "\n".join(outside)


def test_args_share_every_flag_and_its_documentation():
    dqn_lines, _, dqn = parse("dqn_atari_meanexp.py")
    iqn_lines, _, iqn = parse("iqn_atari_meanexp.py")

    def fields(lines, node):
        body = node.body
        out = {}
        for stmt, nxt in zip(body, body[1:] + [None]):
            if isinstance(stmt, ast.AnnAssign):
                doc = nxt.value.value if isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant) else None
                out[stmt.target.id] = (ast.unparse(stmt.annotation), ast.unparse(stmt.value), doc)
        return out

    a, b = fields(dqn_lines, dqn["Args"]), fields(iqn_lines, iqn["Args"])
    assert set(a) - DQN_ONLY_FLAGS <= set(b) and not DQN_ONLY_FLAGS & set(b)
    assert all(a[n][2] for n in a) and all(b[n][2] for n in b)  # a docstring for every flag
    for name in set(a) - DQN_ONLY_FLAGS:
        if name in ARGS_DIFFERENCES:
            assert a[name] != b[name], f"{name} is the same in both scripts: take it out of ARGS_DIFFERENCES"
        else:
            assert a[name] == b[name], name  # same type, default and text


# dqn_minatar_meanexp.py is dqn_atari_meanexp.py on another environment: these of its definitions differ (the game, its
# frame, its network and protocol); every other one both define must be the Atari script's, word for word
MINATAR_OWN = {"Args", "pfrl_init", "QNetwork", "make_network", "default_me_coef", "make_env", "one_frame", "game_frame",
               "Batch", "td_loss", "make_optimizer", "check_args", "algo_errors", "main", "run_settings", "GAMES",
               "MINATAR_INSTALLED"}
# ...and these the Atari script's but for the lines named (the frame's shape; a stack of one frame)
MINATAR_LINES = {
    "ReplayBuffer": {"    STACK = 4":
                     "    STACK = 1  # MinAtar: an observation is one frame (all its channels); the Atari script stacks 4"},
}


MINATAR_MAIN_CHANGES = [
    "+     if args.me_coef is None and n_actions != 6:  # a minimal action set smaller than the full one (Seaquest's is all 6)",
    "+         warnings.warn(f\"--no-full-action-space: k defaults to this game's |A| = {n_actions}, not to the full set's 6, \"",
    "+                       \"the authors' k = |A|; give --me-coef to choose\", stacklevel=2)",
    "-     replay_bytes = ReplayBuffer.bytes_needed(args.buffer_size, args.num_envs)",
    "+     replay_bytes = ReplayBuffer.bytes_needed(args.buffer_size, args.num_envs, game_frame(args.env_id))",
    "-     rb = ReplayBuffer(args.buffer_size, args.num_envs, device, seed=args.seed)  # its pages are written now",
    "+     rb = ReplayBuffer(args.buffer_size, args.num_envs, device, seed=args.seed,",
    "+                       frame_shape=game_frame(args.env_id))  # its pages are written now",
]


def test_the_minatar_script_is_the_dqn_atari_script_but_for_its_environment_and_network():
    dqn_lines, _, dqn = parse("dqn_atari_meanexp.py")
    mz_lines, _, mz = parse("dqn_minatar_meanexp.py")
    assert (SHARED - {"make_env", "FireAfterLifeLoss", "make_eval_env"}) <= mz.keys() | MINATAR_OWN
    assert "make_eval_env" in mz
    for name in sorted(mz.keys() - MINATAR_OWN):
        assert name in dqn, f"{name} is the MinAtar script's own: list it in MINATAR_OWN"
        a = dqn_lines[dqn[name].lineno - 1: dqn[name].end_lineno]
        b = mz_lines[mz[name].lineno - 1: mz[name].end_lineno]
        a = [MINATAR_LINES.get(name, {}).get(line, line) for line in a]
        assert a == b, f"{name} differs between dqn_atari_meanexp.py and dqn_minatar_meanexp.py:\n" + "\n".join(
            difflib.unified_diff(a, b, lineterm=""))
    main = "\n".join(mz_lines[mz["main"].lineno - 1: mz["main"].end_lineno])
    atari_main = "\n".join(dqn_lines[dqn["main"].lineno - 1: dqn["main"].end_lineno])
    # main differs by the frame's shape and the minimal-action-set warning only, line for line
    changed = [line for line in difflib.ndiff(atari_main.splitlines(), main.splitlines()) if line[:1] in "+-"]
    assert changed == MINATAR_MAIN_CHANGES, "\n".join(changed)
