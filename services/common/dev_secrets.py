"""Development secrets for `docker compose`: made once, on the first start, in a volume.

  python -m services.common.dev_secrets /run/secrets-dev

Writes `service_token` and `postgres_password` (random, URL-safe) unless they exist, so
`docker compose up` needs nothing exported and nothing guessable is ever in use;
`docker compose down -v` removes them with the data they protect. Production takes its
secrets from AWS Secrets Manager instead (deploy/README.md).
"""

from __future__ import annotations

import os
import secrets
import sys
from pathlib import Path

NAMES = ("service_token", "postgres_password")


def ensure_secrets(folder: Path) -> list[str]:
    """Create each missing secret file; the names of those created."""
    folder.mkdir(parents=True, exist_ok=True)
    made = []
    for name in NAMES:
        path = folder / name
        if path.exists() and path.read_text().strip():
            continue
        partial = folder / f".{name}.partial"
        partial.write_text(secrets.token_urlsafe(32) + "\n")
        # World-readable inside a volume only the stack's containers mount: the services run
        # as uid 10001 and PostgreSQL as uid 999, and both read them.
        partial.chmod(0o444)
        os.replace(partial, path)
        made.append(name)
    return made


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m services.common.dev_secrets FOLDER", file=sys.stderr)
        return 2
    made = ensure_secrets(Path(argv[0]))
    print(f"development secrets: {', '.join(made) if made else 'kept'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
