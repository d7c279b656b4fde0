"""Emit an event in the same transaction as the business write (Python, psycopg 3).

DATABASE_URL=postgresql://... python3 docs/examples/emit.py
"""
import json
import os

import psycopg

with psycopg.connect(os.environ["DATABASE_URL"]) as conn:
    with conn.transaction():  # commits at the end of the block, rolls back on an exception
        order_id = conn.execute(
            "INSERT INTO orders (customer, total) VALUES (%s, %s) RETURNING id", ("python", 42)
        ).fetchone()[0]
        event_id = conn.execute(
            "SELECT outbox.emit(%s, %s, %s::jsonb)",
            ("order.created", order_id, json.dumps({"id": order_id, "customer": "python"})),
        ).fetchone()[0]
    print(event_id)

    try:
        with conn.transaction():
            conn.execute("SELECT outbox.emit('order.created', 0, '{}')")
            raise RuntimeError("payment failed")  # the event is rolled back with the transaction
    except RuntimeError:
        pass
