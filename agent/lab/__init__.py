"""Network-namespace lab: two (or more) Kubernetes-like nodes on one machine.

* :mod:`agent.lab.topology` - the pure plan (names, addresses, JSON).
* :mod:`agent.lab.netlab` - builds/tears down the plan in the kernel and runs
  processes inside the lab's namespaces.
* :mod:`agent.lab.commands` - the ``lab`` click group (``up``, ``down``,
  ``exec``, ``list``).
"""
