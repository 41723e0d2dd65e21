"""Closed-loop evaluation: rollouts in vector environments, success with Wilson intervals,
latency, eval_info.json and captioned videos; works on any gymnasium env through a key map."""

from vla_peft.eval.evaluate import EvalConfig, evaluate, evaluate_task, format_table, summarise
from vla_peft.eval.keymap import KeyMap, KeyMapError
from vla_peft.eval.metrics import wilson_interval

__all__ = ["EvalConfig", "KeyMap", "KeyMapError", "evaluate", "evaluate_task", "format_table", "summarise",
           "wilson_interval"]
