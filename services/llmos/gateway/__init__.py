"""The gateway: the public Generate API."""
