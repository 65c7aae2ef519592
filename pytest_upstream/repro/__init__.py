"""Reproducible builds: the lock file, the served records, the session report and the
network guard.  Below the engine, which records into them and replays from the lock file."""
