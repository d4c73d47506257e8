"""ragctl: `up` runs the platform locally; `token`, `ingest` and `ask` talk to it; `eval
retrieval` measures search quality on a BEIR folder; `bench` load-tests it."""

from __future__ import annotations

import argparse
import json
import mimetypes
import os
import signal
import sys
import time
from importlib import resources
from pathlib import Path
from typing import Any

import httpx

from ragctl.cognito import LocalPool

DEFAULT_HOME = ".data"
SUPERVISE_EVERY_S = 0.5  # how often `ragctl up` checks on its processes


def _home(args: argparse.Namespace) -> Path:
    return Path(args.home or os.environ.get("RAGCTL_HOME") or DEFAULT_HOME)


def _state(home: Path) -> dict[str, Any]:
    path = home / "stack.json"
    if not path.exists():
        raise SystemExit(
            f"no running stack found ({path} is missing): start one with `make up` "
            "(or `ragctl up`), or set RAGCTL_HOME to its folder"
        )
    state: dict[str, Any] = json.loads(path.read_text())
    return state


def _token(state: dict[str, Any]) -> str:
    pool = LocalPool(**state["cognito"])
    return pool.access_token(state["username"], state["password"])


def _fail(resp: httpx.Response) -> None:
    try:
        message = resp.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = resp.text[:200]
    raise SystemExit(f"error {resp.status_code}: {message}")


def upload(client: httpx.Client, path: Path) -> dict[str, Any]:
    # The retriever goes by the extension first, then this type.
    media = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    with path.open("rb") as fh:
        resp = client.post(
            "/v1/documents",
            files={"file": (path.name, fh, media)},
            data={"title": path.stem.replace("-", " ")},
        )
    if resp.status_code not in (200, 202):
        _fail(resp)
    return dict(resp.json())


