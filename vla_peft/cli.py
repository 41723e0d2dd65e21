"""The `vla-peft` command line."""

from __future__ import annotations

import argparse
import sys
import tempfile


def cmd_demo(args: argparse.Namespace) -> int:
    """Build the tiny LLaVA, load it back like a real checkpoint, inject a PEFT method into both
    towers and the projector, and print the parameter report."""
    from vla_peft import LoraConfig, inject, load_method_config, load_vlm, save_tiny_llava

    config = load_method_config(args.peft_config) if args.peft_config else LoraConfig()
    with tempfile.TemporaryDirectory() as tmp:
        path = save_tiny_llava(tmp, seed=args.seed)
        model, _ = load_vlm(path, load_in_4bit=getattr(config, "load_in_4bit", False))
    report = inject(model, config)
    method = "qlora" if getattr(config, "load_in_4bit", False) else config.method
    print(f"tiny LLaVA (seed {args.seed}) + {method}:")
    print(report)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """Train a policy from a run config; key=value pairs override it (train.steps=500)."""
    from vla_peft.train import TrainingDiverged, load_run_config, train

    run = load_run_config(args.config, args.overrides)
    try:
        summary = train(run, resume=args.resume)
    except TrainingDiverged as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if summary:
        final = summary["final"]
        print(f"trained {summary['steps']} steps in {summary['elapsed_s']:.0f} s on {summary['processes']} process(es); "
              f"{summary['trainable_parameters']:,} trainable parameters")
        print("final: " + ", ".join(f"{k} {v:.4g}" for k, v in final.items() if isinstance(v, float)))
        if summary["validation"]:
            print("validation: " + ", ".join(f"{k} {v:.4g}" for k, v in summary["validation"].items() if k != "step"))
        print(f"bundle: {summary['bundle']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vla-peft", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the end-to-end demo on the tiny CPU base")
    demo.add_argument("--seed", type=int, default=0, help="seed of the tiny base (default: 0)")
    demo.add_argument(
        "--peft-config", default=None, help="a method config YAML such as configs/peft/qlora.yaml (default: LoRA r=8)"
    )
    demo.set_defaults(func=cmd_demo)
    train = sub.add_parser("train", help="train a policy (PEFT + action head) on demonstrations")
    train.add_argument("--config", required=True, help="a run config, e.g. configs/train/reach_lora.yaml")
    train.add_argument("--resume", action="store_true", help="continue from the last complete checkpoint")
    train.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.steps=500 method.r=8")
    train.set_defaults(func=cmd_train)
    from vla_peft.eval.command import add_eval_parser

    add_eval_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError, KeyError) as err:  # user errors: one line, no traceback
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
