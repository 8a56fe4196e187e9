"""The Django example service, ``inventory`` (see ``docs/django.md``)."""
