#!/usr/bin/env python3
"""An independent AMQP 0-9-1 client (pika) for the interop tests.

Run by tests/tests/interop_rabbitmq.rs with one JSON request on stdin;
answers with JSON lines on stdout. Bytes are hex, so every byte survives JSON.

Message format (what `produce` takes and `read` returns):
    {"fields": {"body": hex, <property>: value, ...},   # only the properties that are set:
               # content_type content_encoding delivery_mode priority correlation_id
               # reply_to expiration message_id timestamp type user_id app_id cluster_id
     "headers": [[name, typed], ...] | null,              # the table in wire order
     "meta": {"exchange", "routing_key", "redelivered"}}  # read only

A typed value is the AMQP field value exactly as on the wire (RabbitMQ's
reading of the field types), e.g. {"type": "S", "hex": "ff"}, {"type": "I",
"value": -5}, {"type": "d", "hex": "<8 bytes, big-endian>"}, {"type": "D",
"scale": 2, "value": 12345}, {"type": "A", "items": [typed, ...]},
{"type": "F", "fields": [[name, typed], ...]}, {"type": "V"}. Floats travel
as their bytes, so NaN and -0.0 compare exactly.

pika's own field codec cannot say everything a client may send (it has no
floats, encodes `bytes` only as `x`, negative 64-bit integers as the
non-RabbitMQ type `L`) and reads lossily (floats truncated, `b`/`B` swapped,
tables as dicts). So this script encodes and decodes header tables itself
and lets pika do the protocol: `pika.data.encode_table` takes a TypedTable,
and `decode_table` returns one while message properties are decoded.

    produce  {"url", "exchange", "routing_key", "messages": [message, ...]}
             publishes with confirms and `mandatory` -> {"produced": n}
    read     {"url", "exchange", "routing_key", "count", "timeout_s"}
             declares the exchange (durable topic, as the library does) and an
             exclusive auto-delete queue bound to it with `routing_key`, prints
             {"ready": true}, then reads until `count` messages or the timeout
             -> {"records": [message, ...]}
    cleanup  {"url", "queues": [...], "exchanges": [...]}
             deletes them (missing ones are fine) -> {"deleted": [...], "errors": [...]}
"""

import json
import struct
import sys
import time

import pika
import pika.data
import pika.spec

PROPERTIES = [
    "content_type",
    "content_encoding",
    "delivery_mode",
    "priority",
    "correlation_id",
    "reply_to",
    "expiration",
    "message_id",
    "timestamp",
    "type",
    "user_id",
    "app_id",
    "cluster_id",
]


class TypedTable(list):
    """An AMQP field table as [[name, typed], ...] in wire order (duplicates possible)."""


INTS = {"b": ">b", "B": ">B", "s": ">h", "u": ">H", "I": ">i", "i": ">I", "l": ">q", "T": ">Q"}
FLOATS = {"f": 4, "d": 8}


def encode_value(v):
    t = v["type"]
    tag = t.encode()
    if t == "t":
        return tag + struct.pack(">B", 1 if v["value"] else 0)
    if t in INTS:
        return tag + struct.pack(INTS[t], v["value"])
    if t in FLOATS:
        raw = bytes.fromhex(v["hex"])
        assert len(raw) == FLOATS[t], f"{t} needs {FLOATS[t]} bytes"
        return tag + raw
    if t == "D":
        return tag + struct.pack(">BI", v["scale"], v["value"])
    if t in ("S", "x"):
        raw = bytes.fromhex(v["hex"])
        return tag + struct.pack(">I", len(raw)) + raw
    if t == "A":
        items = b"".join(encode_value(i) for i in v["items"])
        return tag + struct.pack(">I", len(items)) + items
    if t == "F":
        return tag + encode_table_bytes(v["fields"])
    if t == "V":
        return tag
    raise ValueError(f"unknown AMQP field type {t!r}")


def encode_table_bytes(fields):
    body = b""
    for name, value in fields:
        n = name.encode()
        body += struct.pack(">B", len(n)) + n + encode_value(value)
    return struct.pack(">I", len(body)) + body


def decode_value(buf, off):
    t = chr(buf[off])
    off += 1
    if t == "t":
        return {"type": t, "value": buf[off] != 0}, off + 1
    if t in INTS:
        fmt = INTS[t]
        (value,) = struct.unpack_from(fmt, buf, off)
        return {"type": t, "value": value}, off + struct.calcsize(fmt)
    if t in FLOATS:
        n = FLOATS[t]
        return {"type": t, "hex": bytes(buf[off : off + n]).hex()}, off + n
    if t == "D":
        scale, value = struct.unpack_from(">BI", buf, off)
        return {"type": t, "scale": scale, "value": value}, off + 5
    if t in ("S", "x"):
        (n,) = struct.unpack_from(">I", buf, off)
        off += 4
        return {"type": t, "hex": bytes(buf[off : off + n]).hex()}, off + n
    if t == "A":
        (n,) = struct.unpack_from(">I", buf, off)
        off += 4
        end = off + n
        items = []
        while off < end:
            item, off = decode_value(buf, off)
            items.append(item)
        return {"type": t, "items": items}, off
    if t == "F":
        fields, off = decode_table_list(buf, off)
        return {"type": t, "fields": fields}, off
    if t == "V":
        return {"type": t}, off
    raise ValueError(f"unknown AMQP field type {t!r} at {off - 1}")


