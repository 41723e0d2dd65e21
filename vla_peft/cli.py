"""The `vla-peft` command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def cmd_demo(args: argparse.Namespace) -> int:
    """Collect, train one bundle per task on the frozen tiny base, evaluate with hot swaps, print the table."""
    from vla_peft.demo import DEFAULT_METHOD, DemoConfig, format_report, run_demo

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    config = DemoConfig(tasks=tasks, method=args.method or str(DEFAULT_METHOD), base=args.base, out=args.out, seed=args.seed,
                        quick=args.quick, jobs=args.jobs, overrides=(["policy.load_in_4bit=true"] if args.load_in_4bit else []) + args.overrides)
    print(format_report(run_demo(config)))
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
        print(f"summary: {Path(run.train.output_dir) / 'summary.json'}")
    return 0


def cmd_collect(args: argparse.Namespace) -> int:
    """Collect scripted-expert demonstrations into one HDF5 file."""
    import signal

    from envs.presets import resolve_preset
    from vla_peft.data.collect import CollectConfig, collect, format_summary

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `kill` unwinds like Ctrl-C: no partial file is left
    task = args.task or args.env
    preset = resolve_preset(args.env) if args.env else None
    image_size = args.image_size or (preset.image_size if preset else 96)
    cameras = args.cameras or (preset.cameras if preset else ("agentview", "wrist"))
    config = CollectConfig(
        task=task, episodes=args.episodes, out=args.out, image_size=image_size, cameras=tuple(cameras),
        seed=args.seed, workers=args.workers, keep_failed=args.keep_failed, max_attempts=args.max_attempts,
        play=args.play, max_steps=args.max_steps, action_noise=args.action_noise,
        after_success=args.after_success,
    )
    summary = collect(config)
    print(format_summary(summary))
    if summary["episodes_kept"] < args.episodes:
        print(f"warning: only {summary['episodes_kept']} of {args.episodes} episodes kept; raise --max-attempts")
    print(f"summary: {write_summary(args.out, summary)}")
    return 0


def cmd_import_lerobot(args: argparse.Namespace) -> int:
    """Convert a local LeRobotDataset directory into the HDF5 layout."""
    from vla_peft.data.lerobot import import_lerobot

    summary = import_lerobot(args.src, args.out)
    print(
        f"imported {summary['episodes']} episodes, {summary['frames']} frames, cameras {summary['cameras']} "
        f"(LeRobot {summary['version']}) -> {args.out} ({summary['bytes'] / 1e6:.1f} MB)"
    )
    print(f"summary: {write_summary(args.out, summary)}")
    return 0


def write_summary(data_file: str, summary: dict) -> Path:
    """A data command's results as JSON beside its file: demos/x.hdf5 -> demos/x.json."""
    from vla_peft.eval.evaluate import write_json_atomic

    return write_json_atomic(Path(data_file).with_suffix(".json"), summary)


def add_data_commands(sub) -> None:
    collect = sub.add_parser("collect", help="record scripted-expert demonstrations to HDF5 (robomimic/LIBERO layout)")
    what = collect.add_mutually_exclusive_group(required=True)
    what.add_argument("--task", help="Reach, Push, PickPlace, Stack (or a full gymnasium id); this or --env (default: none)")
    what.add_argument("--env", help="a benchmark preset whose scripted experts record the demos: metaworld/<task>-v3 "
                                    "(needs the metaworld extra); this or --task (default: none)")
    collect.add_argument("--episodes", type=int, required=True, help="number of episodes to keep")
    collect.add_argument("--out", required=True, help="output .hdf5 file (written atomically)")
    collect.add_argument("--image-size", type=int, default=None,
                         help="camera image side in pixels (default: 96 for our tasks, 64 for Meta-World)")
    collect.add_argument("--cameras", nargs="+", default=None,
                         help="cameras to record (default: agentview wrist for our tasks, corner for Meta-World)")
    collect.add_argument("--seed", type=int, default=0, help="episode i is reset with seed+i (default: 0)")
    collect.add_argument("--workers", type=int, default=1, help="parallel worker processes (default: 1)")
    collect.add_argument("--keep-failed", action="store_true", help="keep episodes where the expert failed too (default: only successes)")
    collect.add_argument("--max-attempts", type=int, default=None, help="episodes to try at most (default: 3 x episodes + 10)")
    collect.add_argument("--play", action="store_true",
                         help="undirected play (random waypoints over the objects) instead of the expert: scenes for "
                              "grounding targets only, listed under data.grounding_paths (default: off)")
    collect.add_argument("--max-steps", type=int, default=None,
                         help="cut each episode after this many steps (default: the task's step limit)")
    collect.add_argument("--action-noise", type=float, default=0.0,
                         help="DART-style noise injection: add Gaussian noise of this std (action units) to the moves "
                              "executed, record the expert's clean action (default: 0, none)")
    collect.add_argument("--after-success", type=int, default=0,
                         help="record this many steps after the first success, the expert still acting (PickPlace: its "
                              "open fingers, still over the pad), so the move that ends a task is more than one frame "
                              "(default: 0)")
    collect.set_defaults(func=cmd_collect)
    lerobot = sub.add_parser("import-lerobot", help="convert a local LeRobotDataset (v2.1 or v3.0) directory to HDF5")
    lerobot.add_argument("src", help="root of the LeRobot dataset (holds meta/info.json)")
    lerobot.add_argument("out", help="output .hdf5 file (written atomically)")
    lerobot.set_defaults(func=cmd_import_lerobot)


