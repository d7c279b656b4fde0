"""Consume events exactly once into Postgres: Kafka delivers at least once, outbox.consume_once()
turns duplicates into no-ops inside the transaction that applies the event.

BROKERS=host:9092 TOPIC=order.created DATABASE_URL=postgresql://... python3 docs/examples/consume.py
"""
import json
import os

import psycopg
from confluent_kafka import Consumer

consumer = Consumer({
    "bootstrap.servers": os.environ["BROKERS"],
    "group.id": os.environ.get("GROUP_ID", "billing"),
    "auto.offset.reset": "earliest",
    "enable.auto.commit": False,      # commit offsets only after the database transaction
})
consumer.subscribe([os.environ["TOPIC"]])
idle_polls = 0
with psycopg.connect(os.environ["DATABASE_URL"]) as conn:
    while idle_polls < int(os.environ.get("IDLE_POLLS", "1000000")):
        message = consumer.poll(1.0)
        if message is None or message.error():
            idle_polls += 1
            continue
        idle_polls = 0
        headers = {key: value.decode() for key, value in (message.headers() or [])}
        event = json.loads(message.value())
        with conn.transaction():
            first_time = conn.execute(
                "SELECT outbox.consume_once('billing', %s)", (headers["outbox-id"],)
            ).fetchone()[0]
            if first_time:
                conn.execute(
                    "INSERT INTO invoices (order_id, total) VALUES (%s, %s)",
                    (event["id"], event.get("total", 0)),
                )
        consumer.commit(message)
consumer.close()
