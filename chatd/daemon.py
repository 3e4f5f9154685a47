"""``chatd serve``: the one process and its one top-level nursery.

Start order (each via ``await nursery.start``, so each is truly up before the
next): store, backups (online backup jobs, on connections of their own),
retention, blobs (the attachment listener, so the relay can hand out its
URLs), relay, the metrics (the event-loop lag probe), admin, and the
token-free metrics listener when configured. Under systemd socket
activation the relay, admin and metrics listeners serve the sockets systemd
passed (:mod:`chatd.sdlisten`) instead of binding their own. Only then does systemd hear
``READY=1``. While serving, ``WATCHDOG=1`` goes out at half of
``WatchdogSec`` as long as the store writer is alive.

Stop: SIGTERM or SIGINT sets ``stopping``. systemd hears ``STOPPING=1``; the
relay and admin stop accepting and finish what is in flight, for at most
``server.shutdown_grace_seconds``; then everything left is cancelled, the
store commits whatever is queued and closes, and :func:`run_daemon` returns
(exit 0). A second signal during the drain skips the rest of the grace period.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import trio

from chatd import __version__
from chatd.admin.api import AdminContext
from chatd.admin.service import serve_admin
from chatd.auth.accounts import AccountAdmin
from chatd.auth.service import AuthService
from chatd.backup.service import serve_backups
from chatd.blobs.files import BlobFiles
from chatd.blobs.http import serve_blobs
from chatd.blobs.service import BlobService
from chatd.blobs.signing import UrlSigner
from chatd.config import Config
from chatd.consent import ConsentService
from chatd.e2ee.current import CurrentDevices
from chatd.e2ee.keys import KeyService
from chatd.e2ee.queues import QueueService
from chatd.errors import StoreError
from chatd.keyfiles import (
    check_data_dir,
    load_admin_token_hash,
    load_blob_key,
    load_db_key,
    load_signing_seed,
)
from chatd.log import fields
from chatd.memory import freeze_startup_objects, trim_periodically
from chatd.metrics import Metrics, Sources, serve_loop_lag
from chatd.metrics_http import serve_metrics_http
from chatd.privacy.erasure import Erasure
from chatd.privacy.receipts import ReceiptSigner
from chatd.push import Notifier as PushNotifier
from chatd.relay import Registry, serve_relay
from chatd.retention import (
    auth_jobs,
    blob_jobs,
    default_jobs,
    privacy_jobs,
    queue_jobs,
    serve_retention,
)
from chatd.rooms.members import DeviceChanges
from chatd.rooms.service import RoomService
from chatd.sdlisten import ADMIN, METRICS, RELAY, take_listen_fds
from chatd.sdnotify import Notifier, watchdog_interval
from chatd.store import Store, serve_store

log = logging.getLogger("chatd.daemon")


async def _until_done(
    done: trio.Event,
    fn: Callable[..., Awaitable[None]],
    *args: Any,
    task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED,
) -> None:
    try:
        await fn(*args, task_status=task_status)
    finally:
        done.set()


async def _watch_signals(
    stopping: trio.Event,
    cancel: trio.CancelScope,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        task_status.started()
        async for signum in signals:
            if not stopping.is_set():
                log.info("daemon.stopping", extra=fields(signal=signal.Signals(signum).name))
                stopping.set()
            else:
                log.warning("daemon.stop_now", extra=fields(signal=signal.Signals(signum).name))
                cancel.cancel()


@dataclass(frozen=True, slots=True)
class Services:
    """The services built on the store, wired to each other."""

    registry: Registry  # the relay's, and the sink the others report to
    current: CurrentDevices
    auth: AuthService
    keys: KeyService
    queues: QueueService
    rooms: RoomService
    push: PushNotifier  # wake-ups for devices without a live connection
    consent: ConsentService  # the current terms, and who accepted them

    def for_relay(self) -> dict[str, Any]:
        """The keyword arguments of :func:`serve_relay`."""
        return {
            "registry": self.registry,
            "auth": self.auth,
            "keys": self.keys,
            "queues": self.queues,
            "rooms": self.rooms,
            "push": self.push,
            "consent": self.consent,
        }


async def open_services(nursery: trio.Nursery, store: Store, config: Config) -> Services:
    """Make the services on ``store``, each wired to what it reports to, and
    start the queue service's writes and the room service in ``nursery``.

    The relay's registry hears what the services have to tell it (revoked
    sessions, devices low on keys, envelopes accepted, invitations), so it is
    made first and handed to each service as it is made; the room service
    hears which users' current devices changed through ``changes``. The
    push notifier is the registry's offline sink (envelopes queued for a
    device with no live connection) and asks it which devices are live.
    Reads the queue totals, the rooms, the push endpoints and the current
    consent documents (the consent service tells the registry of new ones).
    """
    push = PushNotifier(store, config.push, log_settings=config.log)
    await push.open()
    registry = Registry(offline=push, device_connections=config.relay.max_connections_per_device)
    changes = DeviceChanges()
    current = CurrentDevices(store, events=changes)
    auth = AuthService(store, config.auth, config.devices, events=registry)
    keys = KeyService(store, config.devices, current=current, events=registry)
    queues = QueueService(store, config.devices, current, registry)
    await queues.open()
    await nursery.start(queues.serve)
    rooms = RoomService(store, queues, current, changes, registry, config.rooms)
    await rooms.open()
    await nursery.start(rooms.serve)
    await nursery.start(partial(push.serve, is_live=registry.has_device))
    push.wake_waiting(queues.state.totals)  # those of the last run were lost with it
    consent = ConsentService(store, events=registry)
    await consent.open()
    return Services(registry, current, auth, keys, queues, rooms, push, consent)


def open_blobs(store: Store, config: Config, rooms: RoomService, key: bytes) -> BlobService:
    """The attachment rules, on ``store``, signing with ``key``; room
    references are checked against the room service's members."""

    def is_member(room_id: int, user_id: int) -> bool:
        room = rooms.rooms.get(room_id)
        return room is not None and user_id in room.members

    files = BlobFiles(config.blobs_dir)
    return BlobService(store, config.attachments, UrlSigner(key), files, is_member)


