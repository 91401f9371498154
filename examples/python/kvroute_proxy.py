"""An OpenAI-compatible reverse proxy that routes /v1/completions with kvroute.

Each request goes to the vLLM backend whose KV cache most likely holds its prompt's
prefix. The proxy reports the request's life to the router: ``on_routed`` when it is
forwarded, ``on_first_token`` when the first bytes of the answer arrive, ``on_finished``
when it is done (or failed), so the router tracks each backend's load and, in
approximate mode, predicts what each backend's cache holds.

Token ids: the proxy has no tokenizer. A prompt given as token ids (``"prompt": [1, 2,
3]``) is routed on those ids. A string prompt is routed on its UTF-8 bytes as a
tokenizer-free stand-in: two prompts sharing a prefix of N bytes share their first
N // block_size blocks, which is what prefix routing needs in approximate mode. Those
byte keys can never match what vLLM announces in its KV events: for precise mode, either
pass the model's real token ids (tokenize as vLLM does: completions with special tokens,
chat templates rendered then encoded without them) or run ``kvroute serve`` (see
docs/serve.md), which tokenizes exactly as vLLM does and is the production front end.

Run::

    python kvroute_proxy.py --listen 127.0.0.1:8000 \\
        --backend pod-a=http://10.0.0.7:8000 --backend pod-b=http://10.0.0.8:8000

The default router configuration is approximate mode (no KV events needed); pass
``--config`` with a RouterConfig JSON for anything else.
"""

from __future__ import annotations

import argparse
import json
from typing import Any, Dict, List, Mapping, Optional, Union

import aiohttp
import kvroute
from aiohttp import web

#: The configuration used when none is given: the ``kvroute`` preset (the default: the
#: lowest predicted time to first token), with the cache model predicting each backend's
#: cache from the routed requests themselves (approximate mode, no KV events needed).
DEFAULT_CONFIG: Dict[str, Any] = {"mode": "approximate", "profile": "kvroute"}

#: Response header naming the backend that served the request.
WORKER_HEADER = "x-kvroute-worker"


def prompt_tokens(prompt: Any) -> Union[List[int], bytes]:
    """The ids to route a completion prompt on: its token ids, or a string's UTF-8 bytes.

    Raises ``ValueError`` for prompts of another shape (batches of prompts are not routed
    as one request).
    """
    if isinstance(prompt, str):
        return prompt.encode("utf-8")
    if isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return prompt
    raise ValueError("prompt must be a string or a list of token ids")


class KvrouteProxy:
    """The proxy: a kvroute Router and a name -> base URL map of backends."""

    def __init__(self, backends: Mapping[str, str], config: Optional[Mapping[str, Any]] = None) -> None:
        cfg = dict(DEFAULT_CONFIG if config is None else config)
        cfg.setdefault("workers", [{"name": name} for name in backends])
        self.router = kvroute.Router(cfg)
        self.backends = {name: url.rstrip("/") for name, url in backends.items()}
        self._session: Optional[aiohttp.ClientSession] = None

    def app(self) -> web.Application:
        """The aiohttp application."""
        app = web.Application()
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_get("/metrics", self.metrics)
        app.on_startup.append(self._start)
        app.on_cleanup.append(self._stop)
        return app

    async def _start(self, _app: web.Application) -> None:
        self._session = aiohttp.ClientSession()

    async def _stop(self, _app: web.Application) -> None:
        if self._session is not None:
            await self._session.close()

    async def metrics(self, _request: web.Request) -> web.Response:
        """The router's Prometheus metrics."""
        return web.Response(text=self.router.prometheus(), content_type="text/plain")

    async def completions(self, request: web.Request) -> web.StreamResponse:
        """Routes one completion request and relays the backend's answer."""
        try:
            body = await request.json()
            tokens = prompt_tokens(body.get("prompt"))
        except (ValueError, AttributeError) as e:
            return web.json_response({"error": {"message": str(e), "type": "invalid_request_error"}}, status=400)
        try:
            decision = self.router.route(tokens, session=body.get("user"))
        except kvroute.NoWorkersError as e:
            return web.json_response({"error": {"message": str(e), "type": "unavailable"}}, status=503)
        url = self.backends[decision.worker] + "/v1/completions"
        self.router.on_routed(decision)
        assert self._session is not None
        try:
            async with self._session.post(url, json=body) as upstream:
                out = web.StreamResponse(status=upstream.status)
                out.content_type = upstream.content_type
                out.headers[WORKER_HEADER] = decision.worker
                await out.prepare(request)
                first = True
                async for chunk in upstream.content.iter_any():
                    if first:
                        self.router.on_first_token(decision.request_id)
                        first = False
                    await out.write(chunk)
                await out.write_eof()
                return out
        except aiohttp.ClientError as e:
            return web.json_response({"error": {"message": f"backend {decision.worker}: {e}"}}, status=502)
        finally:
            self.router.on_finished(decision.request_id)


def main(argv: Optional[List[str]] = None) -> None:
    """Command line entry point."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--listen", default="127.0.0.1:8000", help="host:port to serve on")
    ap.add_argument("--backend", action="append", required=True, help="NAME=URL of a vLLM server (repeat)")
    ap.add_argument("--config", help="a kvroute RouterConfig as JSON (default: approximate mode)")
    args = ap.parse_args(argv)
    backends = dict(b.split("=", 1) for b in args.backend)
    config = json.loads(args.config) if args.config else None
    host, port = args.listen.rsplit(":", 1)
    web.run_app(KvrouteProxy(backends, config).app(), host=host, port=int(port))


if __name__ == "__main__":
    main()
