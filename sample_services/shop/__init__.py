"""The sample shop: an e-commerce mesh of five services on three frameworks.

``python -m sample_services.shop`` issues certificates, starts ``users`` (FastAPI),
``catalog`` v1 and v2 (Flask, a canary), ``orders`` (FastAPI), ``payments`` (Django) and
``shipping`` (Flask) under ``meshware serve`` with STRICT mTLS, drives traffic, serves a live
dashboard and prints what the mesh saw. See ``docs/sample-mesh.md``.
"""
