"""Command line: python -m rank1_cl {demo,train,params} (also installed as `rank1-cl`).

rank1-cl demo                                     the CPU demo on synthetic data (a few minutes)
rank1-cl train --config run.toml --data-root D    the MTIL protocol (or --benchmark xtail / synthetic)
torchrun --nproc_per_node=2 -m rank1_cl train ... the same, data-parallel
rank1-cl train ... --resume                       continue a killed run from its last finished task
rank1-cl params --model ViT-B-16                  trainable-parameter report, read from the model
"""

from __future__ import annotations

import argparse
import logging
import sys

# Flags that set one config key each (the rest: --set SECTION.KEY=VALUE).
_TRAIN_FLAGS = {
    "model": "model.name", "pretrained": "model.pretrained", "device": "model.device", "precision": "model.precision",
    "method": "train.method", "iterations": "train.iterations", "batch_size": "train.batch_size", "lr": "train.lr",
    "shots": "train.shots", "seed": "train.seed", "ago_weight": "train.ago_weight", "r": "pool.r", "k": "pool.k",
    "routing": "pool.routing", "gate": "pool.gate", "benchmark": "data.benchmark", "order": "data.order",
    "data_root": "data.data_root", "tasks": "data.tasks", "num_workers": "data.num_workers", "run_dir": "run.run_dir",
    "stop_after_task": "run.stop_after_task",
}  # fmt: skip


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rank1-cl", description="Continual learning of CLIP with rank-1 expert pools")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="CPU demo: tiny CLIP on synthetic domains, pool+AGO vs LoRA vs full FT")
    demo.add_argument("--run-dir", default="runs/demo")
    demo.add_argument("--iterations", type=int, default=60, help="training iterations per task (default 60)")
    demo.add_argument("--shots", type=int, default=5, help="training images per class (default 5)")
    demo.add_argument("--pretrain-steps", type=int, default=300)
    demo.add_argument("--test-per-class", type=int, default=40)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--methods", default="pool,lora,full", help="comma-separated subset of pool,lora,full")
    demo.add_argument(
        "--domains", default=None, help="comma-separated synthetic domains in training order (default: all)"
    )
    demo.add_argument("--no-progress", action="store_true")

    train = commands.add_parser("train", help="run the continual-learning protocol")
    train.add_argument("--config", help="a .json or .toml file with sections model, pool, train, data, eval, run")
    train.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override any setting")
    for flag, key in _TRAIN_FLAGS.items():
        train.add_argument("--" + flag.replace("_", "-"), dest=flag, default=None, help=f"sets {key}")
    train.add_argument("--resume", action="store_true", help="continue from the last finished task in --run-dir")
    train.add_argument("--no-checkpoints", action="store_true")
    train.add_argument("--no-progress", action="store_true")
    train.add_argument("--compile", action="store_true", help="torch.compile the training forward (sets train.compile)")

    params = commands.add_parser("params", help="trainable-parameter report (built on the meta device)")
    params.add_argument("--model", default="ViT-B-16")
    params.add_argument("--r", type=int, default=12)
    params.add_argument("--json", action="store_true")
    return parser


def main(argv=None) -> int:
    arguments = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if arguments.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("rank1_cl").setLevel(logging.DEBUG if arguments.verbose else logging.INFO)
    interrupted_hint = ""
    try:
        if arguments.command == "demo":
            from .demo import run_demo

            methods = [method.strip() for method in arguments.methods.split(",") if method.strip()]
            unknown = [method for method in methods if method not in ("pool", "lora", "full")]
            if unknown or not methods:
                raise ValueError(
                    f"--methods {arguments.methods!r}: expected a comma-separated subset of pool,lora,full"
                )
            run_demo(arguments.run_dir, arguments.iterations, arguments.shots, arguments.seed, arguments.pretrain_steps,
                     methods, arguments.test_per_class, progress=not arguments.no_progress,
                     domains=arguments.domains.split(",") if arguments.domains else None)  # fmt: skip
        elif arguments.command == "train":
            from .config import load_config, parse_assignments
            from .distributed import init_distributed, shutdown
            from .trainer import run_continual

            overrides = parse_assignments(arguments.set)
            overrides.update(
                {
                    key: getattr(arguments, flag)
                    for flag, key in _TRAIN_FLAGS.items()
                    if getattr(arguments, flag) is not None
                }
            )
            if arguments.resume:
                overrides["run.resume"] = True
            if arguments.no_checkpoints:
                overrides["run.checkpoints"] = False
            if arguments.compile:
                overrides["train.compile"] = True
            config = load_config(arguments.config, overrides)
            interrupted_hint = (
                "; its finished tasks are checkpointed: continue it with --resume" if config.run.checkpoints
                else "; checkpoints were off (--no-checkpoints): a new run starts from the first task"
            )  # fmt: skip
            context = init_distributed(config.model.device)
            try:
                output = run_continual(config, context=context, progress=not arguments.no_progress)
            finally:
                shutdown(context)
            if output.is_main:
                from .metrics import format_matrix

                names = output.results["tasks"]
                for kind, matrix in output.results["matrices"].items():
                    if matrix:
                        print(format_matrix(matrix, names, f"{kind.upper()} accuracy (%) of {config.train.method}"))
                print(f"results under {config.run.run_dir}/")
        else:
            from .config import PoolSettings
            from .model import format_parameter_report, parameter_report

            report = parameter_report(arguments.model, PoolSettings(r=arguments.r))
            if arguments.json:
                import json

                print(json.dumps(report, indent=2))
            else:
                print(format_parameter_report(report))
    except KeyboardInterrupt:
        print(f"rank1-cl {arguments.command}: interrupted{interrupted_hint}", file=sys.stderr)
        return 130
    except (ValueError, OSError, ImportError) as error:  # OSError: a directory unwritable, full, missing or in use
        print(f"rank1-cl {arguments.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