def wait_ready(client: httpx.Client, doc_id: str, timeout_s: float = 120.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        resp = client.get(f"/v1/documents/{doc_id}")
        if resp.status_code != 200:
            _fail(resp)
        doc = dict(resp.json())
        if doc["status"] in ("ready", "failed") or time.monotonic() > deadline:
            return doc
        time.sleep(0.3)


def ingest_paths(
    client: httpx.Client, paths: list[Path], wait: bool = True
) -> list[dict[str, Any]]:
    docs = []
    for path in paths:
        if not path.is_file():
            raise SystemExit(f"not a file: {path}")
        doc = upload(client, path)
        if wait:
            doc = {**wait_ready(client, doc["id"]), "duplicate": doc.get("duplicate", False)}
        note = " (already there)" if doc.get("duplicate") else ""
        error = f": {doc['error']}" if doc.get("error") else ""
        print(f"  {doc['status']:<10} {doc['id']}  {doc['title']}{note}{error}")
        docs.append(doc)
    return docs


def _client(state: dict[str, Any]) -> httpx.Client:
    return httpx.Client(
        base_url=state["gateway_url"],
        timeout=300.0,
        headers={"Authorization": f"Bearer {_token(state)}"},
    )


def sample_paths() -> list[Path]:
    folder = resources.files("ragctl") / "samples"
    return sorted(Path(str(p)) for p in folder.iterdir() if p.name.endswith(".md"))


def cmd_up(args: argparse.Namespace) -> int:
    from ragctl.stack import Ports, Stack, StackError

    home = _home(args)
    stack = Stack(home=home, ports=Ports.free() if args.free_ports else Ports())
    stopping = supervising = False

    def _stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        if stopping:  # asked twice: a restart is stuck; stop now
            raise KeyboardInterrupt
        stopping = True
        if not supervising:  # starting: interrupt it; supervising: end after this round
            raise KeyboardInterrupt

    # Both set explicitly: a shell that starts ragctl in the background (or CI) may have
    # left SIGINT ignored, and Python then installs no KeyboardInterrupt handler of its own.
    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    print(f"starting the stack (state and logs in {home}/) ...", flush=True)
    started = time.monotonic()
    try:
        stack.start()
        state = _state(home)
        print(f"ready in {time.monotonic() - started:.1f}s", flush=True)
        if not args.no_samples:
            print("ingesting the bundled sample documents:", flush=True)
            with _client(state) as client:
                ingest_paths(client, sample_paths())
        gw = stack.url("gateway")
        print(
            f"""
  gateway    {gw}   (public API, OpenAPI docs at {gw}/docs)
  retriever  {stack.url("retriever")}
  embedder   {stack.url("embedder")}
  generator  {stack.url("generator")}
  cognito    {stack.url("cognito")}   (local Cognito emulator)
  logs       {stack.log_dir}/

Try it (in another terminal, from this folder):
  .venv/bin/ragctl ask "When is the diesel generator tested at Zephyr Station?"
  TOKEN=$(.venv/bin/ragctl token)
  curl -s {gw}/v1/documents -H "Authorization: Bearer $TOKEN"

A service that dies is restarted, with backoff.
Press Ctrl-C to stop everything.""",
            flush=True,
        )
        # A restart is not interrupted halfway (it could leave a process nobody stops).
        supervising = True
        while not stopping:
            stack.supervise(lambda message: print(message, flush=True))
            time.sleep(SUPERVISE_EVERY_S)
        print("\nstopping ...", flush=True)
        return 0
    except KeyboardInterrupt:
        print("\nstopping ...", flush=True)
        return 0
    except StackError as exc:
        print(f"the stack failed to start: {exc}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        stack.stop()
        print("stopped.", flush=True)


def cmd_token(args: argparse.Namespace) -> int:
    print(_token(_state(_home(args))))
    return 0


def cmd_ingest(args: argparse.Namespace) -> int:
    with _client(_state(_home(args))) as client:
        docs = ingest_paths(client, [Path(p) for p in args.paths], wait=not args.no_wait)
    return 0 if all(d["status"] != "failed" for d in docs) else 1


def cmd_ask(args: argparse.Namespace) -> int:
    body = {
        "messages": [{"role": "user", "content": args.question}],
        "stream": True,
        "max_tokens": args.max_tokens,
        "temperature": 0,
        "retrieval": {"k": args.k},
    }
    citations: list[dict[str, Any]] = []
    with (
        _client(_state(_home(args))) as client,
        client.stream("POST", "/v1/chat/completions", json=body) as resp,
    ):
        if resp.status_code != 200:
            resp.read()
            _fail(resp)
        for line in resp.iter_lines():
            if not line.startswith("data:") or line.strip() == "data: [DONE]":
                continue
            event = json.loads(line[5:])
            for choice in event.get("choices", []):
                print(choice.get("delta", {}).get("content") or "", end="", flush=True)
            citations = event.get("citations", citations)
    print("\n\nSources:")
    for cite in citations:
        where = cite.get("position", {}).get("heading")
        print(
            f"  [{cite['index']}] {cite['title']}"
            + (f" > {where}" if where else "")
            + f"  (score {cite['score']:.3f})"
        )
    if not citations:
        print("  (none: no document matched)")
    return 0


def cmd_eval_retrieval(args: argparse.Namespace) -> int:
    from ragctl.evaluation import MODES, EvalConfig, EvalError, format_table, run_evaluation

    modes = [mode.strip() for mode in args.modes.split(",") if mode.strip()]
    config = EvalConfig(
        data=Path(args.data),
        split=args.split,
        modes=modes or MODES,
        max_queries=args.max_queries,
        url=args.url,
        token=args.token,
        tag=args.tag,
        reuse=args.reuse,
        references=args.references,
        save_runs=args.save_runs,
        filtered=args.filter,
        batch_size=args.batch_size,
        show_progress=not args.no_progress,
    )
    try:
        report = run_evaluation(config)
    except EvalError as exc:
        print(f"evaluation failed: {exc}", file=sys.stderr)
        return 1
    output = Path(args.output or f"retrieval-eval-{report['dataset']}-{args.split}.json")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=1))
    print(format_table(report))
    print(f"\nreport: {output}")
    return 0


