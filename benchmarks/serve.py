"""`kiln serve` under load: K concurrent streaming clients, some cancelled mid-stream.

    python benchmarks/serve.py                  # the demo model, 32 clients, 2,000 requests
    python benchmarks/serve.py MODEL --clients 8 --requests 200 --cancel 0.2 --parallel 8
    python benchmarks/serve.py --quick          # 4 clients, 24 requests: for the CPU

Starts the server in this process on a free loopback port, then K client threads each send streaming chat
requests (raw HTTP + server-sent events) until the request budget is spent; a share of them (--cancel) close
the connection after their first few tokens. Prints aggregate generated tokens/s, time to first token and
inter-token latency (p50 / p99), the cancelled count the server reports in /metrics, and the process RSS at
the start and at the end.
"""

from __future__ import annotations

import argparse
import http.client
import itertools
import json
import random
import resource
import socket
import statistics
import sys
import threading
import time


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def _rss_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _client(port: int, jobs: list, lock: threading.Lock, results: dict, cancel_share: float, max_tokens: int,
            seed: int) -> None:
    rng = random.Random(seed)
    while True:
        with lock:
            if not jobs:
                return
            prompt = jobs.pop()
        cancel = rng.random() < cancel_share
        body = json.dumps({"model": "bench", "messages": [{"role": "user", "content": prompt}], "stream": True,
                           "max_tokens": max_tokens, "temperature": 0.8, "seed": rng.randrange(1 << 30)})
        started = time.perf_counter()
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        connection.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        stamps = []
        for line in response:
            if line.startswith(b"data: {") and b'"content": "' in line and b'"content": ""' not in line:
                stamps.append(time.perf_counter())
                if cancel and len(stamps) >= 3:
                    break
        response.close()
        connection.close()
        with lock:
            if stamps:
                results["ttft"].append(stamps[0] - started)
                results["itl"] += [b - a for a, b in itertools.pairwise(stamps)]
            results["pieces"] += len(stamps)


def run(model: str | None, clients: int, requests: int, cancel_share: float, max_tokens: int,
        parallel: int = 1) -> dict:
    """Serve `model`, drive it with `clients` streaming clients for `requests` requests, return the figures."""
    import uvicorn

    from kilnlm import Engine
    from kilnlm.runtime.engine import demo_model_path
    from kilnlm.runtime.server import ServerSettings, create_app

    engine = Engine.load(model or demo_model_path(), progress=False, parallel=parallel)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    settings = ServerSettings(port=port, queue_cap=clients + 1, max_tokens_cap=max_tokens, model_name="bench")
    server = uvicorn.Server(uvicorn.Config(create_app(engine, settings), host="127.0.0.1", port=port,
                                           log_level="error"))
    server_thread = threading.Thread(target=server.run, daemon=True)
    server_thread.start()
    while not server.started:
        time.sleep(0.05)
    rss_start = _rss_mib()
    prompts = ["Speak, good ROMEO.", "What news, JULIET?", "Tell me of the king.", "Who goes there?"]
    jobs = [prompts[i % len(prompts)] for i in range(requests)]
    lock, results = threading.Lock(), {"ttft": [], "itl": [], "pieces": 0}
    started = time.perf_counter()
    threads = [threading.Thread(target=_client, args=(port, jobs, lock, results, cancel_share, max_tokens, i))
               for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    connection = http.client.HTTPConnection("127.0.0.1", port)
    connection.request("GET", "/metrics")
    metrics = dict(line.split() for line in connection.getresponse().read().decode().splitlines()
                   if not line.startswith("#"))
    server.should_exit = True
    server_thread.join(timeout=30)
    engine.close()  # every generation ended before the interpreter exits (torch aborts on threads still in it)
    generated = int(metrics["kilnlm_generated_tokens_total"])
    return {"clients": clients, "requests": requests, "parallel": parallel, "seconds": elapsed,
            "generated_tokens_per_s": generated / elapsed, "generated_tokens": generated,
            "cancelled": int(metrics["kilnlm_requests_cancelled_total"]),
            "ttft_p50_s": _percentile(results["ttft"], 0.5), "ttft_p99_s": _percentile(results["ttft"], 0.99),
            "itl_p50_s": _percentile(results["itl"], 0.5), "itl_p99_s": _percentile(results["itl"], 0.99),
            "itl_mean_s": statistics.fmean(results["itl"]) if results["itl"] else float("nan"),
            "rss_start_mib": rss_start, "rss_end_mib": _rss_mib()}


def main() -> None:
    """Parse the options, run, print the figures (or JSON)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n\n")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", default=None, help="model to serve (default: the demo model)")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--cancel", type=float, default=0.1, help="share of requests cancelled mid-stream")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--parallel", type=int, default=1, help="sequences the engine decodes in one batch")
    parser.add_argument("--quick", action="store_true", help="4 clients, 24 requests, 32 tokens")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.clients, args.requests, args.max_tokens = 4, 24, 32
    result = run(args.model, args.clients, args.requests, args.cancel, args.max_tokens, args.parallel)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{result['requests']} requests from {result['clients']} clients (parallel {result['parallel']}) in "
          f"{result['seconds']:.1f}s: "
          f"{result['generated_tokens_per_s']:.1f} generated tokens/s ({result['cancelled']} cancelled)")
    print(f"time to first token p50 {result['ttft_p50_s'] * 1e3:.0f} ms, p99 {result['ttft_p99_s'] * 1e3:.0f} ms; "
          f"inter-token p50 {result['itl_p50_s'] * 1e3:.1f} ms, p99 {result['itl_p99_s'] * 1e3:.1f} ms")
    print(f"RSS {result['rss_start_mib']:.0f} MiB at the start, {result['rss_end_mib']:.0f} MiB at the end",
          file=sys.stdout)


if __name__ == "__main__":
    main()
