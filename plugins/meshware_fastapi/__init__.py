"""meshware for Fastapi: the framework plugin (see docs/)."""
