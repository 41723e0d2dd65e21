"""VLAPolicy: frozen VLM + PEFT modules + action head, with its configuration and task bundles."""

from vla_peft.policy.config import PolicyConfig
from vla_peft.policy.observation import NonFiniteActionError, ObservationError
from vla_peft.policy.policy import VLAPolicy

__all__ = ["NonFiniteActionError", "ObservationError", "PolicyConfig", "VLAPolicy"]
