"""The smallest real mesh: two services on 127.0.0.1 calling each other over mTLS.

``orders`` is a Starlette app served by uvicorn; ``users`` is a Flask app served by gunicorn.
Each answers ``/hello`` with the verified principal of its caller, and ``/call-peer`` calls the
other service with its own certificate, checking that the server really is that service.
"""
