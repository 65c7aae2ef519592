"""Looking after a cache directory: ls, verify, prune, export/import, and importing vcrpy
cassettes.  Used by the ``cache`` commands of the CLI."""
