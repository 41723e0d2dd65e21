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
        summary = train(run, resume=args.resume).summary
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


def cmd_collect(args: argparse.Namespace) -> int:
    """Collect scripted-expert demonstrations into one HDF5 file."""
    import signal

    from vla_peft.data.collect import CollectConfig, collect, format_summary

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `kill` unwinds like Ctrl-C: no partial file is left
    config = CollectConfig(
        task=args.task, episodes=args.episodes, out=args.out, image_size=args.image_size, cameras=tuple(args.cameras),
        seed=args.seed, workers=args.workers, keep_failed=args.keep_failed, max_attempts=args.max_attempts,
    )
    summary = collect(config)
    print(format_summary(summary))
    if summary["episodes_kept"] < args.episodes:
        print(f"warning: only {summary['episodes_kept']} of {args.episodes} episodes kept; raise --max-attempts")
    return 0


def cmd_import_lerobot(args: argparse.Namespace) -> int:
    """Convert a local LeRobotDataset directory into the HDF5 layout."""
    from vla_peft.data.lerobot import import_lerobot

    summary = import_lerobot(args.src, args.out)
    print(
        f"imported {summary['episodes']} episodes, {summary['frames']} frames, cameras {summary['cameras']} "
        f"(LeRobot {summary['version']}) -> {args.out} ({summary['bytes'] / 1e6:.1f} MB)"
    )
    return 0


def add_data_commands(sub) -> None:
    collect = sub.add_parser("collect", help="record scripted-expert demonstrations to HDF5 (robomimic/LIBERO layout)")
    collect.add_argument("--task", required=True, help="Reach, Push, PickPlace, Stack (or a full gymnasium id)")
    collect.add_argument("--episodes", type=int, required=True, help="number of episodes to keep")
    collect.add_argument("--out", required=True, help="output .hdf5 file (written atomically)")
    collect.add_argument("--image-size", type=int, default=96, help="camera image side in pixels (default: 96)")
    collect.add_argument("--cameras", nargs="+", default=["agentview", "wrist"], help="cameras to record (default: agentview wrist)")
    collect.add_argument("--seed", type=int, default=0, help="episode i is reset with seed+i (default: 0)")
    collect.add_argument("--workers", type=int, default=1, help="parallel worker processes (default: 1)")
    collect.add_argument("--keep-failed", action="store_true", help="keep episodes where the expert failed too (default: only successes)")
    collect.add_argument("--max-attempts", type=int, default=None, help="episodes to try at most (default: 3 x episodes + 10)")
    collect.set_defaults(func=cmd_collect)
    lerobot = sub.add_parser("import-lerobot", help="convert a local LeRobotDataset (v2.1 or v3.0) directory to HDF5")
    lerobot.add_argument("src", help="root of the LeRobot dataset (holds meta/info.json)")
    lerobot.add_argument("out", help="output .hdf5 file (written atomically)")
    lerobot.set_defaults(func=cmd_import_lerobot)


def cmd_pretrain_base(args: argparse.Namespace) -> int:
    """Pretrain the tiny base VLM on simulator captions and grounding questions."""
    from vla_peft.pretrain.train import PretrainConfig, format_report, pretrain

    cfg = PretrainConfig(steps=args.steps, seed=args.seed)
    report = pretrain(args.out, cfg, resume=args.resume, minutes=args.minutes, threads=args.threads)
    print(format_report(report))
    print(f"checkpoint: {args.out} (load with vla_peft.models.load_vlm; inputs via vla_peft.models.load_image_norm)")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """Load the base once and every task bundle under --bank, then serve actions until SIGINT/SIGTERM."""
    import os

    from vla_peft.serve.server import is_loopback, load_bank, run_server

    token = args.token or os.environ.get("VLA_PEFT_SERVE_TOKEN") or None
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if not is_loopback(args.host) and not token:  # refuse before the (slow) model load
        raise ValueError(f"--host {args.host} exposes the robot policy beyond this machine; set a shared token "
                         "(--token or VLA_PEFT_SERVE_TOKEN) or bind to 127.0.0.1")
    bank = load_bank(args.bank, base=args.base, mode=args.mode)
    print(f"serving {len(bank.names)} task(s) {bank.names} on http://{args.host}:{args.port} "
          f"({args.mode} swaps, token {'on' if token else 'off'}); Ctrl-C stops", flush=True)
    run_server(bank, host=args.host, port=args.port, token=token,
               max_request_bytes=int(args.max_request_mb * 1024 * 1024), max_batch=args.max_batch,
               grace_s=args.grace_s, max_connections=args.max_connections, log_level=args.log_level)
    print("server stopped", flush=True)
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
    add_data_commands(sub)
    serve = sub.add_parser("serve", help="serve actions to robots over HTTP, switching task adapters on one base")
    serve.add_argument("--bank", required=True,
                       help="folder of task bundles: <task>/bundle.json or <task>/bundle/bundle.json (train's runs/)")
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to bind; anything but loopback requires a token (default: 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="TCP port (default: 8000)")
    serve.add_argument("--base", default=None, help="base checkpoint (default: the one the first bundle names)")
    serve.add_argument("--mode", default="unmerged", choices=["unmerged", "merged"],
                       help="unmerged: swap by switching the active LoRA; merged: fold it into the weights "
                            "(default: unmerged)")
    serve.add_argument("--token", default=None,
                       help="shared token clients send as the header 'Authorization: Bearer TOKEN' "
                            "(default: $VLA_PEFT_SERVE_TOKEN, else no token)")
    serve.add_argument("--max-request-mb", type=float, default=8.0,
                       help="largest request body accepted, 413 above (default: 8)")
    serve.add_argument("--max-batch", type=int, default=16,
                       help="most requests of one task in one forward pass (default: 16)")
    serve.add_argument("--max-connections", type=int, default=64,
                       help="concurrent connections, 503 above (default: 64)")
    serve.add_argument("--grace-s", type=float, default=10.0,
                       help="on SIGINT/SIGTERM, seconds requests in flight get to finish (default: 10)")
    serve.add_argument("--threads", type=int, default=None,
                       help="torch CPU threads for inference; 1 suits a machine shared with the robot's own "
                            "processes (default: torch's choice)")
    serve.add_argument("--log-level", default="warning", help="uvicorn log level (default: warning)")
    serve.set_defaults(func=cmd_serve)
    from vla_peft.eval.command import add_eval_parser

    add_eval_parser(sub)
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
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError, KeyError) as err:  # user errors: one line, no traceback
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
