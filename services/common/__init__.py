"""Code shared by every service: settings base, errors, health, logging, HTTP clients."""
