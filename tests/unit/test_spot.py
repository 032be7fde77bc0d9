"""Spot notices against real local metadata servers (http.server on 127.0.0.1, free ports)."""

from __future__ import annotations

import http.server
import json
import logging
import socket
import threading
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import pytest

from harness.stop.flag import REASON_NONE, REASON_SPOT, StopFlag
from harness.stop.spot import (AWS_TOKEN_HEADER, AWS_TOKEN_RENEW_FRACTION, AWS_TOKEN_TTL_HEADER,
                               AWS_TOKEN_TTL_S, PROVIDERS, SPOT_URLS, AwsNoticeSource, SpotPoller,
                               notice_present)

AWS_NOTICE_PATH = "/latest/meta-data/spot/instance-action"
GCP_NOTICE_PATH = "/computeMetadata/v1/instance/preempted"
AZURE_NOTICE_PATH = "/metadata/scheduledevents?api-version=2020-07-01"
AWS_NOTICE = b'{"action": "terminate", "time": "2026-11-23T05:00:00Z"}'
DEADLINE_S = 10.0
SERVER_POLL_S = 0.02  # how often serve_forever checks for shutdown: keeps teardown fast

Serve = Callable[[type, object], str]


@dataclass
class Imds:
    """What a fake EC2 metadata service holds and saw."""

    notice: bool = False
    v1_only: bool = False  # refuse the token PUT with v1_refusal, answer plain GETs
    v1_refusal: int = 405
    put_error: Optional[int] = None  # answer the token PUT with this status (a broken IMDS)
    tokens: set = field(default_factory=set)
    token_puts: list = field(default_factory=list)  # the TTL header of each PUT, refused ones too
    gets: list = field(default_factory=list)  # (token header or None, status answered)


class ImdsHandler(http.server.BaseHTTPRequestHandler):
    """IMDSv2-only unless state.v1_only: GETs without a live token get 401."""

    def do_PUT(self) -> None:
        state: Imds = self.server.state
        state.token_puts.append(self.headers.get(AWS_TOKEN_TTL_HEADER))
        if state.put_error is not None:
            self._answer(state.put_error, b"")
            return
        if state.v1_only or self.path != "/latest/api/token":
            self._answer(state.v1_refusal if state.v1_only else 404, b"")
            return
        token = uuid.uuid4().hex
        state.tokens.add(token)
        self._answer(200, token.encode())

    def do_GET(self) -> None:
        state: Imds = self.server.state
        token = self.headers.get(AWS_TOKEN_HEADER)
        if not state.v1_only and token not in state.tokens:
            status, body = 401, b""
        elif self.path != AWS_NOTICE_PATH or not state.notice:
            status, body = 404, b"Not Found"
        else:
            status, body = 200, AWS_NOTICE
        state.gets.append((token, status))
        self._answer(status, body)

    def _answer(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@dataclass
class Metadata:
    """A GCP or Azure metadata service: a required header, a body, what it saw."""

    header: tuple[str, str]
    body: bytes
    refusal: int  # status when the header is missing: GCP 403, Azure 400
    status: int = 200
    seen_headers: list = field(default_factory=list)


class HeaderHandler(ImdsHandler):
    def do_GET(self) -> None:
        state: Metadata = self.server.state
        name, value = state.header
        state.seen_headers.append(self.headers.get(name))
        if self.headers.get(name) != value:
            self._answer(state.refusal, b"missing metadata header")
        else:
            self._answer(state.status, state.body)


@pytest.fixture
def serve() -> Iterator[Serve]:
    """Start a threaded HTTP server on a free port; returns its base URL. Shut down after the test."""
    servers = []

    def start(handler: type, state: object) -> str:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        server.state = state
        threading.Thread(target=server.serve_forever, args=(SERVER_POLL_S,), daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def _get(url: str, headers: Optional[dict] = None) -> int:
    """Status of a plain GET, for negative controls on the fake servers themselves."""
    request = urllib.request.Request(url, headers=headers or {})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=2) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def _warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno == logging.WARNING and "endpoint" in r.getMessage()]


# ----- AWS --------------------------------------------------------------------------------------

def test_imdsv2_only_notice_is_seen_and_every_get_carries_a_live_token(serve):
    imds = Imds(notice=True)
    url = serve(ImdsHandler, imds) + AWS_NOTICE_PATH
    assert _get(url) == 401  # negative control: a plain IMDSv1 GET is refused
    imds.gets.clear()
    flag = StopFlag()
    assert SpotPoller(flag, "aws", url, interval_s=1).poll_once()
    assert flag.reason == REASON_SPOT
    assert imds.token_puts == [str(AWS_TOKEN_TTL_S)]
    assert imds.gets and all(token in imds.tokens for token, _ in imds.gets)
    assert imds.gets[-1][1] == 200