def decode_table_list(buf, off):
    (n,) = struct.unpack_from(">I", buf, off)
    off += 4
    end = off + n
    fields = TypedTable()
    while off < end:
        ln = buf[off]
        name = bytes(buf[off + 1 : off + 1 + ln]).decode("utf-8", "surrogateescape")
        off += 1 + ln
        value, off = decode_value(buf, off)
        fields.append([name, value])
    return fields, off


_pika_encode_table = pika.data.encode_table
_pika_decode_table = pika.data.decode_table
_typed_decoding = False


def patched_encode_table(pieces, table):
    if isinstance(table, TypedTable):
        raw = encode_table_bytes(table)
        pieces.append(raw)
        return len(raw)
    return _pika_encode_table(pieces, table)


def patched_decode_table(encoded, offset):
    if _typed_decoding:
        return decode_table_list(encoded, offset)
    return _pika_decode_table(encoded, offset)


_pika_props_decode = pika.spec.BasicProperties.decode


def typed_props_decode(self, encoded, offset=0):
    global _typed_decoding
    _typed_decoding = True
    try:
        return _pika_props_decode(self, encoded, offset)
    finally:
        _typed_decoding = False


pika.data.encode_table = patched_encode_table
pika.data.decode_table = patched_decode_table
pika.spec.BasicProperties.decode = typed_props_decode


def out(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def connect(url):
    params = pika.URLParameters(url)
    params.connection_attempts = 3
    params.retry_delay = 1
    return pika.BlockingConnection(params)


def produce(req):
    conn = connect(req["url"])
    ch = conn.channel()
    ch.confirm_delivery()
    for m in req["messages"]:
        f = dict(m["fields"])
        body = bytes.fromhex(f.pop("body"))
        unknown = set(f) - set(PROPERTIES)
        assert not unknown, f"unknown properties {unknown}"
        headers = m.get("headers")
        props = pika.BasicProperties(
            headers=None if headers is None else TypedTable(headers), **f
        )
        # Confirmed, and an error if no queue is bound (mandatory).
        ch.basic_publish(req["exchange"], req["routing_key"], body, props, mandatory=True)
    conn.close()
    out({"produced": len(req["messages"])})


def record(method, props, body):
    fields = {"body": bytes(body).hex()}
    for p in PROPERTIES:
        v = getattr(props, p)
        if v is not None:
            fields[p] = v if not isinstance(v, bytes) else v.decode("utf-8", "surrogateescape")
    return {
        "fields": fields,
        "headers": props.headers,
        "meta": {
            "exchange": method.exchange,
            "routing_key": method.routing_key,
            "redelivered": method.redelivered,
        },
    }


def read(req):
    conn = connect(req["url"])
    ch = conn.channel()
    ch.exchange_declare(req["exchange"], exchange_type="topic", durable=True)
    q = ch.queue_declare("", exclusive=True, auto_delete=True).method.queue
    ch.queue_bind(q, req["exchange"], routing_key=req["routing_key"])
    out({"ready": True, "queue": q})
    deadline = time.monotonic() + float(req.get("timeout_s", 30))
    records = []
    for method, props, body in ch.consume(q, auto_ack=False, inactivity_timeout=0.2):
        if method is not None:
            records.append(record(method, props, body))
            ch.basic_ack(method.delivery_tag)
        if len(records) >= req["count"] or time.monotonic() > deadline:
            break
    ch.cancel()
    conn.close()
    out({"records": records})


def cleanup(req):
    conn = connect(req["url"])
    deleted, errors = [], []
    for kind, names in (("queue", req.get("queues", [])), ("exchange", req.get("exchanges", []))):
        for name in names:
            # A failed operation closes its channel: one channel each.
            ch = conn.channel()
            try:
                if kind == "queue":
                    ch.queue_delete(name)
                else:
                    ch.exchange_delete(name)
                deleted.append(name)
                ch.close()
            except Exception as e:  # noqa: BLE001 - reported, not fatal
                errors.append(f"{kind} {name}: {e}")
    conn.close()
    out({"deleted": deleted, "errors": errors})


def main():
    cmd = sys.argv[1]
    req = json.load(sys.stdin)
    {"produce": produce, "read": read, "cleanup": cleanup}[cmd](req)


if __name__ == "__main__":
    main()
