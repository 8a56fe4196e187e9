"""The Flask example service, ``payments`` (see ``docs/flask.md``)."""
