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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vla-peft", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the end-to-end demo on the tiny CPU base")
    demo.add_argument("--seed", type=int, default=0, help="seed of the tiny base (default: 0)")
    demo.add_argument(
        "--peft-config", default=None, help="a method config YAML such as configs/peft/qlora.yaml (default: LoRA r=8)"
    )
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
