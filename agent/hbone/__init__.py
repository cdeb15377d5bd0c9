"""HBONE: Istio ztunnel's tunnel protocol, HTTP/2 CONNECT over mutual TLS.

Split the way the ``h2`` library splits itself. Pure, sans-IO (no asyncio, no ssl):

* :mod:`~agent.hbone.events` - what the protocol core reports to the application.
* :mod:`~agent.hbone.exceptions` - every error raised by the package.
* :mod:`~agent.hbone.errors` - RFC 9113 error codes.
* :mod:`~agent.hbone.headers` - ``:authority``, ``Forwarded``, ``baggage`` helpers.
* :mod:`~agent.hbone.config` - HTTP/2 settings and flood limits.
* :mod:`~agent.hbone.connection` - the protocol core (bytes in, events and bytes out).
* :mod:`~agent.hbone.compat` - the version-checked patches of h2/hyperframe internals.

The asyncio shell:

* :mod:`~agent.hbone.stream` - one tunnelled byte stream (read/write/close_write/abort).
* :mod:`~agent.hbone.session` - the read loop, flushing and keepalive shared by both roles.
* :mod:`~agent.hbone.client` - an outbound connection opening CONNECT streams.
* :mod:`~agent.hbone.server` - serving one accepted connection's CONNECT requests.
* :mod:`~agent.hbone.pool` - pooled outbound connections, as ztunnel's pool.
"""
