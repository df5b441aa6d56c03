"""`plora backbone serve` in a process of its own, as the tests that need a real service
process start it, watch it through its output and /metrics, and stop or kill it."""

from __future__ import annotations

import re
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

TINY_ADAPTER = ("--rank", "4", "--device-layers", "1")  # the adapter the tiny-model tests use


class ServeProcess:
    """Started at once; `wait_until_listening` waits for it to serve. Its output goes to `log`."""

    def __init__(self, backbone: str | Path, log: Path, *options: str, port: int = 0):
        args = ["plora", "backbone", "serve", "--backbone", str(backbone), "--insecure", "--port", str(port),
                "--http-port", "0", *options]
        self.log = log
        with log.open("w") as sink:
            self.process = subprocess.Popen(args, stdout=sink, stderr=subprocess.STDOUT)

    def wait_until_listening(self, timeout_s: float = 300) -> ServeProcess:
        deadline = time.monotonic() + timeout_s
        while not (found := re.search(r"listening on [^\s:]+:(\d+) .*metrics on :(\d+)", self.log.read_text())):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"`plora backbone serve` did not start:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.1)
        self.port, self.http_port = int(found[1]), int(found[2])
        return self

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def metrics(self) -> dict[str, float]:
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/metrics", timeout=10).read().decode()
        return {name: float(value) for name, value in re.findall(r"^(plora_\S+) (\S+)$", text, re.M)}

    def idle(self) -> bool:
        """No session open and no byte held."""
        figures = self.metrics()
        held = [v for k, v in figures.items() if k.startswith("plora_accounted_bytes")]
        return len(held) == 3 and not any(held) and figures.get("plora_active_sessions") == 0

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()
