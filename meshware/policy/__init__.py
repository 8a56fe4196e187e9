"""Sans-I/O policy cores: each takes plain request facts and returns a decision."""
