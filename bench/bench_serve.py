"""Serving throughput: 8 concurrent clients vs 1 client, transformers path on CPU.

    .venv/bin/python bench/bench_serve.py --model smollm2-135m --rounds 2 --clients 8 --max-tokens 48

Starts `tunelab serve` in a subprocess on 127.0.0.1, then sends the same prompts with the official
openai client, in rounds of (8 requests one at a time, then the same 8 from 8 concurrent clients);
reports completion tokens per second of each phase (greedy, so both phases generate the same tokens).
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--rounds", type=int, default=2, help="rounds of (one client, then N concurrent clients)")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--out", default="bench/results/serve.json")
    args = ap.parse_args()
    from openai import OpenAI

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "tunelab", "serve", args.model, "--port", str(port), "--name", "m",
                             "--max-batch", str(args.clients)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(600):
            try:
                urllib.request.urlopen(url + "/health", timeout=1)
                break
            except OSError:
                time.sleep(0.5)
        client = OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=600)
        topics = ["the ocean", "a robot", "autumn", "coffee", "a city at night", "mountains", "friendship", "rain"]
        prompts = [f"Write a short paragraph about {topics[i % len(topics)]} ({i})." for i in range(args.rounds * args.clients)]

        def one(p):
            r = client.chat.completions.create(model="m", messages=[{"role": "user", "content": p}],
                                               max_tokens=args.max_tokens, temperature=0)
            return r.usage.completion_tokens, r.choices[0].message.content

        one(prompts[0])  # warm-up
        # Alternate the two phases in rounds so a busy machine slows both alike.
        seq, par, t_seq, t_par = [], [], 0.0, 0.0
        for r in range(args.rounds):
            chunk = prompts[r * args.clients:(r + 1) * args.clients]
            t0 = time.perf_counter()
            seq += [one(p) for p in chunk]
            t_seq += time.perf_counter() - t0
            t0 = time.perf_counter()
            with ThreadPoolExecutor(args.clients) as pool:
                par += list(pool.map(one, chunk))
            t_par += time.perf_counter() - t0
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    tok_seq, tok_par = sum(n for n, _ in seq), sum(n for n, _ in par)
    same = sum(a[1] == b[1] for a, b in zip(seq, par))
    res = {"model": args.model, "requests": len(prompts), "rounds": args.rounds, "max_tokens": args.max_tokens, "clients": args.clients,
           "one_client_tok_per_s": round(tok_seq / t_seq, 2), "one_client_seconds": round(t_seq, 2),
           "concurrent_tok_per_s": round(tok_par / t_par, 2), "concurrent_seconds": round(t_par, 2),
           "speedup": round((tok_par / t_par) / (tok_seq / t_seq), 2), "identical_outputs": f"{same}/{len(prompts)}",
           "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                    cwd=ROOT).stdout.strip(), "date": time.strftime("%Y-%m-%d")}
    print(f"{'phase':<24}{'seconds':>10}{'tokens':>10}{'tok/s':>10}")
    print(f"{'1 client':<24}{t_seq:>10.1f}{tok_seq:>10}{res['one_client_tok_per_s']:>10.1f}")
    print(f"{str(args.clients) + ' concurrent clients':<24}{t_par:>10.1f}{tok_par:>10}{res['concurrent_tok_per_s']:>10.1f}")
    print(f"speedup {res['speedup']}x; identical greedy outputs {res['identical_outputs']}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
