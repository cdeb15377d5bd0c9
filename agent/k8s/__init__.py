"""Kubernetes: enrollment by Istio's labels and the cluster model from the API server.

- :mod:`agent.k8s.rules` -- Istio ambient's enrollment rules (pure);
- :mod:`agent.k8s.objects` -- tolerant parsing of API objects into typed facts (pure);
- :mod:`agent.k8s.reconcile` -- enroll/unenroll/annotate actions (pure core);
- :mod:`agent.k8s.convert` -- Pods/Services/EndpointSlices/AuthorizationPolicies to
  the cluster model and policy set (pure);
- :mod:`agent.k8s.watch` -- list+watch with the official client in a thread, feeding
  an asyncio queue; :mod:`agent.k8s.cache` -- the last seen objects;
- :mod:`agent.k8s.nodeagent` -- what the daemon runs: client, watches, controller,
  enrollment through the daemon's transaction, the tunnel's model and policy files,
  the CNI plugin's ``pod_verdict``; :mod:`agent.k8s.podnetns` -- a pod's netns from
  its IP;
- :mod:`agent.k8s.cni_install` -- the CNI conflist install step;
- ``agent/k8s/manifests/`` -- the DaemonSet and RBAC.
"""
