"""The ``krules`` command line, run as a real process: one-line errors, run/emit/show, SIGTERM."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from krules.testing.redis_server import LocalRedisServer

pytestmark = pytest.mark.slow

RULES = '''
"""A rule module written by a user, served by `krules run` in these tests."""
from krules import on


@on("order.placed")
async def record_order(ctx):
    await ctx.subject.set("total", ctx.payload["total"])
    await ctx.subject.set("status", "placed")


@on("order.submitted")
async def accept_order(ctx):
    await ctx.subject.set("status", "accepted")
'''

BROKEN_RULES = """
from krules import on

raise RuntimeError("the rule module's author made a mistake")
"""

START_TIMEOUT = 20.0
"""A guard against a hung child, not a timing assertion: a healthy start takes about a second."""


def krules_env(**variables: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KRULES_")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(variables)
    return env


def krules(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "krules", *args],
        env=env or krules_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )


def assert_one_error_line(result: subprocess.CompletedProcess[str], code: int) -> str:
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("krules: error: ")
    sentence = lines[0].removeprefix("krules: error: ")
    assert sentence[:1].isupper() and sentence.endswith("."), sentence
    return sentence


def unused_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


class KRulesProcess:
    """``krules run`` in a child process, its log read line by line on a thread."""

    def __init__(self, *args: str, env: dict[str, str]) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "krules", "run", *args],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def wait_for(self, pattern: str) -> re.Match[str]:
        """The first log line (from now on) matching ``pattern``; fails if the process ends first."""
        regex = re.compile(pattern)
        while True:
            try:
                line = self._queue.get(timeout=START_TIMEOUT)
            except queue.Empty:
                pytest.fail(f"krules run logged nothing matching {pattern!r}; log so far:\n" + self.log)
            if line is None:
                pytest.fail(f"krules run ended before logging {pattern!r}; log:\n" + self.log)
            self.lines.append(line)
            match = regex.search(line)
            if match:
                return match

    def serving_url(self) -> str:
        return self.wait_for(r"krules ready on (http://\S+)").group(1)

    def terminate(self, signum: signal.Signals = signal.SIGTERM) -> int:
        self.process.send_signal(signum)
        code = self.process.wait(timeout=START_TIMEOUT)
        self._reader.join(timeout=START_TIMEOUT)
        while not self._queue.empty():
            line = self._queue.get()
            if line is not None:
                self.lines.append(line)
        return code

    @property
    def log(self) -> str:
        return "\n".join(self.lines)

    def close(self) -> None:
        """Kill the child if it still runs and release its pipe."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self._reader.join(timeout=START_TIMEOUT)
        if self.process.stderr is not None:
            self.process.stderr.close()


@pytest.fixture
def rules_file(tmp_path: Path) -> Path:
    path = tmp_path / "shop_rules.py"
    path.write_text(RULES)
    return path


@pytest.fixture
def running(rules_file: Path) -> Iterator[KRulesProcess]:
    child = KRulesProcess(str(rules_file), "--port", "0", env=krules_env())
    yield child
    child.close()


# -- one-line errors -------------------------------------------------------------------------------
def test_an_unknown_rule_module_is_one_line_and_exit_2() -> None:
    result = krules("run", "no_such_rules_module")

    sentence = assert_one_error_line(result, 2)
    assert "'no_such_rules_module'" in sentence


def test_a_rule_module_that_fails_to_import_is_one_line_and_exit_2(tmp_path: Path) -> None:
    broken = tmp_path / "broken_rules.py"
    broken.write_text(BROKEN_RULES)

    result = krules("run", str(broken), "--port", "0")

    sentence = assert_one_error_line(result, 2)
    assert "the rule module's author made a mistake" in sentence


def test_a_usage_mistake_is_one_line_and_exit_2() -> None:
    assert_one_error_line(krules("run"), 2)
    assert_one_error_line(krules("run", "x", "--port", "http"), 2)
    assert_one_error_line(krules(), 2)
    assert_one_error_line(krules("frobnicate"), 2)


def test_bad_json_in_data_is_one_line_and_exit_2() -> None:
    not_json = krules("emit", "order.placed", "order-1", "--data", "{total: 3}")
    not_an_object = krules("emit", "order.placed", "order-1", "--data", "[3]")

    assert "--data" in assert_one_error_line(not_json, 2)
    assert "JSON object" in assert_one_error_line(not_an_object, 2)


