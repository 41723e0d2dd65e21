"""VLAPolicy: frozen VLM + PEFT modules + action head, with its configuration and task bundles."""

from vla_peft.policy.config import PolicyConfig
from vla_peft.policy.policy import VLAPolicy

__all__ = ["PolicyConfig", "VLAPolicy"]
