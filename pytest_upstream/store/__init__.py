"""The shared cache on disk: content-addressed blobs, index entries, entry locks, atomic
writes and integrity checks.  Imports only ``config``."""