def test_data_an_instance_would_refuse_is_one_line_and_exit_2_not_a_traceback() -> None:
    deep = krules("emit", "order.placed", "order-1", "--data", '{"a": ' + "[" * 20_000 + "]" * 20_000 + "}")
    surrogate = krules("emit", "order.placed", "order-1", "--data", '{"name": "\\ud800"}')

    assert "nests arrays and objects" in assert_one_error_line(deep, 2)
    assert "lone surrogate" in assert_one_error_line(surrogate, 2)


def test_a_bad_config_value_is_one_line_and_exit_2(rules_file: Path) -> None:
    result = krules("run", str(rules_file), env=krules_env(KRULES_HTTP_PORT="eighty"))

    assert "KRULES_HTTP_PORT='eighty'" in assert_one_error_line(result, 2)


def test_an_unreachable_instance_is_one_line_and_exit_1() -> None:
    url = f"http://127.0.0.1:{unused_port()}"

    emitted = krules("emit", "order.placed", "order-1", "--url", url)
    shown = krules("subject", "show", "order-1", "--url", url)

    assert assert_one_error_line(emitted, 1).startswith(f"Cannot reach the krules instance at {url}")
    assert assert_one_error_line(shown, 1).startswith(f"Cannot reach the krules instance at {url}")


def test_an_unreachable_redis_is_one_line_and_exit_1() -> None:
    env = krules_env(KRULES_REDIS_URL=f"redis://127.0.0.1:{unused_port()}/0")

    result = krules("subject", "show", "order-1", env=env)

    assert "check that the server is running" in assert_one_error_line(result, 1)


def test_a_port_in_use_is_one_line_and_exit_1(rules_file: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]

        result = krules("run", str(rules_file), "--port", str(port))

    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert lines[-1] == (
        f"krules: error: Cannot listen on 127.0.0.1:{port} because the address is already in use; "
        "stop the other process or choose another KRULES_HTTP_PORT."
    )


# -- serving ---------------------------------------------------------------------------------------
def test_run_serves_a_rule_module_that_emit_and_subject_show_reach(running: KRulesProcess) -> None:
    url = running.serving_url()

    emitted = krules("emit", "order.placed", "order-7", "--data", '{"total": 42}', "--url", url)
    shown = krules("subject", "show", "order-7", "--url", url)
    missing = krules("subject", "show", "order-8", "--url", url)

    assert emitted.returncode == 0, emitted.stderr
    assert re.fullmatch(r"\S+\n", emitted.stdout)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout) == {
        "name": "order-7",
        "properties": {"total": 42, "status": "placed"},
        "ext": {},
    }
    assert "'order-8' is not stored" in assert_one_error_line(missing, 1)
    assert running.terminate() == 0
    assert "Traceback" not in running.log


def test_emit_finds_the_instance_from_the_environment_and_sends_the_token(rules_file: Path) -> None:
    port = unused_port()
    env = krules_env(KRULES_HTTP_PORT=str(port), KRULES_INGRESS_TOKEN="cli-token")
    child = KRulesProcess(str(rules_file), env=env)
    try:
        child.serving_url()
        accepted = krules("emit", "order.placed", "order-1", "--data", '{"total": 1}', env=env)
        refused = krules("emit", "order.placed", "order-1", "--token", "wrong", env=env)

        assert accepted.returncode == 0, accepted.stderr
        assert "answered 401" in assert_one_error_line(refused, 1)
        assert child.terminate() == 0
    finally:
        child.close()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stop_signal_shuts_the_server_down_gracefully_with_exit_0(
    running: KRulesProcess, signum: signal.Signals
) -> None:
    running.serving_url()

    assert running.terminate(signum) == 0
    assert any(f"stopped by {signum.name}" in line for line in running.lines)
    assert "Traceback" not in running.log


def test_demo_feeds_only_the_sample_events_the_loaded_rules_handle(rules_file: Path) -> None:
    child = KRulesProcess(str(rules_file), "--port", "0", "--demo", env=krules_env())
    try:
        child.wait_for(r"demo: done")
        assert child.terminate() == 0
    finally:
        child.close()

    assert any(re.search(r"INFO .*order\.submitted order-1001 ", line) for line in child.lines)
    assert any(re.search(r"subject-property-changed order-1001 .*\"accepted\"", line) for line in child.lines)
    assert not any("sensor.reading" in line for line in child.lines)


def test_log_json_writes_one_json_object_per_line(rules_file: Path) -> None:
    child = KRulesProcess(str(rules_file), "--port", "0", env=krules_env(KRULES_LOG_JSON="true"))
    try:
        child.wait_for(r"krules ready on")
        assert child.terminate() == 0
    finally:
        child.close()

    records = [json.loads(line) for line in child.lines]
    assert {"time", "level", "logger", "message"} <= set(records[0])
    assert any(r["message"].startswith("krules ready on http://127.0.0.1:") for r in records)


