-- Emit an event in the same transaction as the business write (psql).
-- psql "$DATABASE_URL" -v ON_ERROR_STOP=1 -f docs/examples/emit.sql
BEGIN;
INSERT INTO orders (customer, total) VALUES ('psql', 42.00) RETURNING id \gset
SELECT outbox.emit('order.created', :id, jsonb_build_object('id', :id, 'customer', 'psql', 'total', 42.00));
COMMIT;

-- A rolled-back transaction publishes nothing: neither the order nor its event exists.
BEGIN;
INSERT INTO orders (customer, total) VALUES ('psql-rolled-back', 1) RETURNING id \gset
SELECT outbox.emit('order.created', :id, jsonb_build_object('id', :id));
ROLLBACK;
