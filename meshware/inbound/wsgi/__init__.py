"""WSGI inbound middlewares (same names and arguments as meshware.inbound.asgi)."""
