"""The agent's root-only UNIX socket API: JSON requests, one per line."""
