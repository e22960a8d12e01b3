"""Recording metadata: whose recording it is, asked of the replay tool's own API.

- `adapters`: one adapter per tool (PostHog, Sentry, OpenReplay, the demo app) and
  `Metadata`, what they read: the data subject, start URL, visited URLs, person properties.
- `cache`: `MetadataCache`, which fetches off the hot path and keeps answers in Redis.

Nothing in policy, grants, audit or identity imports this package; app.py wires it to the
gate (the subject of each audited access) and the workflow (a fetch at grant time).
"""

from .adapters import Adapter, Metadata, MetadataError, adapter_for
from .cache import Lookup, MetadataCache

__all__ = ["Adapter", "Lookup", "Metadata", "MetadataCache", "MetadataError", "adapter_for"]
