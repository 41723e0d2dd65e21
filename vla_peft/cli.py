"""The `vla-peft` command line."""

from __future__ import annotations

import argparse
import sys
import tempfile


def cmd_demo(args: argparse.Namespace) -> int:
    """Build the tiny LLaVA, load it back like a real checkpoint, and report its parts."""
    from vla_peft.models import load_vlm, save_tiny_llava

    with tempfile.TemporaryDirectory() as tmp:
        path = save_tiny_llava(tmp, seed=args.seed)
        model, _ = load_vlm(path)
    scopes = {
        "vision": model.model.vision_tower,
        "projector": model.model.multi_modal_projector,
        "language": model.model.language_model,
    }
    print(f"{'scope':<10} {'parameters':>12}")
    for name, module in scopes.items():
        print(f"{name:<10} {sum(p.numel() for p in module.parameters()):>12,}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vla-peft", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the end-to-end demo on the tiny CPU base")
    demo.add_argument("--seed", type=int, default=0, help="seed of the tiny base (default: 0)")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
