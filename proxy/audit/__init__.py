"""The audit trail: one record per decision and per grant change, never lost silently.

- `log`: `AuditLog` (emit, batch, deliver, retry) and `record()`; the HMAC chain's writer side.
- `spool`: the write-ahead spool that survives a crash.
- `replay`: replaying a crashed writer's spool without writing a record twice.
- `sinks`: the JSON-lines file, stdout and HTTP collectors.
- `store`: the Redis stream with its indexes (a sink that can also be queried).
- `query`: the filters shared by the API, the pages and the CLI.
- `chain`: `jitgate audit verify`, the chain's reader side.
"""

from .log import CHECKPOINT, RECOVERED, AuditLog, Record, Sink, record

__all__ = ["CHECKPOINT", "RECOVERED", "AuditLog", "Record", "Sink", "record"]
