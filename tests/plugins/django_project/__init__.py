"""A small Django project for the plugin tests: function, class-based, sync and async views."""
