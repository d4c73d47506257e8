"""ragctl: run the platform locally and talk to it."""