def add_eval_parser(sub: Any) -> None:
    """`ragctl eval retrieval`."""
    from ragctl.evaluation import BATCH_DOCUMENTS, MODES

    evaluate = sub.add_parser("eval", help="measure the platform")
    what = evaluate.add_subparsers(dest="what", required=True)
    retrieval = what.add_parser(
        "retrieval",
        help="search quality (nDCG@10, recall@100, MRR@10, latency) on a BEIR folder",
        description="Load a BEIR-format corpus through the public API, run every judged query "
        "of the split through POST /v1/search in each mode, and report nDCG@10, recall@100, "
        "MRR@10 and latency p50/p95 per mode, beside in-process BM25 and exact MiniLM "
        "references. Starts its own local stack unless --url is given.",
    )
    retrieval.add_argument("--data", required=True, help="BEIR folder (corpus.jsonl, ...)")
    retrieval.add_argument("--split", default="test", help="qrels/<split>.tsv (default: test)")
    retrieval.add_argument(
        "--modes", default=",".join(MODES), help="comma-separated (default: %(default)s)"
    )
    retrieval.add_argument(
        "--max-queries", type=int, help="only the first N judged queries (in file order)"
    )
    retrieval.add_argument(
        "--url", help="a running gateway instead of a local stack started for the run"
    )
    retrieval.add_argument("--token", help="with --url: an access token of the user to load")
    retrieval.add_argument(
        "--tag", help="the documents' `eval` metadata (default: the folder's name)"
    )
    retrieval.add_argument(
        "--reuse",
        action="store_true",
        help="skip loading when every document of the tag is ready already",
    )
    retrieval.add_argument(
        "--references",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also rank in-process: BM25 (bm25s) and exact cosine over MiniLM",
    )
    retrieval.add_argument(
        "--save-runs",
        action="store_true",
        help="keep each query's ranked documents and scores, per mode, in the JSON",
    )
    retrieval.add_argument(
        "--filter", action="store_true", help="search only the tag's documents (a filter)"
    )
    retrieval.add_argument(
        "--batch-size", type=int, default=BATCH_DOCUMENTS, help="documents per upload request"
    )
    retrieval.add_argument(
        "--output", help="the JSON report (default: retrieval-eval-<dataset>-<split>.json)"
    )
    retrieval.add_argument("--no-progress", action="store_true", help="no progress bars")
    retrieval.set_defaults(func=cmd_eval_retrieval)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ragctl", description=__doc__)
    parser.add_argument(
        "--home", help=f"state folder of the local stack (default: $RAGCTL_HOME or {DEFAULT_HOME})"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start the emulator, database and all services; Ctrl-C stops")
    up.add_argument("--no-samples", action="store_true", help="do not ingest the sample documents")
    up.add_argument(
        "--free-ports", action="store_true", help="use free ports instead of 8000-8003 and 8009"
    )
    up.set_defaults(func=cmd_up)
    sub.add_parser("token", help="print an access token for the local dev user").set_defaults(
        func=cmd_token
    )
    ingest = sub.add_parser(
        "ingest", help="upload documents (PDF, DOCX, HTML, Markdown, text) and wait until ready"
    )
    ingest.add_argument("paths", nargs="+")
    ingest.add_argument("--no-wait", action="store_true")
    ingest.set_defaults(func=cmd_ingest)
    ask = sub.add_parser("ask", help="ask a question; streams the answer, then the sources")
    ask.add_argument("question")
    ask.add_argument("--k", type=int, default=4, help="passages to retrieve")
    ask.add_argument("--max-tokens", type=int, default=200)
    ask.set_defaults(func=cmd_ask)
    add_eval_parser(sub)
    from ragctl.bench import add_bench_parser

    add_bench_parser(sub)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