TRACED_RULES = """
from krules import on
from krules.event_types import SUBJECT_PROPERTY_CHANGED


def trace_of(ctx):
    return [ctx.get_metadata("traceparent"), ctx.get_metadata("tracestate")]


@on("trace.ping")
async def ping(ctx):
    await ctx.emit("trace.pong")


@on("trace.pong")
async def pong(ctx):
    await ctx.subject.set("pong", trace_of(ctx))


@on(SUBJECT_PROPERTY_CHANGED)
async def changed(ctx):
    await ctx.subject.set_ext("changed", trace_of(ctx))
"""


def test_an_untraced_instance_passes_the_callers_trace_context_on_to_the_events_it_emits(
    tmp_path: Path,
) -> None:
    rules = tmp_path / "traced_rules.py"
    rules.write_text(TRACED_RULES)
    traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    tracestate = "vendor=opaque"
    child = KRulesProcess(str(rules), "--port", "0", env=krules_env())  # no OTEL_*: tracing is off
    try:
        url = child.serving_url()
        event = {
            "specversion": "1.0",
            "id": "traced-1",
            "source": "caller",
            "type": "trace.ping",
            "subject": "trace-1",
            "traceparent": traceparent,
            "tracestate": tracestate,
            "data": {},
        }
        answer = httpx.post(
            url, json=event, headers={"content-type": "application/cloudevents+json"}, timeout=30
        )
        shown = krules("subject", "show", "trace-1", "--url", url)
        assert child.terminate() == 0
    finally:
        child.close()

    assert answer.status_code == 200, answer.text
    assert shown.returncode == 0, shown.stderr
    stored = json.loads(shown.stdout)
    assert stored["properties"]["pong"] == [traceparent, tracestate]  # an emitted child
    assert stored["ext"]["changed"] == [traceparent, tracestate]  # a property-change event


# -- with Redis ------------------------------------------------------------------------------------
@pytest.mark.redis_server
def test_subject_show_reads_redis_directly_after_the_instance_stopped(
    rules_file: Path, redis_server: LocalRedisServer, redis_key_prefix: str
) -> None:
    env = krules_env(KRULES_REDIS_URL=redis_server.url, KRULES_KEY_PREFIX=redis_key_prefix)
    child = KRulesProcess(str(rules_file), "--port", "0", env=env)
    try:
        url = child.serving_url()
        emitted = krules("emit", "order.placed", "order-9", "--data", '{"total": 9}', "--url", url, env=env)
        assert emitted.returncode == 0, emitted.stderr
        assert child.terminate() == 0
    finally:
        child.close()

    shown = krules("subject", "show", "order-9", env=env)

    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["properties"] == {"total": 9, "status": "placed"}


@pytest.mark.redis_server
def test_run_with_a_krules_deployment_s_storage_variables_serves_in_redis_mode(
    rules_file: Path, redis_server: LocalRedisServer, redis_key_prefix: str
) -> None:
    env = krules_env(
        KRULES_STORAGE_PROVIDER="redis",
        KRULES_STORAGE_REDIS_HOST="127.0.0.1",
        KRULES_STORAGE_REDIS_PORT=str(redis_server.port),
        KRULES_STORAGE_REDIS_DB="0",
        KRULES_STORAGE_REDIS_KEY_PREFIX=redis_key_prefix,
        KRULES_TEST_REDIS_URL=redis_server.url,  # a KRules test suite's variable: logged, not fatal
    )
    child = KRulesProcess(str(rules_file), "--port", "0", env=env)
    try:
        url = child.serving_url()
        emitted = krules("emit", "order.placed", "order-7", "--data", '{"total": 7}', "--url", url, env=env)
        assert emitted.returncode == 0, emitted.stderr
        assert child.terminate() == 0
    finally:
        child.close()
    assert "KRULES_TEST_REDIS_URL is not a krules setting; ignored" in child.log

    # read back with krules' own variables: the subject is in that server under that prefix
    own = krules_env(KRULES_REDIS_URL=redis_server.url, KRULES_KEY_PREFIX=redis_key_prefix)
    shown = krules("subject", "show", "order-7", env=own)

    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["properties"] == {"total": 7, "status": "placed"}


def test_a_bad_krules_deployment_variable_is_one_line_and_exit_2(rules_file: Path) -> None:
    result = krules("run", str(rules_file), env=krules_env(KRULES_STORAGE_REDIS_PORT="abc"))
    assert assert_one_error_line(result, 2) == "KRULES_STORAGE_REDIS_PORT='abc' is not an integer."
