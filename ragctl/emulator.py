"""The local Cognito emulator in a container (`docker compose`): moto's server with a user
pool, an app client and the dev user, made again the same at every start.

  python -m ragctl.emulator serve   # the container's command
  python -m ragctl.emulator check   # its healthcheck: the pool's JWKS is served
  python -m ragctl.emulator token   # print an access token for the dev user
  python -m ragctl.emulator token --user eval@example.com   # another user's (made if new)

The pool and client ids are derived from their names and the dev user's `sub` from a seed
kept in the state folder, so a restarted emulator gives the gateway the same issuer, keys
and client, and the dev user the same tenant (their documents survive `down` then `up`).
The gateway reads the pool from the file written here (GATEWAY_COGNITO_POOL_FILE).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import sys
import threading
import urllib.request
from pathlib import Path
from typing import Any

from ragctl.cognito import DEV_USER, EMULATOR_ENV, LocalPool, create_dev_user

HOST = os.environ.get("COGNITO_HOST", "0.0.0.0")
PORT = int(os.environ.get("COGNITO_PORT", "8009"))
# Where the other containers reach the emulator (the JWKS URL the gateway fetches).
PUBLIC_URL = os.environ.get("COGNITO_PUBLIC_URL", f"http://cognito:{PORT}")
STATE_DIR = Path(os.environ.get("COGNITO_STATE_DIR", "/var/lib/cognito"))
POOL_FILE = Path(os.environ.get("COGNITO_POOL_FILE", "/run/cognito/pool.json"))
LOCAL_URL = f"http://127.0.0.1:{PORT}"


DEV_USER_FILE = STATE_DIR / "dev-user.json"


def _read_dev_user_state() -> dict[str, Any]:
    try:
        state: dict[str, Any] = json.loads(DEV_USER_FILE.read_text())
    except (OSError, ValueError) as exc:
        raise SystemExit(f"no dev user yet ({DEV_USER_FILE}): is the emulator running?") from exc
    return state


def _dev_user_state() -> dict[str, Any]:
    """The dev user's password and sub seed: made on first start, kept in the state folder
    (owner-only: it holds the password)."""
    path = DEV_USER_FILE
    if path.exists():
        return _read_dev_user_state()
    state = {
        "username": DEV_USER,
        "password": f"Pw-{secrets.token_urlsafe(16)}1!",
        "seed": secrets.randbelow(2**31),
    }
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(state))
    partial.chmod(0o600)
    partial.replace(path)
    return state


def _write_pool_file(pool: LocalPool) -> None:
    """issuer, jwks_url and client_id for the gateway, written whole (rename into place)."""
    public = LocalPool(endpoint=PUBLIC_URL, pool_id=pool.pool_id, client_id=pool.client_id)
    document = {
        "issuer": public.issuer,
        "jwks_url": public.jwks_url,
        "client_id": public.client_id,
        "pool_id": public.pool_id,
    }
    POOL_FILE.parent.mkdir(parents=True, exist_ok=True)
    partial = POOL_FILE.with_suffix(".partial")
    partial.write_text(json.dumps(document, indent=2))
    partial.chmod(0o644)  # no secret in it
    partial.replace(POOL_FILE)


def serve() -> None:
    os.environ.update(EMULATOR_ENV)  # read by moto when it makes ids
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address=HOST, port=PORT, verbose=False)
    server.start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        state = _dev_user_state()
        pool = LocalPool.create(LOCAL_URL)
        create_dev_user(pool, state["username"], state["password"], seed=state["seed"])
        _write_pool_file(pool)
        print(f"cognito emulator ready: pool {pool.pool_id}, dev user {DEV_USER}", flush=True)
        stop.wait()
    finally:
        server.stop()


def check() -> int:
    """0 when the pool exists and its keys are served."""
    try:
        pool = json.loads(POOL_FILE.read_text())
        url = f"{LOCAL_URL}/{pool['pool_id']}/.well-known/jwks.json"
        with urllib.request.urlopen(url, timeout=3) as resp:
            return 0 if resp.status == 200 and json.load(resp).get("keys") else 1
    except (OSError, ValueError, KeyError):
        return 1


def token(user: str | None = None) -> None:
    """Print the dev user's access token (reads the state `serve` made, never makes it), or
    that of another user of the pool, made on first use (a tenant of its own, e.g. for
    `ragctl eval retrieval`; the emulator forgets it at its next start)."""
    pool_doc = json.loads(POOL_FILE.read_text())
    pool = LocalPool(
        endpoint=LOCAL_URL, pool_id=pool_doc["pool_id"], client_id=pool_doc["client_id"]
    )
    if user is not None and user != DEV_USER:
        print(pool.user_token(user))
        return
    state = _read_dev_user_state()
    print(pool.access_token(state["username"], state["password"]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ragctl.emulator", description=__doc__)
    parser.add_argument("command", choices=("serve", "check", "token"))
    parser.add_argument("--user", help="token: this user's instead of the dev user's")
    args = parser.parse_args(argv)
    if args.command == "serve":
        serve()
        return 0
    if args.command == "check":
        return check()
    token(args.user)
    return 0


if __name__ == "__main__":
    sys.exit(main())
