"""preStop drain for vLLM: wait until no request is running or waiting, then let SIGTERM come.

Usage: python3 drain.py <port> <delay_s> <deadline_s>. Waits delay_s first: the chart passes
vllm.preStopDelaySeconds (endpoints drop the pod, so no new connection arrives) plus
gateway.upstreamKeepaliveSeconds (the gateway retires the keep-alive connections it already
had to this pod), so afterwards no new request arrives. Then polls /metrics until
vllm:num_requests_running and vllm:num_requests_waiting are both 0, or deadline_s passes. Standard library only: it runs in
the upstream vLLM image. Always exits 0 (a failed drain must not block the shutdown).
"""

import re
import sys
import time
import urllib.request

_QUEUE = re.compile(r"^vllm:num_requests_(?:running|waiting)(?:\{[^}]*\})?\s+([0-9.eE+-]+)\s*$", re.M)


def in_flight(port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode("utf-8", "replace")
    return sum(float(v) for v in _QUEUE.findall(text))


def main(argv: list[str]) -> int:
    port, delay, deadline = int(argv[0]), float(argv[1]), float(argv[2])
    end = time.monotonic() + deadline
    time.sleep(delay)
    while time.monotonic() < end:
        try:
            busy = in_flight(port)
        except OSError as exc:
            print(f"drain: metrics unreachable ({exc}); stopping now", file=sys.stderr)
            return 0
        if busy == 0:
            print("drain: no requests in flight", file=sys.stderr)
            return 0
        time.sleep(1)
    print("drain: deadline reached with requests still in flight", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
