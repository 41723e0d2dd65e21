"""``vla-peft eval``: evaluate one bundle, or many task bundles hot-swapped on one base."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

EXAMPLES = """examples:
  vla-peft eval --bundle runs/reach/bundle --task Reach --episodes 50 --seed 1000 --videos 5
  vla-peft eval --bundle runs/mw_reach/bundle --env metaworld/reach-v3 --episodes 50
  vla-peft eval --bundle runs/libero/bundle --env libero/libero_spatial/0 --episodes 50
  vla-peft eval --bank runs/ --tasks Reach,Push,PickPlace --episodes 20
  vla-peft eval --bundle runs/b --env-id my_pkg:Lift-v1 --env-kwargs '{"size": 64}' \\
      --key-map '{"agentview_rgb": "obs:pixels", "ee_pos": "obs:state[0:3]", "instruction": "text:lift the block"}'
key-map sources: obs:<key>[/<sub>][[i:j]], info:<key>, attr:<name>, render, text:<words>
"""


def json_object(text: str) -> dict:
    """A JSON object from the command line, with an error that shows what was wrong."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not valid JSON ({err.msg} at character {err.pos}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object such as '{{\"key\": \"value\"}}', got {text!r}")
    return value


def add_eval_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``eval`` subcommand to the ``vla-peft`` parser."""
    p = subparsers.add_parser("eval", help="closed-loop evaluation (success rate, latency, videos)",
                              description=__doc__, epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--bundle", help="a task bundle directory (written by `vla-peft train`) (default: none)")
    what.add_argument("--bank", help="a folder holding one bundle per task (<bank>/<task>[/bundle]); "
                                     "all are loaded on one base and swapped in per task (default: none)")
    p.add_argument("--task", help="with --bundle: the task to run, e.g. Reach (our MuJoCo task) or a gymnasium id "
                                  "(default: the --env-id)")
    p.add_argument("--tasks", help="with --bank: comma-separated tasks, e.g. Reach,Push,PickPlace (default: none)")
    p.add_argument("--mode", choices=("unmerged", "merged"), default="unmerged",
                   help="with --bank: keep LoRA unmerged or fold the active one into the base (default: unmerged)")
    p.add_argument("--base", help="base checkpoint to load instead of the one the bundle records (default: recorded)")
    p.add_argument("--crop-grid", type=int,
                   help="average each chunk over N x N evaluation crops (test-time augmentation; N*N forward rows) "
                        "(default: the bundle's policy.eval_crop_grid)")
    p.add_argument("--config", help="a YAML file with any of the options below (flags given here override it) (default: none)")
    p.add_argument("--episodes", type=int, help="episodes per task (default: 50)")
    p.add_argument("--seed", type=int, help="episode j of each task starts from seed + j (default: 1000)")
    p.add_argument("--num-envs", type=int, help="environments stepped together in a vector env (default: 1)")
    p.add_argument("--async-envs", action="store_true", default=None,
                   help="one process per environment (AsyncVectorEnv) instead of stepping them in turn (default: off)")
    p.add_argument("--videos", type=int, help="film the first N episodes of each task (default: 0)")
    p.add_argument("--video-format", choices=("mp4", "gif"), help="video container (default: mp4)")
    p.add_argument("--max-steps", type=int, help="cap on episode length (default: the environment's time limit)")
    p.add_argument("--env", help="a benchmark preset, no key map needed: metaworld/<task>-v3 or "
                                 "libero/<suite>/<task index> (needs the metaworld / libero extra) (default: none)")
    p.add_argument("--env-id", help="run this registered gymnasium id instead of our task "
                                    "('module:Id-v0' imports the module first) (default: none)")
    p.add_argument("--env-kwargs", type=json_object, help="JSON keyword arguments for gymnasium.make (default: {})")
    p.add_argument("--key-map", type=json_object,
                   help="JSON {policy input: source} saying where images, state, instruction, success and the "
                        "video frame come from; see the sources below (default: {}: our names)")
    p.add_argument("--out", help="output folder for eval_info.json and videos/ (default: runs/eval)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (default: bars on)")
    p.set_defaults(func=run_eval)
    return p


def eval_config(args: argparse.Namespace):
    """The EvalConfig: defaults, then the --config file, then the flags given."""
    import yaml

    from vla_peft.eval.evaluate import EvalConfig

    values = {}
    if args.config:
        path = Path(args.config)
        if not path.is_file():
            raise FileNotFoundError(f"no eval config at {path}")
        values = yaml.safe_load(path.read_text()) or {}
    flags = {"episodes": args.episodes, "seed": args.seed, "num_envs": args.num_envs, "asynchronous": args.async_envs,
             "videos": args.videos, "video_format": args.video_format, "max_steps": args.max_steps,
             "env": args.env, "env_id": args.env_id, "env_kwargs": args.env_kwargs, "key_map": args.key_map, "out": args.out}
    values.update({k: v for k, v in flags.items() if v is not None})
    if args.no_progress:
        values["progress"] = False
    return EvalConfig.from_dict(values)


def bank_bundle(bank: Path, task: str) -> Path:
    """The bundle of ``task`` in a bank folder: <bank>/<task> or <bank>/<task lower case>, or their bundle/."""
    tried = []
    for name in dict.fromkeys((task, task.lower())):
        for candidate in (bank / name, bank / name / "bundle"):
            tried.append(str(candidate))
            if (candidate / "bundle.json").is_file():
                return candidate
    raise FileNotFoundError(f"no bundle for task {task!r} in {bank}: looked in {tried}")


def set_crop_grid(policies, grid: int | None) -> None:
    """``--crop-grid``: the same bundles, evaluated with another number of test-time crops."""
    if grid is not None:
        if grid < 1:
            raise ValueError(f"--crop-grid {grid}: use 1 (the centre crop only) or N > 1 for N x N crops")
        for policy in policies:
            policy.config.eval_crop_grid = grid


def run_eval(args: argparse.Namespace) -> int:
    from vla_peft.eval.evaluate import evaluate, format_table

    config = eval_config(args)
    if args.bundle:
        from vla_peft.policy.bundle import load_bundle

        task = args.task or config.env or config.env_id
        if not task:
            raise ValueError("say what to evaluate on: --task Reach (our tasks), --env metaworld/reach-v3 (a preset) "
                             "or --env-id <gymnasium id>")
        policy = load_bundle(args.bundle, base=args.base)
        set_crop_grid([policy], args.crop_grid)
        info = evaluate([task], lambda _task: policy, config,
                        described={"bundle": str(args.bundle), "base": policy.config.base,
                                   "eval_crop_grid": policy.config.eval_crop_grid})
    else:
        from vla_peft.serve import AdapterBank

        tasks = [t.strip() for t in (args.tasks or "").split(",") if t.strip()]
        if not tasks:
            raise ValueError("--bank needs --tasks, e.g. --tasks Reach,Push,PickPlace")
        paths = {task: bank_bundle(Path(args.bank), task) for task in tasks}
        bank = AdapterBank.for_bundle(paths[tasks[0]], mode=args.mode, base=args.base)
        for task, path in paths.items():
            bank.register(task, path)
        set_crop_grid(bank.policies.values(), args.crop_grid)
        info = evaluate(tasks, bank.activate, config,
                        described={"bank": {t: str(p) for t, p in paths.items()}, "mode": args.mode,
                                   "base": bank.policies[tasks[0]].config.base,
                                   "eval_crop_grid": {t: bank.policies[t].config.eval_crop_grid for t in tasks}})
    print(format_table(info))
    print(f"results: {Path(config.out) / 'eval_info.json'}")
    return 0
