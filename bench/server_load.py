"""Load test of the policy server on loopback: N concurrent clients mixing three tasks.

    python bench/server_load.py                       # three tiny bundles, N = 1, 4, 16, 5 s each
    python bench/server_load.py --bank runs/ --seconds 10

Starts `vla-peft serve` as its own process on 127.0.0.1 (never another address), asks each
task for reference answers one request at a time, then runs N client threads for a fixed time
(and at most --max-requests requests) per N. Every request is tagged; an answer counts as
wrong-task when its echoed tag or task differs from the request's, or its chunk differs from
that task's reference for the same observation. Prints requests/s (and the ratio to N = 1),
client-side p50/p95 latency, the server's own p50, the mean batch size, errors and wrong-task
answers; exits 1 if any request failed or was answered for the wrong task.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from vla_peft.serve.client import PolicyClient, ServerError  # noqa: E402

LOOPBACK = "127.0.0.1"
OBSERVATIONS = 4  # distinct observations per task the clients draw from


def tiny_bank(folder: Path) -> Path:
    """Three LoRA bundles on the tiny base whose actions differ (bench/tiny_bundles.py)."""
    from tiny_bundles import make_bundles
    from vla_peft.models import save_tiny_llava

    make_bundles(save_tiny_llava(folder / "base", seed=0), folder / "bank", 3)
    return folder / "bank"


def observations(config: dict, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    size = config["image_size"]
    out = []
    for _ in range(OBSERVATIONS):
        obs = {f"{c}_rgb": rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for c in config["cameras"]}
        share = config["state_dim"] // max(1, len(config["state_keys"]))
        sizes = [share] * len(config["state_keys"])
        if sizes:
            sizes[-1] += config["state_dim"] - sum(sizes)
        obs.update({k: rng.uniform(-0.1, 0.1, n).astype(np.float32) for k, n in zip(config["state_keys"], sizes)})
        out.append(obs)
    return out


def start_server(bank: Path, port: int, threads: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "vla_peft.cli", "serve", "--bank", str(bank), "--host", LOOPBACK,
                             "--port", str(port), "--threads", str(threads)], env=env)
    deadline = time.monotonic() + 180
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with code {proc.returncode}")
        try:
            socket.create_connection((LOOPBACK, port), timeout=0.5).close()
            return proc
        except OSError:
            if time.monotonic() > deadline:
                proc.kill()
                raise SystemExit("the server did not start within 180 s") from None
            time.sleep(0.2)


def run_clients(url: str, n: int, seconds: float, max_requests: int, work: dict, reference: dict) -> dict:
    """N threads, each with its own connection, until the time or the request budget runs out."""
    tasks = list(work)
    deadline = time.monotonic() + seconds
    budget = threading.Semaphore(max_requests)
    lock = threading.Lock()
    stats = {"latency_ms": [], "server_ms": [], "errors": 0, "server_errors": 0, "wrong": 0, "error_text": []}

    def client_loop(index: int) -> None:
        client = PolicyClient(url, timeout=60)
        rng = np.random.default_rng(1000 * n + index)
        i = 0
        while time.monotonic() < deadline and budget.acquire(blocking=False):
            task = tasks[rng.integers(len(tasks))]
            k = int(rng.integers(OBSERVATIONS))
            tag = f"{n}-{index}-{i}"
            i += 1
            start = time.perf_counter()
            try:
                got = client.act(work[task]["obs"][k], work[task]["instruction"], task=task, request_id=tag)
            except Exception as err:  # noqa: BLE001 - counted and reported
                with lock:
                    stats["errors"] += 1
                    stats["server_errors"] += isinstance(err, ServerError) and err.status >= 500
                    stats["error_text"].append(str(err)[:200])
                continue
            elapsed = (time.perf_counter() - start) * 1000
            wrong = got.id != tag or got.task != task or not np.allclose(got.chunk, reference[task][k], atol=1e-4)
            with lock:
                stats["latency_ms"].append(elapsed)
                stats["server_ms"].append(got.latency_ms)
                stats["wrong"] += bool(wrong)
        client.close()

    threads = [threading.Thread(target=client_loop, args=(k,)) for k in range(n)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stats["wall_s"] = time.perf_counter() - start
    return stats


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bank", default=None, help="folder of task bundles (default: three tiny bundles in a temp dir)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16], help="concurrent clients per run")
    parser.add_argument("--seconds", type=float, default=5.0, help="duration of each run (default: 5)")
    parser.add_argument("--max-requests", type=int, default=2000, help="request budget of each run (default: 2000)")
    parser.add_argument("--threads", type=int, default=1, help="the server's torch threads (default: 1)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        bank = Path(args.bank) if args.bank else tiny_bank(Path(tmp))
        with socket.socket() as sock:
            sock.bind((LOOPBACK, 0))
            port = sock.getsockname()[1]
        proc = start_server(bank, port, args.threads)
        url = f"http://{LOOPBACK}:{port}"
        try:
            client = PolicyClient(url)
            tasks = client.tasks()
            if len(tasks) < 3:
                print(f"note: the bank has {len(tasks)} task(s); the test mixes all of them")
            work = {task: {"obs": observations(info["config"], seed), "instruction": "reach the red cube"}
                    for seed, (task, info) in enumerate(sorted(tasks.items())[:3])}
            reference = {task: [client.act(o, w["instruction"], task=task).chunk for o in w["obs"]]
                         for task, w in work.items()}
            # a wrong-task answer is only detectable if another task answers the same observation differently
            gap = min(float(np.abs(client.act(o, w["instruction"], task=other).chunk - reference[task][k]).max())
                      for task, w in work.items() for k, o in enumerate(w["obs"]) for other in work if other != task)
            if gap <= 1e-3:
                raise SystemExit(f"the tasks answer alike (smallest difference {gap:.2g}); wrong-task answers "
                                 "would go unnoticed: use bundles that differ")
            rows, failed = [], False
            for n in args.clients:
                before = client.metrics()
                stats = run_clients(url, n, args.seconds, args.max_requests, work, reference)
                after = client.metrics()
                served = len(stats["latency_ms"])
                rows.append({
                    "n": n, "requests": served, "rps": served / stats["wall_s"],
                    "p50": np.percentile(stats["latency_ms"], 50) if served else float("nan"),
                    "p95": np.percentile(stats["latency_ms"], 95) if served else float("nan"),
                    "server_p50": np.percentile(stats["server_ms"], 50) if served else float("nan"),
                    "batch": _batch_delta(before, after),
                    "errors": stats["errors"],
                    "server_errors": after["server_errors"] - before["server_errors"],
                    "wrong": stats["wrong"],
                })
                failed |= bool(stats["errors"] or stats["wrong"] or rows[-1]["server_errors"])
                for text in stats["error_text"][:3]:
                    print(f"  error (N={n}): {text}")
            client.close()
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)

    print(f"\npolicy server on {LOOPBACK}, tasks {list(work)}, {args.seconds:g} s per run, "
          f"at most {args.max_requests} requests, server threads {args.threads}; tasks differ by >= {gap:.3f} "
          "on the same observation, answers are checked against each task's reference at 1e-4")
    head = f"{'clients':>7} {'requests':>8} {'req/s':>8} {'x N=1':>6} {'p50 ms':>8} {'p95 ms':>8} " \
           f"{'server p50':>10} {'batch':>6} {'errors':>6} {'5xx':>4} {'wrong-task':>10}"
    print(head)
    print("-" * len(head))
    for row in rows:
        ratio = row["rps"] / rows[0]["rps"] if rows[0]["rps"] else float("nan")
        print(f"{row['n']:>7} {row['requests']:>8} {row['rps']:>8.1f} {ratio:>6.2f} {row['p50']:>8.1f} "
              f"{row['p95']:>8.1f} {row['server_p50']:>10.1f} {row['batch'] or 0:>6.2f} {row['errors']:>6} "
              f"{row['server_errors']:>4} {row['wrong']:>10}")
    print("all answers for the right task, no errors" if not failed else "FAILED: errors or wrong-task answers")
    return 1 if failed else 0


def _batch_delta(before: dict, after: dict) -> float | None:
    """Mean batch size of the requests between two /metrics snapshots."""
    acts = after["acts"] - before["acts"]
    if not acts:
        return None
    mean_after, mean_before = after["mean_batch_size"] or 0.0, before["mean_batch_size"] or 0.0
    return (mean_after * after["acts"] - mean_before * before["acts"]) / acts


if __name__ == "__main__":
    sys.exit(main())
