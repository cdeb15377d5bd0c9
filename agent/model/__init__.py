"""The cluster model (workloads and services, shaped like ztunnel's), pure.

- :mod:`agent.model.types` -- the dataclasses, enums and the indexed :class:`Model`;
- :mod:`agent.model.loader` -- ztunnel local-config YAML in and out, :class:`ModelWatcher`;
- :mod:`agent.model.merge` -- this node's enrolled workloads merged into the model;
- :mod:`agent.model.select` -- outbound resolution and endpoint selection;
- :mod:`agent.model.commands` -- ``meshagent model check``.
"""

from agent.model.loader import (
    ModelLoadError,
    ModelWatcher,
    ReloadOutcome,
    load_model_file,
    load_model_text,
    model_to_json_yaml,
    model_to_yaml,
)
from agent.model.merge import MergeConflict, merge_local_workloads, workload_from_enrollment
from agent.model.select import (
    NO_HEALTHY_UPSTREAM_FLAG,
    OutboundOutcome,
    Upstream,
    resolve_outbound,
    service_labels,
)
from agent.model.types import (
    Endpoint,
    HealthStatus,
    InboundProtocol,
    Model,
    ModelInvalid,
    NamespacedHostname,
    NetworkAddress,
    Service,
    Workload,
)

__all__ = [
    "NO_HEALTHY_UPSTREAM_FLAG",
    "Endpoint",
    "HealthStatus",
    "InboundProtocol",
    "MergeConflict",
    "Model",
    "ModelInvalid",
    "ModelLoadError",
    "ModelWatcher",
    "NamespacedHostname",
    "NetworkAddress",
    "OutboundOutcome",
    "ReloadOutcome",
    "Service",
    "Upstream",
    "Workload",
    "load_model_file",
    "load_model_text",
    "merge_local_workloads",
    "model_to_json_yaml",
    "model_to_yaml",
    "resolve_outbound",
    "service_labels",
    "workload_from_enrollment",
]
