"""Command line: `python -m bench sweep --preset cpu --out bench/results/cpu` (run from the repository root).

sweep   run a preset (or some of its parts) and write the table, results.csv, results.json, PNG plots and
        README.md into --out; the table also goes to stdout
list    the presets with their parts, and every backend with the reason it is unavailable, if it is
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import sys

import torch

from rank1_kernels import known_backends
from rank1_kernels.backends import get_backend

from . import report
from .ago_bench import run_ago
from .environment import device_slug, environment, nominal_peaks
from .layer import LayerBenchmark
from .presets import PRESETS, get_preset
from .step import run_step
from .timing import TimeBudget
from .variants import register_triton_variants


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    sweep = commands.add_parser("sweep", help="run a preset and write table, CSV, JSON, plots and README.md")
    sweep.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default="cpu",
        help="gpu: the full grid; cpu: minutes on 2 cores; tiny: smoke",
    )
    sweep.add_argument("--out", help="results folder (default: bench/results/<device>)")
    sweep.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    sweep.add_argument("--only", help="comma-separated parts of the preset to run (see `list`), e.g. tokens,ago")
    keep_help = "keep the rows of other parts already in --out/results.json (to split a long sweep)"
    sweep.add_argument("--append", action="store_true", help=keep_help)
    resume_help = "--append, and keep (not measure again) the groups of these parts already in --out/results.json"
    sweep.add_argument("--resume", action="store_true", help=resume_help)
    sweep.add_argument("--note", default="", help="a sentence for the README, e.g. that the machine was shared")
    forced_help = "also time backends that run these inputs only when forced, e.g. Triton's CPU interpreter"
    sweep.add_argument("--time-forced-only", action="store_true", help=forced_help)
    variants_help = "also time each Triton pool-linear variant pinned (on by default in the gpu preset)"
    sweep.add_argument("--triton-variants", action="store_true", help=variants_help)
    budget_help = "stop starting new benchmark groups after this many minutes; the rest is listed as skipped"
    sweep.add_argument("--budget-minutes", type=float, help=budget_help)
    sweep.add_argument("--threads", type=int, help="torch CPU threads (default: the preset's, else torch's choice)")
    sweep.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    commands.add_parser("list", help="presets, their parts, and backend availability")
    rebuild_parser = commands.add_parser("report", help="redraw table, plots and README from --out/results.json")
    rebuild_parser.add_argument("--out", required=True, help="a results folder written by `sweep`")
    rebuild_parser.add_argument("--note", help="replace the README's note")
    return parser


def _list() -> int:
    for name in PRESETS:
        preset = get_preset(name)
        print(f"{name}: {preset.description}\n  parts: {', '.join(preset.parts())}")
    print("backends:")
    for name in known_backends():
        try:
            reason = get_backend(name).unavailable_reason()
        except (RuntimeError, ValueError) as exc:
            reason = str(exc)
        print(f"  {name}: " + ("available" if reason is None else f"unavailable: {reason}"))
    return 0


def _loadable_backends() -> list[str]:
    """The backends that can time rows here (in known_backends() order): importable, with their kernels present."""
    loadable = []
    for name in known_backends():
        try:
            if get_backend(name).unavailable_reason() is None:
                loadable.append(name)
        except (RuntimeError, ValueError):
            pass
    return loadable


def run_settings(time_forced_only: bool, backends: list[str]) -> str:
    """The settings stamped on every row (`bench_settings`) besides the code: which backends loaded (the ones that
    time rows) and --time-forced-only. bench/gpu_session.sh computes it too, to tell a part complete."""
    return f"time_forced_only={time_forced_only}; backends={','.join(backends)}"


def _resolve_device(requested: str | None, preset: str) -> torch.device:
    device = torch.device(requested or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available here; use --device cpu with --preset cpu")
    if device.type != "cuda" and preset == "gpu":
        raise SystemExit(
            "--preset gpu times full-size shapes and CUDA graphs and needs a CUDA device; use --preset cpu"
        )
    return device


def _selected_parts(preset, only: str | None) -> list[str]:
    parts = preset.parts()
    if not only:
        return parts
    chosen = [part.strip() for part in only.split(",") if part.strip()]
    unknown = [part for part in chosen if part not in parts]
    if unknown:
        raise SystemExit(
            f"--only {','.join(unknown)}: not a part of preset {preset.name!r}; its parts are {', '.join(parts)}"
        )
    return chosen


def sweep(args: argparse.Namespace, argv: list[str]) -> int:
    preset = get_preset(args.preset)
    device = _resolve_device(args.device, preset.name)
    threads = args.threads if args.threads is not None else preset.cpu_threads
    if threads is not None:
        if threads < 1:
            raise SystemExit(f"--threads {threads}: expected a positive number of CPU threads")
        torch.set_num_threads(threads)
    parts = _selected_parts(preset, args.only)
    out_dir = args.out or os.path.join("bench", "results", device_slug(device))
    os.makedirs(out_dir, exist_ok=True)
    log = (lambda message: None) if args.quiet else (lambda message: print(message, file=sys.stderr, flush=True))
    env = environment(device)
    peaks = nominal_peaks(env["device"]) if device.type == "cuda" else None

    variant_backends, variants_unavailable = [], None
    if args.triton_variants or preset.triton_variants:
        variant_backends, variants_unavailable = register_triton_variants()
    # What decides which rows exist besides the code: rows of runs with other settings are not kept by --resume.
    env["bench_settings"] = run_settings(args.time_forced_only, _loadable_backends())
    json_path = os.path.join(out_dir, "results.json")
    previous_rows, earlier_runs = [], []
    if (args.append or args.resume) and os.path.exists(json_path):
        with open(json_path) as handle:
            previous = json.load(handle)
        previous_rows, earlier = previous["results"], previous["conditions"]
        earlier_runs = [*earlier.pop("earlier_runs", []), earlier]
    # Groups of these parts measured already by this code on this device and software (rows written before the group
    # key was recorded, or by another commit, device, torch or triton, are measured again and replaced).
    same_source = {field: env.get(field) for field in report.PROVENANCE}
    done = {row["group_key"] for row in previous_rows if args.resume and row.get("group") in parts and
            row.get("group_key") and all(row.get(field) == value for field, value in same_source.items())}  # fmt: skip
    rows: list[dict] = []  # this run's rows, stamped
    part_rows: list[dict] = []  # the rows of the part in progress
    finished_parts: list[str] = []
    failed_parts: dict[str, str] = {}
    forced = args.time_forced_only
    conditions = {
        "preset": preset.name, "description": preset.description, "parts": parts,
        "command": "python -m bench " + shlex.join(argv), "timing": dataclasses.asdict(preset.timing),
        "layer_sweeps": [dataclasses.asdict(s) for s in preset.layer_sweeps if s.group in parts],
        "ago": dataclasses.asdict(preset.ago) if preset.ago and "ago" in parts else None,
        "step": dataclasses.asdict(preset.step) if preset.step and "step" in parts else None,
        "failed_parts": failed_parts, "gate": "none", "layer_mode": "train()",
        "time_forced_only": forced, "budget_minutes": args.budget_minutes, "skipped_for_time": [],
        "kept_from_earlier_runs": sorted(done),
        "pinned_variant_backends": variant_backends, "pinned_variants_unavailable": variants_unavailable,
        "notes": "forward = training forward (autograd records); backward = autograd.grad for input and adapters; "
                 "peak memory is tracked on CUDA only; throughput fractions use nominal datasheet peaks",
        "note": args.note,
    }  # fmt: skip
    if earlier_runs:
        conditions["earlier_runs"] = earlier_runs

    def all_rows() -> list[dict]:
        """This run's rows, and the earlier rows it has not measured again: another run's rows of a group stay until
        replaced (labelled by their own commit and device), unless their group is no longer in the preset."""
        fresh = rows + report.stamp(part_rows, env)
        measured = {row.get("group_key") for row in fresh}

        def keep(row: dict) -> bool:
            key = row.get("group_key")
            if row.get("group") not in parts or key in done:
                return True
            if key is None or key in measured:
                return False
            # A part that ran to its end asked about every group it has: a key it never named is of an older preset.
            ran_to_end = row.get("group") in finished_parts and row.get("group") not in failed_parts
            return not ran_to_end or key in budget.seen

        return [row for row in previous_rows if keep(row)] + fresh

    def write_finished_groups() -> None:
        """results.json with every group finished so far; the parts not finished yet are marked incomplete."""
        unfinished = [part for part in parts if part not in finished_parts]
        _write_json_atomically(all_rows(), env, {**conditions, "incomplete_parts": unfinished}, json_path)

    budget = TimeBudget(args.budget_minutes, done=done, on_group=write_finished_groups)
    conditions["skipped_for_time"] = budget.skipped  # the same list, filled as groups are skipped
    layers = LayerBenchmark(device, preset.timing, peaks, log, time_forced_only=forced, budget=budget)
    runs = {sweep.group: (lambda sweep=sweep: layers.run(sweep)) for sweep in preset.layer_sweeps}
    if preset.ago is not None:
        runs["ago"] = lambda: run_ago(preset.ago, device, preset.timing, log, forced, budget)
    if preset.step is not None:
        runs["step"] = lambda: run_step(preset.step, device, log, forced, budget)
    for part in parts:
        try:
            for row in runs[part]():
                part_rows.append(dict(row, group_key=budget.current))
        except Exception as exc:  # e.g. open_clip missing, a sticky CUDA error: the finished groups are kept
            failed_parts[part] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            print(f"part {part!r} failed (its finished groups are kept): {failed_parts[part]}", file=sys.stderr,
                  flush=True)  # fmt: skip
        rows.extend(report.stamp(part_rows, env))
        part_rows.clear()
        finished_parts.append(part)
        write_finished_groups()

    files = write_outputs(out_dir, all_rows(), env, conditions)
    log(f"wrote {', '.join(files)} and README.md to {out_dir}")
    return 1 if failed_parts else 0


def _write_json_atomically(rows: list[dict], env: dict, conditions: dict, path: str) -> None:
    """results.json through a temporary file and a rename: a run killed while writing leaves the last one whole."""
    temporary = path + ".partial"
    report.write_json(rows, env, conditions, temporary)
    os.replace(temporary, path)


def write_outputs(out_dir: str, rows: list[dict], env: dict, conditions: dict) -> list[str]:
    """The table (stdout and table.txt), results.csv, results.json, the plots and README.md; returns the files."""
    text = report.text_report(rows, env)
    sys.stdout.write(text)
    with open(os.path.join(out_dir, "table.txt"), "w") as handle:
        handle.write(text)
    report.write_csv(rows, os.path.join(out_dir, "results.csv"))
    _write_json_atomically(rows, env, conditions, os.path.join(out_dir, "results.json"))
    plots = report.write_plots(rows, out_dir, env["device"])
    files = ["table.txt", "results.csv", "results.json", *plots]
    with open(os.path.join(out_dir, "README.md"), "w") as handle:
        handle.write(report.markdown_readme(rows, env, conditions, files, conditions.get("note", "")))
    return files


def rebuild(args: argparse.Namespace) -> int:
    """Redraw the table, plots and README of a results folder from its results.json (nothing is re-measured)."""
    json_path = os.path.join(args.out, "results.json")
    if not os.path.exists(json_path):
        raise SystemExit(f"{json_path} does not exist; run `python -m bench sweep --out {args.out}` first")
    with open(json_path) as handle:
        document = json.load(handle)
    if args.note is not None:
        document["conditions"]["note"] = args.note
    write_outputs(args.out, document["results"], document["environment"], document["conditions"])
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = _parser().parse_args(argv)
    if args.command == "list":
        return _list()
    if args.command == "report":
        return rebuild(args)
    return sweep(args, argv)


if __name__ == "__main__":
    raise SystemExit(main())
