"""The pytest faces: options, hooks, fixtures and the ``UpstreamProxy`` harness object."""
