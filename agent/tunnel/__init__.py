"""HBONE tunnel: mTLS HTTP/2 CONNECT data plane between nodes."""
