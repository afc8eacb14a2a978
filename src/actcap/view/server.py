"""The viewer's HTTP server: a fixed set of static files and a read-only JSON API, on localhost.

Nothing a request names becomes a path: static files come from a fixed allow-list read from the
package at start, runs are chosen by their index, samples by their id looked up in the manifest
(whose paths the storage layer checks to stay inside the run). Only GET and HEAD are answered;
while the server listens on a loopback address, a request naming another host (a DNS-rebinding
page) is refused. Every response carries a content security policy that allows only actcap's own
scripts and styles.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import json
import math
import re
import socket
import sys
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, urlsplit

from actcap.errors import (
    ActcapError,
    FormatError,
    NoActivationsError,
    UnknownNameError,
    ViewError,
)
from actcap.view.aggregate import PROBE_TARGETS, RunStats
from actcap.view.model import ModelHolder
from actcap.view.pair import RunPair
from actcap.view.runs import BadRequest, Query, RunView
from actcap.view.sample import cosine_by_layer, heatmap, lens, sample_detail

STATIC: dict[str, tuple[str, str]] = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/index.html": ("index.html", "text/html; charset=utf-8"),
    "/static/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/static/app.css": ("app.css", "text/css; charset=utf-8"),
    "/static/chart.umd.js": ("chart.umd.js", "text/javascript; charset=utf-8"),
}
"""The only files the server sends: URL path to file name in ``actcap/view/static``."""
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback name or address (only this machine can reach it)."""
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def load_static() -> dict[str, bytes]:
    """The allow-listed static files, read from the package once."""
    folder = resources.files("actcap.view").joinpath("static")
    return {name: folder.joinpath(name).read_bytes() for name, _ in STATIC.values()}


