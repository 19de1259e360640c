"""schemathesis against /api/v1/openapi.json of a real ``c2c-gateway serve``: never a 5xx.

Every documented operation gets bounded positive and negative examples (derandomized, no
example database), sent over TLS with a token holding every scope.
"""

from __future__ import annotations

import collections
import json
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from outbound_env import gateway_config, token
from schemathesis import Case, GenerationMode

from gateway.config import GatewayConfig

EXAMPLES_PER_MODE = 25
# Every attempt to the (absent) partner fails at once, so a fuzzed query ends quickly.
OUTBOX = "\n[outbox]\nmax_attempts = 1\nbase_delay_s = 0.1\nmax_delay_s = 0.2\n"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[GatewayConfig, str]]:
    root = tmp_path_factory.mktemp("fuzz")
    config = gateway_config(root, "US-CBP", peers={"MX-ANAM": "https://127.0.0.1:9"})
    with config.source.open("a", encoding="utf-8") as handle:
        handle.write(OUTBOX)
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "c2c-gateway"), "serve", "--config", str(config.source)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    assert proc.stderr is not None
    drain: threading.Thread | None = None
    try:
        api_url = None
        for line in proc.stderr:
            if line.startswith(b"{") and json.loads(line).get("event") == "serving":
                api_url = json.loads(line)["api_url"]
                break
        assert api_url is not None, "serve exited before it was ready"
        # read the log on: a pipe nobody reads fills (one api_access line per request), and
        # serve then blocks on its next log line, every answer with it
        drain = threading.Thread(target=collections.deque, args=(proc.stderr, 0), daemon=True)
        drain.start()
        yield config, api_url
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        if drain is not None:
            drain.join(timeout=10)  # the pipe's end: serve has exited
        proc.stderr.close()


def test_no_operation_answers_5xx(served: tuple[GatewayConfig, str]) -> None:
    config, api_url = served
    document = requests.get(f"{api_url}/api/v1/openapi.json", verify=str(config.tls.ca), timeout=10)
    schema = schemathesis.openapi.from_dict(document.json())
    headers = {"Authorization": f"Bearer {token(config, ttl_s=3600)}"}
    session = requests.Session()
    session.verify = str(config.tls.ca)
    failures: list[str] = []
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) == len(document.json()["paths"]) + 1  # /api/v1/messages has two

    for operation in operations:
        spec = document.json()["paths"][operation.path][operation.method.lower()]
        # Nothing to make invalid in an operation without parameters or body.
        takes_input = "parameters" in spec or "requestBody" in spec
        modes = [GenerationMode.POSITIVE] + ([GenerationMode.NEGATIVE] if takes_input else [])
        for mode in modes:

            @settings(
                max_examples=EXAMPLES_PER_MODE,
                deadline=None,
                derandomize=True,
                database=None,
                suppress_health_check=list(HealthCheck),
            )
            @given(case=operation.as_strategy(generation_mode=mode))
            def check(case: Case) -> None:
                response = case.call(
                    base_url=api_url,
                    session=session,
                    headers=headers,
                    timeout=30,
                    verify=str(config.tls.ca),
                )
                if response.status_code >= 500:
                    failures.append(f"{case.method} {case.formatted_path}: {response.status_code}")
                assert response.status_code < 500, response.text

            check()
    assert failures == []
