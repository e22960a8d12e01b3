"""Settings: the base layer every part builds on; frozen dataclasses, one loader, one validate().

- `config`: `Settings`, `load` and `validate`, and the small sections.
- `identity`, `audit`, `forward`: the `identity`, `audit` and `forward` sections.
- `read`: the reading layer (`Reader`, `Secret`, durations, sizes).
- `yamlsrc`: YAML with line numbers for error messages.
"""

from .config import (
    DEFAULT_CONFIG,
    AdminSettings,
    ClusterSettings,
    ForwardAuthSettings,
    ListenSettings,
    NotificationSettings,
    RedisSettings,
    SentinelSettings,
    Settings,
    UpstreamSettings,
    WebhookSettings,
    load,
    validate,
)
from .forward import ForwardSettings

__all__ = [
    "DEFAULT_CONFIG",
    "AdminSettings",
    "ClusterSettings",
    "ForwardAuthSettings",
    "ForwardSettings",
    "ListenSettings",
    "NotificationSettings",
    "RedisSettings",
    "SentinelSettings",
    "Settings",
    "UpstreamSettings",
    "WebhookSettings",
    "load",
    "validate",
]
