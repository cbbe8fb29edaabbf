"""The LunarLander sweep's time against its GEMM floor, part by part, from the records the sweep wrote itself
(results/lunar_sweep/parts/*.json, each member's evaluations.json): nothing here is measured again or retyped.

    python benchmarks/sweep_time.py                      # a markdown table for benchmarks/README.md
    python benchmarks/sweep_time.py --folder OTHER_SWEEP

Per part: its k, members, the commit it ran, wall minutes, the floor (its updates' FLOP at the machine's GEMM rate,
measured by the part) and their ratio; then the minutes of one worker (the mean over the part's workers) in each phase,
and the environment steps its evaluations took (episodes x mean length, from evaluations.json), which the floor does
not count. The last row adds the parts up: the sweep's ratio is its summed wall time over its summed floor, and the
phases are one worker's minutes summed over the parts.
"""

import argparse
import glob
import json
import os


def part_rows(folder: str) -> list:
    """One dict per part record under folder/parts, oldest first."""
    rows = []
    for path in sorted(glob.glob(os.path.join(folder, "parts", "*.json"))):
        with open(path) as f:
            part = json.load(f)
        eval_steps = 0
        for k, seed in part["members"]:
            with open(os.path.join(folder, "runs", f"k{k:g}__seed{seed}", "evaluations.json")) as f:
                eval_steps += round(sum(e["episodes"] * e["length"] for e in json.load(f)["evaluations"]))
        workers = part["workers_detail"]
        phases = {name: sum(w["phases"][name] for w in workers) / len(workers) / 60 for name in workers[0]["phases"]}
        rows.append({"date": part["date"], "ks": sorted({k for k, _ in part["members"]}),
                     "members": len(part["members"]), "code": (part.get("code") or "?")[:7],
                     "wall": part["wall_seconds"] / 60, "floor": part["floor_seconds"] / 60,
                     "gemm": max(part["gemm_gflops_before"], part["gemm_gflops_after"]), "phases": phases,
                     "eval_env_steps": eval_steps, "machine": part["machine"], "command": part["command"]})
    return rows


def phase_minutes(p: dict) -> str:
    """The table's cell of one worker's minutes in each phase."""
    return f"{p['update']:.1f} / {p['evaluate']:.1f} / {p['env']:.1f} / {p['act']:.1f}"


def markdown(rows: list) -> str:
    lines = ["| part (date) | k | members | code | wall (min) | floor (min) | ratio | GEMM (GFLOP/s) | one worker's "
             "minutes: update / evaluate / env / act | evaluation env steps |", "|" + " --- |" * 10]
    for r in rows:
        lines.append(f"| {r['date']} | {', '.join(f'{k:g}' for k in r['ks'])} | {r['members']} | {r['code']} | "
                     f"{r['wall']:.1f} | {r['floor']:.1f} | {r['wall'] / r['floor']:.2f}x | {r['gemm']:.0f} | "
                     f"{phase_minutes(r['phases'])} | {r['eval_env_steps']:,.0f} |")
    wall, floor = sum(r["wall"] for r in rows), sum(r["floor"] for r in rows)
    summed = {name: sum(r["phases"][name] for r in rows) for name in rows[0]["phases"]}
    lines.append(f"| all {len(rows)} parts | | {sum(r['members'] for r in rows)} | | {wall:.1f} | {floor:.1f} | "
                 f"{wall / floor:.2f}x | | {phase_minutes(summed)} | "
                 f"{sum(r['eval_env_steps'] for r in rows):,.0f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", default="results/lunar_sweep", help="the sweep's folder (default: %(default)s)")
    folder = parser.parse_args().folder
    rows = part_rows(folder)
    if not rows:
        raise SystemExit(f"error: no part records under {os.path.join(folder, 'parts')}")
    print(markdown(rows), end="")