def test_imdsv2_without_notice_does_not_stop_and_reuses_the_token(serve, caplog):
    imds = Imds(notice=False)
    poller = SpotPoller(StopFlag(), "aws", serve(ImdsHandler, imds) + AWS_NOTICE_PATH, interval_s=1)
    assert not any(poller.poll_once() for _ in range(3))
    assert poller.flag.reason == REASON_NONE
    assert len(imds.token_puts) == 1  # one token serves every poll within its TTL
    assert [status for _, status in imds.gets] == [404, 404, 404]
    assert all(token in imds.tokens for token, _ in imds.gets)
    assert not _warnings(caplog)  # 404 is the documented "no notice", not a failure


@pytest.mark.parametrize("refusal", [403, 404, 405, 501])
def test_imdsv1_only_server_refusing_the_token_falls_back_to_plain_gets(serve, refusal):
    imds = Imds(notice=True, v1_only=True, v1_refusal=refusal)
    url = serve(ImdsHandler, imds) + AWS_NOTICE_PATH
    poller = SpotPoller(StopFlag(), "aws", url, interval_s=1)
    assert poller.poll_once() and poller.poll_once()
    assert imds.gets == [(None, 200), (None, 200)]
    assert imds.token_puts == [str(AWS_TOKEN_TTL_S)]  # refused once, not asked again


def test_a_failing_token_call_is_an_outage_not_a_reason_to_drop_to_imdsv1(serve, caplog):
    imds = Imds(notice=True, v1_only=True, put_error=503)  # a plain GET would see the notice
    poller = SpotPoller(StopFlag(), "aws", serve(ImdsHandler, imds) + AWS_NOTICE_PATH, interval_s=1)
    assert not any(poller.poll_once() for _ in range(3))
    assert imds.gets == [] and len(imds.token_puts) == 3  # retried each poll, never a plain GET
    assert len(_warnings(caplog)) == 1 and "/latest/api/token" in _warnings(caplog)[0].getMessage()


def test_token_revoked_mid_way_gets_401_and_is_renewed(serve):
    imds = Imds(notice=False)
    poller = SpotPoller(StopFlag(), "aws", serve(ImdsHandler, imds) + AWS_NOTICE_PATH, interval_s=1)
    assert not poller.poll_once()
    first_token = imds.gets[0][0]
    imds.tokens.clear()  # e.g. IMDS restarted: every token is now invalid
    imds.notice = True
    assert poller.poll_once()
    assert len(imds.token_puts) == 2
    assert [status for _, status in imds.gets] == [404, 401, 200]
    assert imds.gets[1][0] == first_token and imds.gets[2][0] in imds.tokens


def test_token_is_renewed_before_its_ttl_runs_out(serve):
    imds = Imds(notice=False)
    now = [1000.0]
    ttl_s = 100
    source = AwsNoticeSource(serve(ImdsHandler, imds) + AWS_NOTICE_PATH, token_ttl_s=ttl_s,
                             clock=lambda: now[0])
    assert source.read().status == 404
    now[0] += AWS_TOKEN_RENEW_FRACTION * ttl_s - 1
    assert source.read().status == 404
    assert imds.token_puts == [str(ttl_s)]  # still inside the renewal window: no new token
    now[0] += 2
    assert source.read().status == 404
    assert imds.token_puts == [str(ttl_s)] * 2
    assert [status for _, status in imds.gets] == [404] * 3  # renewed ahead: no 401 on the way
    assert imds.gets[2][0] != imds.gets[0][0]


# ----- GCP and Azure ----------------------------------------------------------------------------

def test_gcp_notice_is_read_with_the_metadata_flavor_header(serve):
    gcp = Metadata(header=("Metadata-Flavor", "Google"), body=b"TRUE", refusal=403)
    url = serve(HeaderHandler, gcp) + GCP_NOTICE_PATH
    assert _get(url) == 403  # negative control: the server insists on the header
    poller = SpotPoller(StopFlag(), "gcp", url, interval_s=1)
    assert poller.poll_once() and poller.flag.reason == REASON_SPOT
    assert gcp.seen_headers[-1] == "Google"


