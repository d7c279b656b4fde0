// Emit an event in the same transaction as the business write (Go, pgx v4; v5 is the same
// apart from the import path).
// DATABASE_URL=postgresql://... go run docs/examples/emit.go
package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"

	"github.com/jackc/pgx/v4"
)

func main() {
	ctx := context.Background()
	conn, err := pgx.Connect(ctx, os.Getenv("DATABASE_URL"))
	if err != nil {
		panic(err)
	}
	defer conn.Close(ctx)

	eventID, err := placeOrder(ctx, conn)
	if err != nil {
		panic(err)
	}
	fmt.Println(eventID)

	// A transaction that fails takes its event with it: nothing is published.
	if err := failedOrder(ctx, conn); err == nil {
		panic("the failed order should have failed")
	}
}

func placeOrder(ctx context.Context, conn *pgx.Conn) (string, error) {
	tx, err := conn.Begin(ctx)
	if err != nil {
		return "", err
	}
	defer tx.Rollback(ctx) // no-op after Commit; otherwise the event goes with the transaction

	var orderID int64
	if err := tx.QueryRow(ctx,
		"INSERT INTO orders (customer, total) VALUES ($1, $2) RETURNING id", "go", 42).Scan(&orderID); err != nil {
		return "", err
	}
	payload, _ := json.Marshal(map[string]any{"id": orderID, "customer": "go"})
	var eventID string
	if err := tx.QueryRow(ctx,
		"SELECT outbox.emit($1, $2::bigint, $3::jsonb)::text", "order.created", orderID, string(payload)).Scan(&eventID); err != nil {
		return "", err
	}
	return eventID, tx.Commit(ctx)
}

func failedOrder(ctx context.Context, conn *pgx.Conn) error {
	tx, err := conn.Begin(ctx)
	if err != nil {
		return err
	}
	defer tx.Rollback(ctx)
	if _, err := tx.Exec(ctx, "SELECT outbox.emit('order.created', 0, '{}')"); err != nil {
		return err
	}
	return errors.New("payment failed")
}
