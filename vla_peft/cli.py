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


def cmd_pretrain_base(args: argparse.Namespace) -> int:
    """Pretrain the tiny base VLM on simulator captions and grounding questions."""
    from vla_peft.pretrain.train import PretrainConfig, format_report, pretrain

    cfg = PretrainConfig(steps=args.steps, seed=args.seed)
    report = pretrain(args.out, cfg, resume=args.resume, minutes=args.minutes, threads=args.threads)
    print(format_report(report))
    print(f"checkpoint: {args.out} (load with vla_peft.models.load_vlm; inputs via vla_peft.models.load_image_norm)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vla-peft", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the end-to-end demo on the tiny CPU base")
    demo.add_argument("--seed", type=int, default=0, help="seed of the tiny base (default: 0)")
    demo.set_defaults(func=cmd_demo)
    pre = sub.add_parser("pretrain-base", help="pretrain the tiny CPU base VLM on simulator scenes (no actions)")
    pre.add_argument("--out", required=True, help="checkpoint directory to write")
    pre.add_argument("--steps", type=int, default=1200, help="training steps of 16 images x 4 questions (default: 1200)")
    pre.add_argument("--minutes", type=float, default=None, help="stop (resumably) after this much training time")
    pre.add_argument("--seed", type=int, default=0, help="seed of scenes, weights and batches (default: 0)")
    pre.add_argument("--resume", action="store_true", help="continue the run already in --out")
    pre.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    pre.set_defaults(func=cmd_pretrain_base)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
