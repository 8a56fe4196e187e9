"""meshware for Flask: the framework plugin (see docs/)."""
