// Emit an event in the same transaction as the business write (Go, pgx v5).
// DATABASE_URL=postgresql://... go run docs/examples/emit.go
package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"

	"github.com/jackc/pgx/v5"
)

func main() {
	ctx := context.Background()
	conn, err := pgx.Connect(ctx, os.Getenv("DATABASE_URL"))
	if err != nil {
		panic(err)
	}
	defer conn.Close(ctx)

	tx, err := conn.Begin(ctx)
	if err != nil {
		panic(err)
	}
	defer tx.Rollback(ctx) // no-op after Commit; otherwise the event goes with the transaction

	var orderID int64
	if err := tx.QueryRow(ctx,
		"INSERT INTO orders (customer, total) VALUES ($1, $2) RETURNING id", "go", 42).Scan(&orderID); err != nil {
		panic(err)
	}
	payload, _ := json.Marshal(map[string]any{"id": orderID, "customer": "go"})
	var eventID string
	if err := tx.QueryRow(ctx,
		"SELECT outbox.emit($1, $2::bigint, $3::jsonb)::text", "order.created", orderID, string(payload)).Scan(&eventID); err != nil {
		panic(err)
	}
	if err := tx.Commit(ctx); err != nil {
		panic(err)
	}
	fmt.Println(eventID)
}
