// Emit an event in the same transaction as the business write (Node.js, node-postgres).
// DATABASE_URL=postgresql://... node docs/examples/emit.js
const { Client } = require('pg');

async function main() {
  const client = new Client({ connectionString: process.env.DATABASE_URL });
  await client.connect();
  try {
    await client.query('BEGIN');
    const order = await client.query(
      'INSERT INTO orders (customer, total) VALUES ($1, $2) RETURNING id', ['node', 42]);
    const orderId = order.rows[0].id;
    const event = await client.query(
      'SELECT outbox.emit($1, $2::bigint, $3::jsonb) AS id',
      ['order.created', orderId, JSON.stringify({ id: orderId, customer: 'node' })]);
    await client.query('COMMIT');
    console.log(event.rows[0].id);
  } catch (error) {
    await client.query('ROLLBACK'); // the event goes with the transaction
    throw error;
  } finally {
    await client.end();
  }
}

main().catch((error) => { console.error(error); process.exit(1); });
