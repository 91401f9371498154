"""The example proxy against stub aiohttp backends on loopback."""

import asyncio
import random

import aiohttp
import pytest
from aiohttp import web

from kvroute_proxy import WORKER_HEADER, KvrouteProxy, prompt_tokens


async def start(app):
    """Serves `app` on 127.0.0.1 at a free port; returns (runner, base URL)."""
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    return runner, f"http://{host}:{port}"


def stub_backend(name, seen):
    """A vLLM stand-in that records each prompt and answers with its own name."""

    async def completions(request):
        body = await request.json()
        seen.append((name, body["prompt"]))
        return web.json_response({"object": "text_completion", "model": name, "choices": [{"text": "ok"}]})

    app = web.Application()
    app.router.add_post("/v1/completions", completions)
    return app


async def run_proxy_scenario(prompts):
    """Sends `prompts` one by one through the proxy; returns (answers, seen, proxy, metrics text)."""
    seen = []
    runners = []
    backends = {}
    for name in ("pod-a", "pod-b", "pod-c"):
        runner, url = await start(stub_backend(name, seen))
        runners.append(runner)
        backends[name] = url
    proxy = KvrouteProxy(backends)
    runner, url = await start(proxy.app())
    runners.append(runner)
    answers = []
    try:
        async with aiohttp.ClientSession() as client:
            for p in prompts:
                async with client.post(url + "/v1/completions", json={"model": "m", "prompt": p}) as r:
                    assert r.status == 200
                    body = await r.json()
                    assert body["model"] == r.headers[WORKER_HEADER]
                    answers.append(r.headers[WORKER_HEADER])
            async with client.post(url + "/v1/completions", json={"prompt": {"bad": 1}}) as r:
                assert r.status == 400
            async with client.get(url + "/metrics") as r:
                metrics = await r.text()
    finally:
        for r in reversed(runners):
            await r.cleanup()
    return answers, seen, proxy, metrics


def test_shared_prefixes_land_together():
    rng = random.Random(7)
    groups = [[rng.randrange(50_000) for _ in range(128)] for _ in range(4)]
    rounds = 4
    prompts, labels = [], []
    for _ in range(rounds):
        for g, prefix in enumerate(groups):
            prompts.append(prefix + [rng.randrange(50_000) for _ in range(20)])
            labels.append(g)
    answers, seen, proxy, metrics = asyncio.run(run_proxy_scenario(prompts))
    # Each backend got exactly the requests the proxy says it sent there.
    assert [(a, p) for a, p in zip(answers, prompts)] == seen
    for g in range(len(groups)):
        homes = {a for a, lab in zip(answers, labels) if lab == g}
        assert len(homes) == 1, f"group {g} spread over {homes}"
    m = proxy.router.metrics()
    assert m["routes"] == len(prompts)
    # Every request after a group's first found the group's 8 prefix blocks cached.
    assert m["predicted_hit_tokens"] >= (rounds - 1) * len(groups) * 128
    assert proxy.router.inflight_requests() == 0
    assert "kvroute_routes_total %d" % len(prompts) in metrics


def test_string_prompts_route_on_utf8_bytes():
    base = ["Once upon a time in a land far away " * 6, "Ünïcödé prompts are bytes, too: " * 8]
    prompts = [b + tail for tail in ("one", "two", "three") for b in base]
    answers, _, proxy, _ = asyncio.run(run_proxy_scenario(prompts))
    for b in base:
        assert len({a for a, p in zip(answers, prompts) if p.startswith(b)}) == 1
    assert proxy.router.metrics()["predicted_hit_tokens"] > 0


def test_prompt_tokens():
    assert prompt_tokens([1, 2, 3]) == [1, 2, 3]
    assert prompt_tokens("hé") == b"h\xc3\xa9"
    for bad in [None, ["a"], [True], {"x": 1}]:
        with pytest.raises(ValueError):
            prompt_tokens(bad)
