"""CNI (Container Network Interface) support.

* :mod:`agent.cni.spec` - pure: parse and validate the CNI environment and the
  network configuration on stdin, decide what to do, build results and errors.
* :mod:`agent.cni.plugin` - ``meshagent-cni``, the chained plugin executable
  that enrolls pods with the running agent over its API socket.
* :mod:`agent.cni.runtime` - pure: a tiny runtime that runs a conflist's
  plugins in order (ADD, CHECK) or in reverse (DEL), as libcni does; the lab
  uses it to create pods through ``ptp`` + ``host-local`` + ``meshagent-cni``.
"""
