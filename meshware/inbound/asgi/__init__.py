"""Pure-ASGI inbound middlewares."""
