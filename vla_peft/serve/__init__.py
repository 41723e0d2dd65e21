"""Serving many tasks from one loaded base: AdapterBank (register bundles, hot-swap by name)."""

from vla_peft.serve.bank import MODES, AdapterBank

__all__ = ["MODES", "AdapterBank"]
