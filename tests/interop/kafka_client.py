#!/usr/bin/env python3
"""An independent Kafka client (confluent-kafka) for the interop tests.

Run by tests/tests/interop_kafka.rs with one JSON request on stdin; answers
with JSON lines on stdout. Bytes are hex, so every byte survives JSON.

Record format (what `produce` takes and `read` returns):
    {"fields": {"key": hex|null, "value": hex|null, "timestamp": ms|null},
     "headers": [[name, hex|null], ...],        # in order, duplicates kept, null values
     "meta": {"partition": p, "offset": o, "timestamp_type": t}}   # read only

    produce  {"brokers", "topic", "records": [record, ...]}
             -> {"produced": [{"partition", "offset"}, ...]}
    read     {"brokers", "topic", "count", "timeout_s"}
             once the topic's partitions are known prints {"ready": true}, then
             reads them from the beginning (no consumer group: assign, never
             commit) until `count` records or the timeout
             -> {"records": [record, ...]} sorted by (partition, offset)
"""

import json
import sys
import time
import uuid

from confluent_kafka import (
    OFFSET_BEGINNING,
    TIMESTAMP_NOT_AVAILABLE,
    Consumer,
    KafkaException,
    Producer,
    TopicPartition,
)


def unhex(v):
    return None if v is None else bytes.fromhex(v)


def tohex(v):
    return None if v is None else bytes(v).hex()


def out(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def produce(req):
    p = Producer(
        {
            "bootstrap.servers": req["brokers"],
            "client.id": "interop-python-producer",
            "acks": "all",
            "enable.idempotence": False,
            "linger.ms": 0,
            "message.timeout.ms": 30000,
        }
    )
    reports = [None] * len(req["records"])
    errors = []

    def on_delivery(i):
        def cb(err, msg):
            if err is not None:
                errors.append(f"record {i}: {err}")
            else:
                reports[i] = {"partition": msg.partition(), "offset": msg.offset()}

        return cb

    for i, rec in enumerate(req["records"]):
        f = rec.get("fields", {})
        kwargs = {
            "value": unhex(f.get("value")),
            "key": unhex(f.get("key")),
            "headers": [(n, unhex(v)) for n, v in rec.get("headers", [])],
            "on_delivery": on_delivery(i),
        }
        if f.get("timestamp") is not None:
            kwargs["timestamp"] = f["timestamp"]
        if rec.get("partition") is not None:
            kwargs["partition"] = rec["partition"]
        p.produce(req["topic"], **kwargs)
    left = p.flush(30)
    if left or errors or any(r is None for r in reports):
        raise SystemExit(f"produce failed: {left} undelivered; errors: {errors}")
    out({"produced": reports})


def read(req):
    c = Consumer(
        {
            "bootstrap.servers": req["brokers"],
            "client.id": "interop-python-reader",
            # Required by the client; never joined (assign) and never committed.
            "group.id": "interop-python-" + uuid.uuid4().hex,
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
        }
    )
    deadline = time.monotonic() + float(req.get("timeout_s", 30))
    topic = req["topic"]
    partitions = None
    while partitions is None:
        try:
            md = c.list_topics(topic, timeout=5)
            t = md.topics.get(topic)
            if t is not None and t.error is None and t.partitions:
                partitions = sorted(t.partitions)
        except KafkaException:
            pass
        if partitions is None:
            if time.monotonic() > deadline:
                raise SystemExit(f"topic {topic} has no partitions (metadata)")
            time.sleep(0.2)
    c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
    out({"ready": True})
    records = []
    while len(records) < req["count"] and time.monotonic() < deadline:
        msg = c.poll(0.2)
        if msg is None:
            continue
        if msg.error() is not None:
            # End of partition and similar are informational here.
            if msg.error().fatal():
                raise SystemExit(f"consume failed: {msg.error()}")
            continue
        ts_type, ts = msg.timestamp()
        records.append(
            {
                "fields": {
                    "key": tohex(msg.key()),
                    "value": tohex(msg.value()),
                    "timestamp": None if ts_type == TIMESTAMP_NOT_AVAILABLE else ts,
                },
                "headers": [[n, tohex(v)] for n, v in (msg.headers() or [])],
                "meta": {
                    "partition": msg.partition(),
                    "offset": msg.offset(),
                    "timestamp_type": ts_type,
                },
            }
        )
    c.close()
    records.sort(key=lambda r: (r["meta"]["partition"], r["meta"]["offset"]))
    out({"records": records})


def main():
    cmd = sys.argv[1]
    req = json.load(sys.stdin)
    {"produce": produce, "read": read}[cmd](req)


if __name__ == "__main__":
    main()
