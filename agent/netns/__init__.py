"""Network namespaces, veths, rules, routes and sysctls (pyroute2)."""