def test_gcp_false_is_no_notice(serve):
    gcp = Metadata(header=("Metadata-Flavor", "Google"), body=b"FALSE", refusal=403)
    poller = SpotPoller(StopFlag(), "gcp", serve(HeaderHandler, gcp) + GCP_NOTICE_PATH, interval_s=1)
    assert not poller.poll_once() and not poller.flag.requested


def _azure_events(*types: str) -> bytes:
    events = [{"EventId": str(uuid.uuid4()), "EventType": kind, "ResourceType": "VirtualMachine",
               "Resources": ["vm-0"], "EventStatus": "Scheduled", "NotBefore": "", "Description": "",
               "EventSource": "Platform", "DurationInSeconds": -1} for kind in types]
    return json.dumps({"DocumentIncarnation": 1, "Events": events}).encode()


@pytest.mark.parametrize("events, preempted", [
    (("Freeze", "Preempt"), True),
    (("Freeze",), False),
    (("Reboot", "Redeploy", "Terminate"), False),
    ((), False),
])
def test_azure_only_a_preempt_event_is_a_notice(serve, events, preempted):
    azure = Metadata(header=("Metadata", "true"), body=_azure_events(*events), refusal=400)
    url = serve(HeaderHandler, azure) + AZURE_NOTICE_PATH
    assert _get(url) == 400  # negative control: no "Metadata: true", no answer
    poller = SpotPoller(StopFlag(), "azure", url, interval_s=1)
    assert poller.poll_once() is preempted
    assert poller.flag.requested is preempted
    assert azure.seen_headers[-1] == "true"


# ----- failures, logging, the thread ------------------------------------------------------------

def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize("provider", PROVIDERS)
def test_unreachable_endpoint_is_no_notice_and_warns_once(provider, caplog):
    url = f"http://127.0.0.1:{_closed_port()}" + {
        "aws": AWS_NOTICE_PATH, "gcp": GCP_NOTICE_PATH, "azure": AZURE_NOTICE_PATH}[provider]
    poller = SpotPoller(StopFlag(), provider, url, interval_s=1)
    with caplog.at_level(logging.INFO, logger="harness"):
        assert not any(poller.poll_once() for _ in range(4))
    assert not poller.flag.requested
    assert len(_warnings(caplog)) == 1


def test_warns_again_only_after_the_endpoint_recovered_and_failed_again(serve, caplog):
    gcp = Metadata(header=("Metadata-Flavor", "Google"), body=b"FALSE", refusal=403, status=500)
    poller = SpotPoller(StopFlag(), "gcp", serve(HeaderHandler, gcp) + GCP_NOTICE_PATH, interval_s=1)
    with caplog.at_level(logging.INFO, logger="harness"):
        for status, polls in ((500, 3), (200, 2), (503, 3)):
            gcp.status = status
            assert not any(poller.poll_once() for _ in range(polls))
    warned = _warnings(caplog)
    assert len(warned) == 2
    assert "500" in warned[0].getMessage() and "503" in warned[1].getMessage()


def test_running_poller_stops_the_flag_once_a_notice_appears(serve):
    imds = Imds(notice=False)
    flag = StopFlag()
    poller = SpotPoller(flag, "aws", serve(ImdsHandler, imds) + AWS_NOTICE_PATH, interval_s=0.02)
    assert poller.start() is poller
    try:
        deadline = time.monotonic() + DEADLINE_S
        while not imds.gets and time.monotonic() < deadline:  # wait until it has polled, no notice
            time.sleep(0.01)
        assert imds.gets and not flag.requested
        imds.notice = True
        while not flag.requested and time.monotonic() < deadline:
            time.sleep(0.01)
        assert flag.reason == REASON_SPOT
    finally:
        poller.stop()


def test_bad_configuration_fails_in_the_constructor():
    with pytest.raises(ValueError, match="preempt.spot="):
        SpotPoller(StopFlag(), "oracle", None, interval_s=1)
    with pytest.raises(ValueError, match="preempt.spot_url="):
        SpotPoller(StopFlag(), "aws", "169.254.169.254/latest", interval_s=1)
    assert set(SPOT_URLS) == set(PROVIDERS) == {"aws", "gcp", "azure"}


def test_notice_parsing_rules():
    assert notice_present("aws", AWS_NOTICE, 200) and not notice_present("aws", b"", 404)
    assert not notice_present("aws", b'{"action": "reboot"}', 200)
    assert notice_present("gcp", b"TRUE\n", 200) and not notice_present("gcp", b"FALSE", 200)
    assert not notice_present("gcp", b"TRUE", 403)
    assert notice_present("azure", _azure_events("Preempt"), 200)
    assert not notice_present("azure", b"not json", 200)
