"""`vla-peft bench`: list and run the benchmark scripts in ``bench/``, keeping what they print.

Each script prints its own table; this runs it in a fresh interpreter (so one bench's
threads and caches never colour another's), shows its output as it comes, and saves the
printed text (stdout; progress bars and warnings go to stderr, uncaptured) with the command
and timing as JSON, which the tables of docs/benchmarks.md are copied from.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import time
from pathlib import Path

from vla_peft.eval.evaluate import write_json_atomic

ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = ROOT / "bench"


def available() -> dict[str, str]:
    """Bench name -> the first paragraph of its docstring."""
    if not BENCH_DIR.is_dir():
        raise FileNotFoundError(f"no bench/ folder at {BENCH_DIR}: the benches ship with a source checkout")
    scripts = {}
    for path in sorted(BENCH_DIR.glob("*.py")):
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        scripts[path.stem] = " ".join(doc.strip().split("\n\n")[0].split())  # its first paragraph
    return scripts


def format_list(scripts: dict[str, str]) -> str:
    width = max(map(len, scripts), default=0)
    lines = [f"{name:<{width}}  {doc}" for name, doc in scripts.items()]
    return "\n".join(lines + ["run one: vla-peft bench <name> [script options]; vla-peft bench <name> --help for them"])


def run_bench(name: str, args: list[str], out: Path) -> dict:
    """Run ``bench/<name>.py args`` from the checkout root, echo its output, write ``out`` JSON."""
    scripts = available()
    if name not in scripts:
        import difflib

        near = difflib.get_close_matches(name, list(scripts), n=3, cutoff=0.4)
        raise ValueError(f"no bench named {name!r}; nearest: {near or sorted(scripts)} (vla-peft bench lists them)")
    command = [sys.executable, str(BENCH_DIR / f"{name}.py"), *args]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    started = time.perf_counter()
    lines = []
    with subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True) as proc:
        for line in proc.stdout:
            print(line, end="", flush=True)
            lines.append(line)
    result = {
        "bench": name, "args": args, "command": f"vla-peft bench {' '.join([name, *args])}",
        "returncode": proc.returncode, "seconds": round(time.perf_counter() - started, 1),
        "cpu_count": os.cpu_count(), "output": "".join(lines),
    }
    write_json_atomic(out, result)
    return result
