"""meshware for Django: the framework plugin (see docs/)."""