async def _flush_queues(queues: QueueService) -> None:
    try:
        await queues.flush()
    except StoreError as exc:
        log.warning("daemon.queues_not_flushed", extra=fields(error=type(exc).__name__))


async def _watchdog(notifier: Notifier, store: Store, interval: float) -> None:
    while True:
        if store.writer_alive:
            notifier.notify(WATCHDOG="1")
        await trio.sleep(interval)


async def run_daemon(config: Config, *, notifier: Notifier | None = None) -> None:
    """Run every service until SIGTERM/SIGINT; return after a clean drain.

    Raises a :class:`chatd.errors.ChatdError` (inside an ExceptionGroup, from
    the nursery) when a service cannot start: a wrong key, an address in use.
    """
    os.umask(0o077)  # everything chatd creates is private to its user
    activated = take_listen_fds()  # systemd's sockets, if socket-activated
    check_data_dir(config.data_dir)
    key = load_db_key(config)
    token_hash = load_admin_token_hash(config)
    notifier = notifier or Notifier()
    stopping = trio.Event()
    relay_done, admin_done, blobs_done = trio.Event(), trio.Event(), trio.Event()
    metrics_done = trio.Event()
    grace = config.server.shutdown_grace_seconds
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(_watch_signals, stopping, nursery.cancel_scope)
            notifier.notify(STATUS="opening the store")
            store: Store = await nursery.start(serve_store, config.database_path, key, config.store)
            # Backups copy the database on a connection of their own, so they
            # keep the database key; the backup key is read at each backup.
            backups = await nursery.start(serve_backups, config, config.database_path, key)
            del key
            services = await open_services(nursery, store, config)
            auth, queues = services.auth, services.queues
            # Made at first start, once the store opened: a wrong database key
            # leaves the data dir as it was.
            blobs = open_blobs(store, config, services.rooms, load_blob_key(config))
            accounts = AccountAdmin(auth, current=services.current)
            erasure = Erasure(
                accounts,
                config.privacy,
                ReceiptSigner(load_signing_seed(config)),
                rooms=services.rooms,
                queues=queues,
                push=services.push,
                blobs=blobs,
            )
            jobs = (
                default_jobs(config.retention)
                + auth_jobs(config.auth)
                + queue_jobs(config.devices, queues)
                + blob_jobs(config.attachments, blobs)
                + privacy_jobs(config.privacy, erasure)
            )
            retention = await nursery.start(
                partial(serve_retention, store, config.retention, jobs=jobs)
            )
            nursery.start_soon(auth.warm_up)  # dummy hash, password list: off the start path
            await nursery.start(_until_done, blobs_done, serve_blobs, config, blobs, stopping)
            relay = await nursery.start(
                _until_done,
                relay_done,
                partial(
                    serve_relay, **services.for_relay(), blobs=blobs, sockets=activated.take(RELAY)
                ),
                config,
                stopping,
            )
            metrics = Metrics(
                Sources(
                    store=store,
                    registry=services.registry,
                    auth=auth,
                    queues=queues,
                    retention=retention,
                    relay_limits=relay.dispatcher.limits,
                    relay=relay,
                    low_key_threshold=config.devices.one_time_key_threshold,
                )
            )
            await nursery.start(serve_loop_lag, metrics)
            ctx = AdminContext(
                store=store,
                retention=retention,
                token_hash=token_hash,
                accounts=accounts,
                rooms=services.rooms,
                online=services.registry.online_devices,
                metrics=metrics,
                backups=backups,
                consent=services.consent,
                erasure=erasure,
                server_name=socket.gethostname(),
            )
            admin_bind = await nursery.start(
                _until_done,
                admin_done,
                partial(serve_admin, sockets=activated.take(ADMIN)),
                config,
                ctx,
                stopping,
            )
            metrics_bind = ""
            metrics_sockets = activated.take(METRICS)
            if metrics_sockets or config.metrics_tcp is not None:
                metrics_bind = await nursery.start(
                    _until_done,
                    metrics_done,
                    partial(serve_metrics_http, sockets=metrics_sockets),
                    config,
                    metrics,
                    stopping,
                )
            else:
                metrics_done.set()
            scheme = "wss" if config.relay_tls else "ws"
            relay_url = f"{scheme}://{config.relay.host}:{relay.port}/v1/ws"
            status = f"serving relay {relay_url}, admin {admin_bind}, blobs {blobs.base_url}"
            if metrics_bind:
                status += f", metrics {metrics_bind}"
            freeze_startup_objects()  # no GC pauses over them (see chatd.memory)
            notifier.notify(READY="1", STATUS=status, MAINPID=str(os.getpid()))
            log.info(
                "daemon.ready", extra=fields(version=__version__, relay=relay_url, admin=admin_bind)
            )
            interval = watchdog_interval()
            if interval is not None:
                nursery.start_soon(_watchdog, notifier, store, interval)
            nursery.start_soon(trim_periodically)  # freed memory back (see chatd.memory)
            await stopping.wait()
            notifier.notify(STOPPING="1", STATUS="draining connections")
            with trio.move_on_after(grace) as drain:
                await relay_done.wait()
                await admin_done.wait()
                await blobs_done.wait()
                await metrics_done.wait()
                # With no connection left, what the queues hold in memory
                # (envelopes waiting for acks, receipts) is written before
                # the store closes.
                await _flush_queues(queues)
            if drain.cancelled_caught:
                log.warning("daemon.grace_expired", extra=fields(grace_seconds=grace))
            nursery.cancel_scope.cancel()
    finally:
        activated.close_rest()
        notifier.close()
    log.info("daemon.stopped")
