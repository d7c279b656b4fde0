//! The documentation's examples run against a real cluster and broker: emitting from psql,
//! Python (psycopg), Node (pg), Java (JDBC) and Go (pgx, from Debian's packages in GOPATH mode:
//! the Go module proxy is not reachable from the build machines), and consuming once with Python.

use outbox_pg_harness::process::run;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use outbox_pg_harness::*;

const TIMEOUT: Duration = Duration::from_secs(60);

fn examples() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../docs/examples")
}

fn tools() -> PathBuf {
    std::env::var_os("OUTBOX_TOOLS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/outbox_pg"))
}

#[test]
fn emit_examples_in_every_language_publish_their_events() {
    let tansu = Tansu::start();
    tansu.create_topic("order.created", 3);
    let cluster = PgCluster::publishing_to(&tansu.bootstrap(), &[]);
    let mut db = cluster.connect();
    db.batch_execute(
        "CREATE EXTENSION outbox_pg;
         CREATE TABLE orders (id bigserial PRIMARY KEY, customer text NOT NULL, total numeric NOT NULL);
         CREATE TABLE invoices (order_id bigint, total numeric);
         -- The consumer of docs/consuming.md: a role, and the login role it runs as.
         CREATE ROLE billing NOLOGIN;
         CREATE ROLE billing_service LOGIN IN ROLE billing;
         GRANT INSERT ON invoices TO billing;",
    )
    .unwrap();
    let url = format!("postgresql://postgres@127.0.0.1:{}/postgres", cluster.port);
    let consumer_url = format!(
        "postgresql://billing_service@127.0.0.1:{}/postgres",
        cluster.port
    );

    run(Command::new("psql")
        .args([&url, "-X", "-q", "-v", "ON_ERROR_STOP=1", "-f"])
        .arg(examples().join("emit.sql")));
    run(Command::new(tools().join("venv/bin/python"))
        .arg(examples().join("emit.py"))
        .env("DATABASE_URL", &url));
    run(Command::new("node")
        .arg(examples().join("emit.js"))
        .env("DATABASE_URL", &url)
        .env("NODE_PATH", tools().join("node/node_modules")));
    run(Command::new("java")
        .args(["-cp", "/usr/share/java/postgresql.jar"])
        .arg(examples().join("Emit.java"))
        .arg(format!(
            "jdbc:postgresql://127.0.0.1:{}/postgres?user=postgres",
            cluster.port
        )));
    run(Command::new("go")
        .arg("run")
        .arg(examples().join("emit.go"))
        .env("DATABASE_URL", &url)
        .env("GO111MODULE", "off")
        .env("GOPATH", "/usr/share/gocode")
        .env("GOCACHE", tools().join("go-build"))
        .env("GOFLAGS", ""));

    let customers: Vec<String> = column(&mut db, "SELECT o.customer FROM outbox.events e JOIN orders o ON o.id::text = e.aggregate_id ORDER BY e.seq");
    assert_eq!(
        customers,
        ["psql", "python", "node", "java", "go"],
        "one event per committed order, none for rollbacks"
    );
    assert!(wait_until_published(&mut db, TIMEOUT));

    // consume.py applies each event once, however often it is delivered: a second consumer group
    // reads the whole topic again, as a redelivery would.
    for group in ["billing", "billing-replay"] {
        run(Command::new(tools().join("venv/bin/python"))
            .arg(examples().join("consume.py"))
            .env("DATABASE_URL", &consumer_url)
            .env("BROKERS", tansu.bootstrap())
            .env("TOPIC", "order.created")
            .env("GROUP_ID", group)
            .env("IDLE_POLLS", "5"));
    }
    let invoices: i64 = db
        .query_one("SELECT count(*) FROM invoices", &[])
        .unwrap()
        .get(0);
    assert_eq!(invoices, 5);
    let seen: i64 = db
        .query_one(
            "SELECT count(*) FROM outbox.inbox WHERE consumer = 'billing'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(seen, 5);
}