def cmd_pretrain_base(args: argparse.Namespace) -> int:
    """Pretrain the tiny base VLM on simulator captions and grounding questions."""
    from vla_peft.pretrain.train import RECIPES, PretrainConfig, format_report, pretrain

    recipe = dict(RECIPES[args.recipe])
    if args.recipe == "refine" and not args.init:
        print("error: --recipe refine starts from a base: pass --init DIR (a vision-first checkpoint, e.g. "
              "vla_peft/pretrain/base)", file=sys.stderr)
        return 2
    recipe.update({"seed": args.seed, **({} if args.steps is None else {"steps": args.steps}),
                   **({"init": str(Path(args.init).resolve())} if args.init else {}),
                   **({} if args.lm_steps is None else {"lm_steps": args.lm_steps}),
                   **({} if args.lr is None else {"lr": args.lr})})
    cfg = PretrainConfig(**recipe)
    report = pretrain(args.out, cfg, resume=args.resume, minutes=args.minutes, threads=args.threads)
    print(format_report(report))
    print(f"checkpoint: {args.out} (load with vla_peft.models.load_vlm; inputs via vla_peft.models.load_image_norm)")
    print(f"results: {Path(args.out) / 'pretrain_eval.json'}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    """List the bench scripts, or run one and keep what it printed as JSON."""
    from vla_peft.bench import available, format_list, run_bench

    if not args.name:
        print(format_list(available()))
        return 0
    out = Path(args.out or f"runs/bench/{args.name}.json")
    result = run_bench(args.name, args.args, out)
    print(f"bench {args.name}: exit {result['returncode']} after {result['seconds']:.0f} s; output saved in {out}")
    return result["returncode"]


def cmd_serve(args: argparse.Namespace) -> int:
    """Load the base once and every task bundle under --bank, then serve actions until SIGINT/SIGTERM."""
    import os

    from vla_peft.serve.server import bind, find_bundles, is_loopback, load_bank, run_server

    token = args.token or os.environ.get("VLA_PEFT_SERVE_TOKEN") or None
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if not is_loopback(args.host) and not token:  # refuse before the (slow) model load
        raise ValueError(f"--host {args.host} exposes the robot policy beyond this machine; set a shared token "
                         "(--token or VLA_PEFT_SERVE_TOKEN) or bind to 127.0.0.1")
    find_bundles(args.bank)  # a wrong folder is named before anything else
    sock = bind(args.host, args.port)  # a port in use is reported now, before the load and the announcement
    try:
        bank = load_bank(args.bank, base=args.base, mode=args.mode)
    except BaseException:
        sock.close()
        raise
    for name, why in bank.failed.items():
        print(f"warning: task {name!r} is not served: {why}", file=sys.stderr, flush=True)
    print(f"serving {len(bank.names)} task(s) {bank.names} on http://{args.host}:{args.port} "
          f"({args.mode} swaps, token {'on' if token else 'off'}); Ctrl-C stops", flush=True)
    run_server(bank, host=args.host, port=args.port, token=token,
               max_request_bytes=int(args.max_request_mb * 1024 * 1024), max_batch=args.max_batch,
               grace_s=args.grace_s, max_connections=args.max_connections, log_level=args.log_level,
               max_instruction_chars=args.max_instruction_chars, sock=sock)
    print("server stopped", flush=True)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vla-peft", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    from vla_peft.demo import DEFAULT_TASKS

    demo = sub.add_parser(
        "demo", help="end-to-end demo: collect, train a LoRA bundle per task on one frozen base, evaluate with hot swaps",
        description="Collect expert demonstrations, train one PEFT task bundle per task on the frozen tiny "
                    "pretrained base, evaluate every bundle in closed loop by swapping it on one loaded base, "
                    "and print one table. Per-task settings: configs/tasks/<task>.yaml.",
        epilog="examples:\n  vla-peft demo\n  vla-peft demo --quick --out runs/smoke\n"
               "  vla-peft demo --tasks Reach train.steps=800 eval.episodes=50 method.r=16\n"
               "  vla-peft demo --method configs/peft/qlora.yaml --base path/to/llava",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    demo.add_argument("--tasks", default=",".join(DEFAULT_TASKS),
                      help=f"comma-separated tasks, each with configs/tasks/<task>.yaml (default: {','.join(DEFAULT_TASKS)})")
    demo.add_argument("--method", default=None,
                      help="a PEFT method config from configs/peft/ (default: configs/peft/lora.yaml)")
    demo.add_argument("--base", default=None,
                      help="a base checkpoint directory or hub name (default: the tiny pretrained base, shipped or "
                           "cached in ~/.cache/vla_peft/tiny_base, built once if neither)")
    demo.add_argument("--load-in-4bit", action="store_true",
                      help="load the base in 4-bit NF4 (bitsandbytes), same as policy.load_in_4bit=true; a QLoRA "
                           "method config implies it (default: off: the base's own precision)")
    demo.add_argument("--out", default=None, help="output folder, must be new or empty (default: runs/demo-<timestamp>)")
    demo.add_argument("--seed", type=int, default=0,
                      help="seeds collection (episode i: seed+i), training, and evaluation (seed+1000+j) (default: 0)")
    demo.add_argument("--quick", action="store_true",
                      help="smoke run: a few episodes and steps per task, about 3 minutes (default: off)")
    demo.add_argument("--jobs", type=int, default=2,
                      help="tasks collected and trained at once, each in its own process on one torch thread; "
                           "1 runs them one after another with progress bars (default: 2, one per core of a laptop)")
    demo.add_argument("overrides", nargs="*",
                      help="section.key=value for every task: collect.*, policy.*, method.*, data.*, train.*, "
                           "eval.* (e.g. train.steps=800 eval.episodes=50) (default: none)")
    demo.set_defaults(func=cmd_demo)
    train = sub.add_parser("train", help="train a policy (PEFT + action head) on demonstrations")
    train.add_argument("--config", required=True, help="a run config, e.g. configs/train/reach_lora.yaml (required)")
    train.add_argument("--resume", action="store_true", help="continue from the last complete checkpoint in train.output_dir (default: off: start fresh)")
    train.add_argument("overrides", nargs="*", help="section.key=value overrides of the config, e.g. train.steps=500 method.r=8 (default: none)")
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
    serve.add_argument("--max-instruction-chars", type=int, default=1000,
                       help="longest instruction accepted (characters), 422 above; the same limit as "
                            "predict_chunk's (default: 1000)")
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
    pre.add_argument("--recipe", choices=["vision-first", "scene-code", "locator", "refine"], default="vision-first",
                     help="vision-first: the shipped base's (patches of 8 px; 3,000 vision-only steps, 1,500 LLaVA "
                          "steps, 3,000 language-only steps; docs/base-models.md); scene-code: the first shipped base's "
                          "(3,000 steps, 8,000 scenes); locator: posed scenes, the locator target and fine answers "
                          "(4,000 steps, 80,000 scenes); refine: a vision-first base (--init) refined on expert frames "
                          "with the table target, its language model realigned (default: vision-first)")
    pre.add_argument("--init", default=None, help="a pretrain-base checkpoint to start from (the refine recipe's input; "
                     "default: a fresh model)")
    pre.add_argument("--steps", type=int, default=None,
                     help="LLaVA-stage steps of 16 images x 4 questions (+48 or 64 images for the vision tower) "
                          "(default: the recipe's, 1,500, 3,000 or 4,000)")
    pre.add_argument("--lm-steps", type=int, default=None,
                     help="steps of a last stage that trains the language model alone, the vision side frozen "
                          "(default: the recipe's)")
    pre.add_argument("--minutes", type=float, default=None, help="stop (resumably) after this much training time (default: no limit)")
    pre.add_argument("--seed", type=int, default=0, help="seed of scenes, weights and batches (default: 0)")
    pre.add_argument("--lr", type=float, default=None,
                     help="the language model's peak AdamW learning rate; at 2e-3 it stalled at the answer prior "
                          "(default: the recipe's 3e-4; the vision side uses 2e-3)")
    pre.add_argument("--resume", action="store_true", help="continue the run already in --out (default: off)")
    pre.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    pre.set_defaults(func=cmd_pretrain_base)
    bench = sub.add_parser("bench", help="list the benchmark scripts in bench/, or run one and save its output as JSON",
                           epilog="examples:\n  vla-peft bench\n  vla-peft bench swap\n  vla-peft bench train_speed --threads 1",
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    bench.add_argument("name", nargs="?", help="bench to run, e.g. swap (default: none: list them)")
    bench.add_argument("--out", default=None, help="JSON file for the output; give it before the name (default: runs/bench/<name>.json)")
    bench.add_argument("args", nargs=argparse.REMAINDER, help="everything after the name goes to the bench script (default: none)")
    bench.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    from envs.presets import MissingExtraError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError, KeyError, MissingExtraError) as err:  # user errors: one line
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
