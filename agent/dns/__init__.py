"""The tunnel's DNS proxy, as ztunnel's: service names answered, the rest forwarded.

- :mod:`agent.dns.names` -- which service a name means for a client (pure);
- :mod:`agent.dns.answer` -- the sans-IO decisions (bytes in, answer or forward out);
- :mod:`agent.dns.server` -- the asyncio shell: UDP and TCP listeners, forwarding.
"""
