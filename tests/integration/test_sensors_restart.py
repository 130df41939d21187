"""Durability: device readings that got a 200 (or an ack) survive ``kill -9``."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest
import websockets

from tests.clients import request
from tests.servers import free_port, start_server

KEY = "restart-test-key"
SENSOR_ARGS = ("--ingest_key=%s" % KEY, "--host_metrics=false", "--sensor_window=300",
               "--simulated_sensors=id=sim.a hz=1 model=sine")




def call(port: int, method: str, path: str, body=None, key: str | None = KEY) -> tuple[int, Any]:
    """(status, JSON body), with ``key`` as the Bearer token."""
    reply = request(port, path, method, body, {"Authorization": "Bearer " + key} if key else None)
    return reply.status, reply.body


async def publish_over_ws(port: int, points: list[list[float]]) -> dict:
    async with websockets.connect("ws://127.0.0.1:%d/ws/sensors?key=%s" % (port, KEY)) as ws:
        json.loads(await ws.recv())  # welcome
        await ws.send(json.dumps({"type": "publish", "sensor": "dev.ws", "points": points, "ref": 1}))
        while True:
            msg = json.loads(await asyncio.wait_for(ws.recv(), 5))
            if msg["type"] in ("ack", "error"):
                return msg


@pytest.mark.slow
def test_acknowledged_readings_and_metadata_survive_sigkill(tmp_path):
    port = free_port()
    data = str(tmp_path / "data")
    with start_server(port, data, *SENSOR_ARGS) as proc:
        now = time.time()
        assert call(port, "PUT", "/api/sensors/dev.http", {"label": "Boiler", "unit": "°C"})[0] == 201
        sent = []
        for i in range(20):
            pts = [[round(now - 20 + i + j / 10, 3), float(i * 10 + j)] for j in range(10)]
            status, body = call(port, "POST", "/api/sensors/dev.http/readings", pts)
            assert (status, body["stored"]) == (200, 10)
            sent += pts
        ws_points = [[round(now - 1 + j / 10, 3), -float(j)] for j in range(5)]
        ack = asyncio.run(publish_over_ws(port, ws_points))
        assert ack == {"type": "ack", "sensor": "dev.ws", "stored": 5, "ref": 1}
        proc.kill()  # no graceful shutdown, no flush: the instant the last 200/ack is in
        proc.start()
        status, body = call(port, "GET", "/api/sensors/dev.http/readings?limit=10000", key=None)
        assert status == 200
        assert body["points"] == sent
        status, body = call(port, "GET", "/api/sensors/dev.ws/readings", key=None)
        assert body["points"] == ws_points
        status, body = call(port, "GET", "/api/sensors", key=None)
        listed = {s["id"]: s for s in body["sensors"]}
        assert listed["dev.http"]["label"] == "Boiler" and listed["dev.http"]["unit"] == "°C"
        assert listed["dev.http"]["latest"] == sent[-1]
        assert "sim.a" in listed

        # A viewer's backfill after the restart includes the stored readings.
        async def backfill():
            async with websockets.connect("ws://127.0.0.1:%d/ws/sensors" % port) as ws:
                welcome = json.loads(await ws.recv())
                assert "dev.ws" in {s["id"] for s in welcome["sensors"]}
                await ws.send(json.dumps({"type": "subscribe", "sensors": ["dev.ws"], "backfill": 60}))
                while True:
                    msg = json.loads(await asyncio.wait_for(ws.recv(), 5))
                    if msg["type"] == "backfill":
                        return msg["points"]

        assert asyncio.run(backfill()) == ws_points
        # Deleting is durable too.
        assert call(port, "DELETE", "/api/sensors/dev.ws")[0] == 200
        proc.kill()
        proc.start()
        assert call(port, "GET", "/api/sensors/dev.ws", key=None)[0] == 404
        assert call(port, "GET", "/api/sensors/dev.http", key=None)[0] == 200