class ViewApp:
    """The runs on show and the answers of the JSON API (no HTTP in here)."""

    def __init__(
        self,
        runs: list[RunView],
        holders: list[ModelHolder | None],
        max_samples: int,
    ) -> None:
        """Serve ``runs`` (one or two); ``holders`` gives each its model (or None)."""
        if not 1 <= len(runs) <= 2:
            raise ViewError(f"actcap view shows one or two runs, not {len(runs)}; pass one or two.")
        self.runs = runs
        self.holders = holders
        self.stats = [RunStats(r, max_samples) for r in runs]
        self.pair = RunPair(runs[0], runs[1]) if len(runs) == 2 else None
        self.routes: dict[str, Callable[[dict[str, str]], dict[str, Any]]] = {
            "/api/runs": self.api_runs,
            "/api/summary": lambda p: self._run(p).summary(),
            "/api/samples": self.api_samples,
            "/api/sample": self.api_sample,
            "/api/heatmap": self.api_heatmap,
            "/api/profile": self.api_profile,
            "/api/lens": self.api_lens,
            "/api/probe": self.api_probe,
            "/api/similarity": self.api_similarity,
            "/api/pair": self.api_pair,
            "/api/compare/summary": lambda p: self._pair().summary(),
            "/api/compare/questions": self.api_compare_questions,
            "/api/compare/question": lambda p: self._pair().question(_text(p, "id")),
            "/api/compare/cosine": lambda p: self._pair().mean_cosine(),
        }

    def start_models(self) -> None:
        """Begin loading the runs' models in the background."""
        for holder in self.holders:
            if holder is not None:
                holder.start()

    def answer(self, path: str, params: dict[str, str]) -> tuple[int, dict[str, Any]]:
        """The status and JSON body for an API path (404 for any other path)."""
        route = self.routes.get(path)
        if route is None:
            return 404, {"error": "not found"}
        try:
            return 200, route(params)
        except BadRequest as e:
            return 400, {"error": str(e)}
        except (UnknownNameError, NoActivationsError) as e:
            return 404, {"error": str(e)}
        except (FormatError, ActcapError) as e:
            return 422, {"error": str(e)}

    def _index(self, params: dict[str, str]) -> int:
        text = params.get("run", "0")
        if not re.fullmatch(r"[0-9]{1,9}", text):
            raise BadRequest(f"parameter 'run' must be a run's index (0 to {len(self.runs) - 1}).")
        if int(text) >= len(self.runs):
            raise UnknownNameError(f"no run {text!r}; runs: 0 to {len(self.runs) - 1}.")
        return int(text)

    def _run(self, params: dict[str, str]) -> RunView:
        return self.runs[self._index(params)]

    def _holder(self, params: dict[str, str]) -> ModelHolder | None:
        return self.holders[self._index(params)]

    def _pair(self) -> RunPair:
        if self.pair is None:
            raise UnknownNameError("only one run is on show; start actcap view with two runs.")
        return self.pair

    def api_runs(self, params: dict[str, str]) -> dict[str, Any]:
        """The runs on show, their models' state, and whether they can be compared."""
        return {
            "runs": [
                {
                    "index": i,
                    "label": r.label,
                    "n_samples": len(r.entries),
                    "model": h.status() if h is not None else None,
                }
                for i, (r, h) in enumerate(zip(self.runs, self.holders, strict=True))
            ],
            "compare": self.pair is not None,
            "max_samples": self.stats[0].max_samples,
        }

    def api_samples(self, params: dict[str, str]) -> dict[str, Any]:
        """One page of the question table."""
        query = Query(
            grade=params.get("grade", "all"),
            category=params.get("category", ""),
            text=params.get("q", ""),
            sort=params.get("sort", "order"),
            descending=params.get("desc", "") in ("1", "true"),
        )
        return self._run(params).page(query, _int(params, "offset", 0), _int(params, "limit", 50))

    def api_sample(self, params: dict[str, str]) -> dict[str, Any]:
        """One question: record, sites, tokens."""
        return sample_detail(self._run(params), _text(params, "id"), self._holder(params))

    def api_heatmap(self, params: dict[str, str]) -> dict[str, Any]:
        """A question's token-by-layer statistic (``stat=norm`` or ``proj`` with ``layer``)."""
        i = self._index(params)
        stat = params.get("stat", "norm")
        direction = None
        if stat == "proj":
            try:
                direction = self.stats[i].direction(_text(params, "layer"))
            except UnknownNameError:
                raise
            except ActcapError as e:
                return {"available": False, "message": str(e)}
        out = heatmap(self.runs[i], _text(params, "id"), stat, direction)
        return {"available": True, **out}

    def api_profile(self, params: dict[str, str]) -> dict[str, Any]:
        """The run's average of the statistic per layer (all, right, wrong answers)."""
        i = self._index(params)
        stat = params.get("stat", "norm")
        if stat not in ("norm", "proj"):
            raise BadRequest(f"stat {stat!r} is unknown; use norm or proj.")
        try:
            profile = self.stats[i].profile(stat, params.get("layer") or None)
        except UnknownNameError:
            raise
        except ActcapError as e:
            return {"available": False, "message": str(e)}
        return {"available": True, **profile}

    def api_lens(self, params: dict[str, str]) -> dict[str, Any]:
        """The logit lens at one token of a question."""
        holder = self._holder(params)
        run = self._run(params)
        sample_id = _text(params, "id")
        token = _int(params, "token", -1, allow_negative=True)
        if holder is None:
            run.entry(sample_id)
            return {
                "available": False,
                "message": "no model: actcap view was started with --no-model.",
            }
        return lens(run, sample_id, token, holder)

    def api_probe(self, params: dict[str, str]) -> dict[str, Any]:
        """Probe accuracy by layer (``target=correct`` or ``category``)."""
        target = params.get("target", "correct")
        if target not in PROBE_TARGETS:
            raise BadRequest(
                f"target {target!r} is unknown; use one of {', '.join(PROBE_TARGETS)}."
            )
        try:
            return self.stats[self._index(params)].probe(target)
        except NoActivationsError as e:
            return {"available": False, "message": str(e)}

    def api_similarity(self, params: dict[str, str]) -> dict[str, Any]:
        """The similarity matrix of the sample at one layer."""
        try:
            return {
                "available": True,
                **self.stats[self._index(params)].similarity(_text(params, "layer")),
            }
        except NoActivationsError as e:
            return {"available": False, "message": str(e)}

    def api_pair(self, params: dict[str, str]) -> dict[str, Any]:
        """Two questions of one run side by side, with their per-layer cosine."""
        run, holder = self._run(params), self._holder(params)
        a, b = _text(params, "a"), _text(params, "b")
        out: dict[str, Any] = {
            "a": sample_detail(run, a, holder),
            "b": sample_detail(run, b, holder),
        }
        try:
            out["cosine"] = cosine_by_layer(run.source(a), run.source(b))
        except FormatError:
            raise
        except ActcapError as e:  # not captured, or no shared site
            out["cosine_message"] = str(e)
        return out

    def api_compare_questions(self, params: dict[str, str]) -> dict[str, Any]:
        """One page of the questions both runs answered."""
        return self._pair().page(
            params.get("agreement", "all"),
            params.get("q", ""),
            _int(params, "offset", 0),
            _int(params, "limit", 50),
        )


