"""meshagent: the eBPF traffic-redirection node agent of a sidecar-less service mesh."""

__version__ = "0.1.0"
