"""GET /metrics on a real daemon after real traffic; the token-free listener; the parts."""

from __future__ import annotations

import json
import signal
import uuid
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families
from trio_websocket import open_websocket_url

from chatd.config import RetentionSettings
from chatd.errors import ConfigError
from chatd.metrics import ALLOWED_LABELS, LAG_WINDOW, LoopLag, Metrics, Sources, serve_loop_lag
from chatd.retention import Retention
from chatd.store.store import Buckets

from .conftest import DataDir
from .test_daemon import daemon
from .test_daemon_messaging import PASSWORDS, create_users
from .test_floods import FLOODER, open_from, status_of
from .test_keys import login_device
from .test_relay_auth import Client, Server, connect, server

SENDS = 5  # messages alice sends bob; the burst lets SENDS - 1 through


def admin_client(data_dir: DataDir) -> httpx.AsyncClient:
    transport = httpx.AsyncHTTPTransport(uds=str(data_dir.path / "a.sock"))
    return httpx.AsyncClient(transport=transport, base_url="http://chatd")


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a scrape: (name, sorted labels) -> value."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(scraped: dict[Any, float], name: str, **labels: str) -> float:
    return scraped[(name, tuple(sorted(labels.items())))]


async def traffic(url: str) -> dict[str, Any]:
    """Bob online with keys; alice sends bob SENDS messages (the last refused
    by the rate limit); bob acknowledges what he got; a failed login.
    Returns what identifies the people, for the label check."""
    async with open_websocket_url(url) as bob_ws, open_websocket_url(url) as alice_ws:
        await bob_ws.get_message()  # hello
        await alice_ws.get_message()
        bob_client = Client(bob_ws)
        bob = await login_device(bob_client, "bob", PASSWORDS["bob"])
        await bob.publish(3)  # below devices.one_time_key_threshold: low on keys
        alice_client = Client(alice_ws)
        alice = await login_device(alice_client, "alice", PASSWORDS["alice"])
        outcomes = []
        for n in range(SENDS):
            envelope = {"user_id": bob.user_id, "device_id": bob.device_id, "ciphertext": f"c{n}"}
            reply = await alice_client.request(
                "send", message_id=str(uuid.uuid4()), envelopes=[envelope]
            )
            outcomes.append(reply["type"] if reply["type"] == "sent" else reply["code"])
        assert outcomes == ["sent"] * (SENDS - 1) + ["rate_limited"]
        delivered: list[int] = []
        with trio.fail_after(10):
            while len(delivered) < SENDS - 1:
                frame = json.loads(await bob_ws.get_message())
                if frame["type"] == "deliver":
                    delivered += [e["envelope_id"] for e in frame["envelopes"]]
        acked = await bob_client.request("ack", up_to=max(delivered))
        assert acked["type"] == "ok", acked
    async with open_websocket_url(url) as ws:
        await ws.get_message()
        failed = await Client(ws).login("alice", "not alice's password")
        assert failed["type"] == "error" and failed["code"] == "login_failed"
        return {
            "user_ids": {str(alice.user_id), str(bob.user_id)},
            "device_ids": {alice.device_id, bob.device_id},
            "usernames": set(PASSWORDS),
        }