def _text(params: dict[str, str], name: str) -> str:
    value = params.get(name)
    if value is None or value == "":
        raise BadRequest(f"parameter {name!r} is missing.")
    return value


def _int(params: dict[str, str], name: str, default: int, allow_negative: bool = False) -> int:
    text = params.get(name)
    if text is None or text == "":
        return default
    if not re.fullmatch(r"-?[0-9]{1,18}", text):  # ASCII digits only: int() takes '٣', ' 3', '1_0'
        raise BadRequest(f"parameter {name!r} must be a whole number, not {text[:40]!r}.")
    value = int(text)
    if value < 0 and not allow_negative:
        raise BadRequest(f"parameter {name!r} must not be negative.")
    return value


class ViewServer(ThreadingHTTPServer):
    """A threading HTTP server holding the app, its static files and the hosts it answers to."""

    daemon_threads = True

    def __init__(self, app: ViewApp, host: str = "127.0.0.1", port: int = 0) -> None:
        """Bind ``host:port`` (port 0: any free port).

        Raises:
            ActcapError: When the port is taken or the address cannot be bound.
        """
        self.app = app
        self.static = load_static()
        if ":" in host:
            self.address_family = socket.AF_INET6
        try:
            super().__init__((host, port), ViewHandler)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise ViewError(
                    f"port {port} on {host} is in use; pass another --port, or --port 0 for any free one."
                ) from e
            raise ViewError(
                f"cannot listen on {host}:{port} ({e.strerror or e}); pass another --host or --port."
            ) from e
        self.host = host
        self.port = int(self.server_address[1])
        self.loopback = is_loopback(host)
        self.allowed_hosts = {f"{name}:{self.port}" for name in ("localhost", "127.0.0.1", "[::1]")}

    @property
    def url(self) -> str:
        """The address to open in a browser."""
        shown = "127.0.0.1" if self.host in ("", "0.0.0.0") else self.host
        shown = f"[{shown}]" if ":" in shown else shown
        return f"http://{shown}:{self.port}/"


class ViewHandler(BaseHTTPRequestHandler):
    """Answers GET and HEAD: a static file of the allow-list, or an API path; nothing else."""

    server: ViewServer
    server_version = "actcap-view"
    sys_version = ""

    def do_GET(self) -> None:  # noqa: N802 - the name http.server calls
        """Answer a GET."""
        self._answer(body=True)

    def do_HEAD(self) -> None:  # noqa: N802
        """Answer a HEAD (headers only)."""
        self._answer(body=False)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's name
        """Quiet: the terminal shows the address, not every request."""

    def _answer(self, body: bool) -> None:
        try:
            self._route(body)
        except Exception as e:  # a bug: one line on the terminal, no traceback to the client
            print(
                f"actcap view: internal error answering {self.path[:200]!r}: "
                f"{type(e).__name__}: {e}",
                file=sys.stderr,
            )
            error = {"error": "internal error; the terminal running actcap view says more."}
            with contextlib.suppress(OSError):  # the client may have gone
                self._send(500, "application/json", _json(error), body)

    def _route(self, body: bool) -> None:
        if not self._host_allowed():
            error = {"error": "this server answers only to localhost."}
            self._send(403, "application/json", _json(error), body)
            return
        split = urlsplit(self.path)
        static = STATIC.get(split.path)
        if static is not None:
            name, kind = static
            self._send(200, kind, self.server.static[name], body)
            return
        params = {k: v[-1] for k, v in parse_qs(split.query, keep_blank_values=True).items()}
        status, data = self.server.app.answer(split.path, params)
        self._send(status, "application/json", _json(data), body)

    def _host_allowed(self) -> bool:
        """On a loopback address, only requests for localhost (a DNS-rebinding page names another)."""
        host = self.headers.get("Host", "").lower()
        return not self.server.loopback or host in self.server.allowed_hosts

    def _send(self, status: int, kind: str, data: bytes, body: bool) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        for name, value in SECURITY_HEADERS.items():
            self.send_header(name, value)
        self.end_headers()
        if body:
            self.wfile.write(data)


def _json(data: Any) -> bytes:
    """JSON that a browser parses: NaN and infinities (possible in a manifest) become null."""
    try:
        text = json.dumps(data, ensure_ascii=False, allow_nan=False, default=str)
    except ValueError:
        text = json.dumps(_finite(data), ensure_ascii=False, allow_nan=False, default=str)
    return text.encode()


def _finite(data: Any) -> Any:
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {k: _finite(v) for k, v in data.items()}
    if isinstance(data, list | tuple):
        return [_finite(v) for v in data]
    return data
