"""The HTTP face of the engine: the server ``serve`` and the pytest fixture run."""
