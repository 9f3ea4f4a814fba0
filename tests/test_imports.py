"""What a worker loads: httpx (the test seam) and the Redis client (a Redis limits storage) only when used."""

from __future__ import annotations

import subprocess
import sys


def test_the_app_loads_without_httpx_or_redis() -> None:
    probe = "import sys, gateway.app; print(sorted({'httpx', 'redis', 'aiohttp'} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
