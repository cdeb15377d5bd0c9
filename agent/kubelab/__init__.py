"""A small Kubernetes API server for the lab and the tests ONLY.

Never imported by the agent's runtime code (``agent/k8s`` talks to whatever API
server its kubeconfig names). It implements just what the agent and kubectl use:
discovery, list and watch with resourceVersion (one global counter, a bounded event
history, 410 Expired on a too-old version, bookmarks), label and field selectors,
create/get/update/patch (merge, JSON, strategic-merge subset, server-side apply
subset)/delete, the status subresource, namespaces, ``dryRun=All``, and injected
faults for tests. Every object it stores validates against Kubernetes' schemas
(:mod:`agent.kubelab.validate`). Plain HTTP on 127.0.0.1, no authentication.
It has not been run against a real kube-apiserver's conformance tests. See README.md.
"""

from agent.kubelab.server import Faults, LabApiServer

__all__ = ["Faults", "LabApiServer"]