async def test_metrics_after_real_traffic_name_no_one(data_dir: DataDir, short_tmp: Path) -> None:
    data_dir.configure(
        auth={"require_mfa": "none"},
        relay={"send_burst": SENDS - 1, "send_rate_per_user": 1.0},
    )
    async with daemon(data_dir, short_tmp) as d:
        await d.wait_notify("READY")
        await create_users(data_dir)
        people = await traffic(d.relay_url())
        async with admin_client(data_dir) as admin:
            refused = await admin.get("/metrics")
            assert refused.status_code == 401
            assert refused.json()["error"]["code"] == "unauthorized"
            reply = await admin.get(
                "/metrics", headers={"Authorization": f"Bearer {data_dir.token}"}
            )
        d.proc.send_signal(signal.SIGTERM)
        with trio.fail_after(30):
            assert await d.proc.wait() == 0
    assert reply.status_code == 200, (short_tmp / "stderr.log").read_text()[-3000:]
    assert reply.headers["content-type"].startswith("text/plain; version=0.0.4")
    scraped = samples(reply.text)

    # No label names or carries a person, a device or an address.
    label_names = {name for _, labels in scraped for name, _ in labels}
    assert label_names <= ALLOWED_LABELS, label_names - ALLOWED_LABELS
    identifying = people["user_ids"] | people["device_ids"] | people["usernames"] | {"127.0.0.1"}
    # (Bucket bounds are numbers from the code; a user id may look the same.)
    label_values = {v for _, labels in scraped for n, v in labels if n != "le"}
    assert not label_values & identifying
    assert not any(token in reply.text for token in people["device_ids"] | people["usernames"])

    # What happened is there.
    assert value(scraped, "chatd_relay_requests_total", request="send") == SENDS
    assert value(scraped, "chatd_relay_requests_total", request="ack") == 1
    assert value(scraped, "chatd_relay_envelopes_delivered_total") >= SENDS - 1
    assert value(scraped, "chatd_queue_entries_accepted_total", queue="direct") >= SENDS - 1
    assert value(scraped, "chatd_login_failures_total", reason="bad_password") == 1
    assert value(scraped, "chatd_rate_limited_total", request="send") == 1
    for reason in ("address_limit", "address_hang_up", "handshake_cap"):  # no flood here
        assert value(scraped, "chatd_relay_connections_refused_total", reason=reason) == 0
    assert value(scraped, "chatd_relay_addresses_dropped_total") == 0
    # Bob's 3 keys are too few; alice never published keys, so is not counted.
    assert value(scraped, "chatd_devices_low_on_one_time_keys") == 1
    assert value(scraped, "chatd_connections", state="open") == 0  # both left before the scrape
    assert value(scraped, "chatd_store_commit_seconds_count") >= 1
    assert value(scraped, "chatd_store_batch_writes_count") == value(
        scraped, "chatd_store_commit_seconds_count"
    )
    assert value(scraped, "chatd_store_batch_writes_bucket", le="+Inf") >= 1
    assert value(scraped, "chatd_event_loop_lag_seconds_count") >= 0
    assert value(scraped, "chatd_queue_oldest_entry_age_seconds") >= 0
    assert ("chatd_retention_rows_purged_total", (("retention_job", "sessions"),)) in scraped
    assert value(scraped, "process_open_fds") > 0


async def test_the_token_free_listener_serves_only_metrics(
    data_dir: DataDir, short_tmp: Path
) -> None:
    data_dir.configure(metrics={"listen": "127.0.0.1:0"})
    async with daemon(data_dir, short_tmp) as d:
        ready = await d.wait_notify("READY")
        bind = ready.split(", metrics ", 1)[1].split()[0].strip()
        assert bind.startswith("http://127.0.0.1:")
        async with httpx.AsyncClient(base_url=bind) as client:
            scrape = await client.get("/metrics")
            assert scrape.status_code == 200
            assert "chatd_connections" in scrape.text
            assert scrape.headers["content-type"].startswith("text/plain; version=0.0.4")
            # Nothing of the admin API is reachable here, with or without a token.
            health = await client.get(
                "/v1/health", headers={"Authorization": f"Bearer {data_dir.token}"}
            )
            assert health.status_code == 404
            assert (await client.post("/metrics")).status_code == 405
        d.proc.send_signal(signal.SIGTERM)
        with trio.fail_after(30):
            assert await d.proc.wait() == 0


@pytest.mark.parametrize("listen", ["9464", "localhost:9464", "127.0.0.1:http", "127.0.0.1:70000"])
def test_a_bad_metrics_listen_is_refused_naming_the_key(data_dir: DataDir, listen: str) -> None:
    with pytest.raises(ConfigError) as error:
        data_dir.configure(metrics={"listen": listen})
    assert "metrics.listen" in str(error.value)
    assert str(data_dir.config_path) in str(error.value)


