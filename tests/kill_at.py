"""Run `vla-peft` and kill -9 this very process at the n-th call of one function: a crash at an
exact place (inside a checkpoint write, between its rename and the pruning, inside the bundle
write, before an optimiser step), which no cleanup code can soften.

    python tests/kill_at.py <point> <n> train --config run.yaml [--resume]
"""

import os
import signal
import sys


def kill_on_call(owner, name: str, n: int) -> None:
    real, calls = getattr(owner, name), [0]

    def wrapper(*args, **kwargs):
        calls[0] += 1
        if calls[0] == n:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)

    setattr(owner, name, wrapper)


def install(point: str, n: int) -> None:
    import shutil

    import torch

    import vla_peft.policy.bundle as bundle
    import vla_peft.train.checkpoint as checkpoint
    from vla_peft.train.metrics import MetricsLog

    owners = {
        "optimizer_step": (torch.optim.AdamW, "step"),           # mid-training, between two steps
        "checkpoint_file": (checkpoint, "save_file"),            # inside a checkpoint write
        "checkpoint_prune": (shutil, "rmtree"),                  # after a checkpoint's rename, before the pruning
        "metrics_line": (MetricsLog, "log"),                     # around a metrics line
        "bundle_file": (bundle, "save_normalizers"),             # inside the bundle write
    }
    kill_on_call(*owners[point], n)


if __name__ == "__main__":
    install(sys.argv[1], int(sys.argv[2]))
    from vla_peft.cli import main

    sys.exit(main(sys.argv[3:]))
