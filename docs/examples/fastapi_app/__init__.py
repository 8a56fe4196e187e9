"""The FastAPI example service, ``orders`` (see ``docs/fastapi.md``)."""