def test_the_metrics_listener_is_off_by_default(data_dir: DataDir) -> None:
    assert data_dir.config.metrics_tcp is None


def metrics_of(srv: Server) -> Metrics:
    return Metrics(
        Sources(
            store=srv.store,
            registry=srv.relay.registry,
            auth=srv.auth,
            queues=srv.queues,
            retention=Retention(srv.store, RetentionSettings(), []),
            relay_limits=srv.relay.dispatcher.limits,
            relay=srv.relay,
            low_key_threshold=20,
        )
    )


async def test_two_servers_in_one_process_keep_their_metrics_apart(short_tmp: Path) -> None:
    (short_tmp / "a").mkdir()
    (short_tmp / "b").mkdir()
    async with server(short_tmp / "a") as a, server(short_tmp / "b") as b:
        metrics_a, metrics_b = metrics_of(a), metrics_of(b)
        async with connect(a) as c:
            failed = await c.login("alice", "not the password")
            assert failed["code"] == "login_failed"
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(serve_loop_lag, metrics_a, 0.0))
            probes = "chatd_event_loop_lag_seconds_count"
            while not metrics_a.registry.get_sample_value(probes):
                await trio.sleep(0)  # a checkpoint: the probe (interval 0) wakes at each
            nursery.cancel_scope.cancel()
        scraped_a = samples((await metrics_a.scrape()).decode())
        scraped_b = samples((await metrics_b.scrape()).decode())
    assert value(scraped_a, "chatd_login_failures_total", reason="bad_password") == 1
    assert ("chatd_login_failures_total", (("reason", "bad_password"),)) not in scraped_b
    assert value(scraped_a, "chatd_event_loop_lag_seconds_count") >= 1
    assert value(scraped_b, "chatd_event_loop_lag_seconds_count") == 0
    # Nothing went to prometheus_client's process-wide default registry.
    assert (
        REGISTRY.get_sample_value("chatd_login_failures_total", {"reason": "bad_password"}) is None
    )


async def test_a_connection_flood_shows_in_the_metrics(short_tmp: Path) -> None:
    """An address past its limit: its 429s, its hang-ups at accept and the
    kernel drop are counted, by reason, with no address in a label."""
    async with server(short_tmp, relay={"max_unauthenticated_per_address": 1}) as srv:
        held = await open_from(srv.relay, FLOODER)
        assert await status_of(held) == b"101"
        with trio.fail_after(10):
            while srv.relay.addresses.hung_up == 0:
                stream = await open_from(srv.relay, FLOODER)
                await status_of(stream)
                await trio.aclose_forcefully(stream)
        scraped = samples((await metrics_of(srv).scrape()).decode())
        await trio.aclose_forcefully(held)
    refused = "chatd_relay_connections_refused_total"
    assert value(scraped, refused, reason="address_limit") >= 3
    assert value(scraped, refused, reason="address_hang_up") >= 1
    assert value(scraped, refused, reason="handshake_cap") == 0
    assert value(scraped, "chatd_relay_addresses_dropped_total") >= 1
    assert FLOODER not in {v for _, labels in scraped for _, v in labels}


def test_buckets_count_each_value_once_by_upper_bound() -> None:
    buckets = Buckets((1.0, 2.0, 4.0))
    for v in (0.5, 1.0, 1.5, 4.0, 9.0):
        buckets.observe(v)
    assert buckets.counts == [2, 1, 1, 1]  # le=1 holds 1.0 itself, as Prometheus does
    assert buckets.sum == 16.0


def test_loop_lag_max_covers_at_least_one_window() -> None:
    from prometheus_client import CollectorRegistry

    lag = LoopLag(CollectorRegistry())
    lag.observe(0.3, now=1.0)
    lag.observe(0.01, now=1.0 + LAG_WINDOW)  # a new window: the old max still counts
    assert lag.recent_max == 0.3
    lag.observe(0.02, now=1.0 + 2 * LAG_WINDOW)  # two windows on: it is gone
    assert lag.recent_max == 0.02
