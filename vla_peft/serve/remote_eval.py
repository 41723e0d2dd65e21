"""Closed-loop evaluation through a running policy server, with the in-process evaluator.

The environments run here (the robot side); every chunk comes from the server. The results
(``eval_info.json``, the table) are the evaluator's own, so they compare directly with
``vla_peft.eval.evaluate`` on the same bundles and seeds.
"""

from __future__ import annotations

from vla_peft.eval import EvalConfig, evaluate
from vla_peft.serve.client import PolicyClient, RemotePolicy


def evaluate_remote(client: PolicyClient, tasks: dict[str, str], config: EvalConfig) -> dict:
    """Evaluate served tasks: ``tasks`` maps each environment task (``Reach`` or a gymnasium id)
    to the served task that acts in it (``{"Reach": "reach_lora"}``)."""
    served = client.tasks()
    unknown = sorted(set(tasks.values()) - set(served))
    if unknown:
        raise KeyError(f"the server has no task(s) {unknown}; it serves {sorted(served)}")
    return evaluate(list(tasks), lambda env_task: RemotePolicy(client, tasks[env_task]), config,
                    described={"server": f"http://{client.host}:{client.port}", "served_tasks": dict(tasks)})
