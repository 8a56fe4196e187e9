"""The inbound stack: pure-ASGI shells in ``meshware.inbound.asgi`` and WSGI shells of the same
names and arguments in ``meshware.inbound.wsgi``; each feature's shell sits in its own module."""
