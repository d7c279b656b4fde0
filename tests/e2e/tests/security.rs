//! The privilege model, and functions with elevated rights that look-alike objects cannot hijack.

use std::time::Duration;

use outbox_pg_harness::*;

const TIMEOUT: Duration = Duration::from_secs(60);

fn code(result: Result<(), postgres::Error>) -> String {
    match result {
        Ok(()) => "ok".to_string(),
        Err(e) => e
            .code()
            .map(|c| c.code().to_string())
            .unwrap_or_else(|| e.to_string()),
    }
}

#[test]
fn roles_emit_by_default_and_need_grants_for_everything_else() {
    let cluster = PgCluster::start(&[("outbox.database", "parked")]);
    let mut admin = cluster.connect();
    admin
        .batch_execute(
            "CREATE EXTENSION outbox_pg;
             CREATE ROLE app LOGIN; CREATE ROLE reader LOGIN; CREATE ROLE ops LOGIN;
             SELECT outbox.emit('t', 'seed', '{}');",
        )
        .unwrap();
    let as_role = |role: &str, sql: &str| -> String {
        let mut db = cluster.connect();
        code(db.batch_execute(&format!("SET ROLE {role}; {sql}")))
    };

    // Every role that can connect may emit; nobody but the owner touches the table directly.
    assert_eq!(
        as_role("app", "SELECT outbox.emit('t', 'from-app', '{}')"),
        "ok"
    );
    for sql in [
        "SELECT * FROM outbox.events",
        "INSERT INTO outbox.events (id, event_type, aggregate_id, payload) VALUES (gen_random_uuid(), 't', 'x', '{}')",
        "UPDATE outbox.events SET xid = NULL",
        "DELETE FROM outbox.events",
        "TRUNCATE outbox.events",
        "INSERT INTO outbox.control DEFAULT VALUES",
        "SELECT * FROM outbox.parked",
        "DELETE FROM outbox.parked",
        "INSERT INTO outbox.batches (below, event_ids, partitions, offsets) VALUES ('1:1:', '{}', '{}', '{}')",
        "SELECT * FROM outbox.pending",
        "SELECT * FROM outbox.deliveries",
        "SELECT outbox.discard(gen_random_uuid())",
        "SELECT outbox.advance_keys('{}')",
        "SELECT * FROM outbox.dead_letters",
        "SELECT * FROM outbox.status",
        "SELECT outbox.pause()",
        "SELECT outbox.resume()",
        "SELECT outbox.retry_dead()",
        "SELECT outbox.retry(gen_random_uuid())",
        "SELECT outbox.wake()",
        "CREATE TABLE outbox.mine (x int)",
    ] {
        assert_eq!(as_role("app", sql), "42501", "app: {sql}");
    }

    // Emitting is revocable; reading and operating are granted explicitly.
    admin
        .batch_execute(
            "REVOKE EXECUTE ON FUNCTION outbox.emit(text, text, jsonb, jsonb, text),
                                        outbox.emit(text, uuid, jsonb, jsonb, text),
                                        outbox.emit(text, bigint, jsonb, jsonb, text) FROM PUBLIC;
             GRANT EXECUTE ON FUNCTION outbox.emit(text, text, jsonb, jsonb, text) TO app;
             GRANT SELECT ON outbox.events, outbox.dead_letters TO reader;
             GRANT EXECUTE ON FUNCTION outbox.pause(), outbox.resume(), outbox.wake() TO ops;",
        )
        .unwrap();
    assert_eq!(
        as_role("reader", "SELECT outbox.emit('t', 'x', '{}')"),
        "42501"
    );
    assert_eq!(as_role("app", "SELECT outbox.emit('t', 'x', '{}')"), "ok");
    assert_eq!(
        as_role("app", "SELECT outbox.emit('t', 1, '{}')"),
        "42501",
        "only the granted overload"
    );
    assert_eq!(
        as_role("reader", "SELECT count(*) FROM outbox.events"),
        "ok"
    );
    assert_eq!(as_role("reader", "DELETE FROM outbox.events"), "42501");
    assert_eq!(
        as_role("ops", "SELECT outbox.pause(); SELECT outbox.resume()"),
        "ok"
    );
    assert_eq!(as_role("ops", "SELECT outbox.retry_dead()"), "42501");
    let rows: i64 = admin
        .query_one("SELECT count(*) FROM outbox.events", &[])
        .unwrap()
        .get(0);
    assert_eq!(rows, 3);
}

#[test]
fn look_alike_objects_cannot_hijack_functions_with_elevated_rights() {
    let tansu = Tansu::start();
    tansu.create_topic("t", 1);
    let cluster = PgCluster::publishing_to(&tansu.bootstrap(), &[]);
    let mut admin = cluster.connect();
    admin
        .batch_execute(
            "CREATE EXTENSION outbox_pg;
             CREATE ROLE mallory LOGIN;
             GRANT CREATE ON SCHEMA public TO mallory;
             CREATE TABLE public.hijacked (what text);
             GRANT INSERT ON public.hijacked TO mallory;
             GRANT EXECUTE ON FUNCTION outbox.retry(uuid), outbox.pause(), outbox.resume() TO mallory;",
        )
        .unwrap();
    // Mallory plants look-alikes of everything the functions use, in public and in pg_temp.
    let mut mallory = cluster.connect();
    mallory
        .batch_execute(
            "SET ROLE mallory;
             CREATE TABLE public.events (id uuid, event_type text, aggregate_id text, payload jsonb,
                                         published_at timestamptz, publish_attempts int,
                                         next_attempt_at timestamptz, seq bigint, error text);
             CREATE TABLE public.control (singleton boolean, paused boolean, paused_at timestamptz, paused_by text);
             CREATE FUNCTION public.now() RETURNS timestamptz LANGUAGE sql
                 AS $$ INSERT INTO public.hijacked VALUES ('now'); SELECT 'epoch'::timestamptz $$;
             CREATE FUNCTION public.wake() RETURNS boolean LANGUAGE sql
                 AS $$ INSERT INTO public.hijacked VALUES ('wake'); SELECT true $$;
             CREATE FUNCTION public.uuid_eq(uuid, uuid) RETURNS boolean LANGUAGE sql
                 AS $$ INSERT INTO public.hijacked VALUES ('uuid ='); SELECT true $$;
             CREATE OPERATOR public.= (LEFTARG = uuid, RIGHTARG = uuid, FUNCTION = public.uuid_eq);
             CREATE FUNCTION public.int4eq(integer, integer) RETURNS boolean LANGUAGE sql
                 AS $$ INSERT INTO public.hijacked VALUES ('int ='); SELECT true $$;
             CREATE OPERATOR public.= (LEFTARG = integer, RIGHTARG = integer, FUNCTION = public.int4eq);
             CREATE TEMP TABLE events (id uuid);
             CREATE FUNCTION pg_temp.now() RETURNS timestamptz LANGUAGE sql AS $$ SELECT 'epoch'::timestamptz $$;
             SET search_path = pg_temp, public, outbox, pg_catalog;",
        )
        .unwrap();

    // emit() as mallory, and the admin functions granted to her, with her search path.
    let id: String = mallory
        .query_one("SELECT outbox.emit('t', 'm', '{\"x\": 1}')::text", &[])
        .unwrap()
        .get(0);
    mallory
        .batch_execute("SELECT outbox.pause(); SELECT outbox.resume();")
        .unwrap();
    let retried = mallory.batch_execute(&format!("SELECT outbox.retry('{id}')"));
    assert!(retried.is_ok(), "{retried:?}");

    let hijacked: i64 = admin
        .query_one("SELECT count(*) FROM public.hijacked", &[])
        .unwrap()
        .get(0);
    assert_eq!(hijacked, 0, "no look-alike ran with elevated rights");
    let in_outbox: i64 = admin
        .query_one(
            "SELECT count(*) FROM outbox.events WHERE id = $1::text::uuid",
            &[&id],
        )
        .unwrap()
        .get(0);
    assert_eq!(in_outbox, 1, "emit() wrote to outbox.events");
    let look_alike: i64 = admin
        .query_one("SELECT count(*) FROM public.events", &[])
        .unwrap()
        .get(0);
    assert_eq!(look_alike, 0);
    let created_at_is_real: bool = admin
        .query_one("SELECT created_at > now() - interval '1 hour' FROM outbox.events WHERE id = $1::text::uuid", &[&id])
        .unwrap()
        .get(0);
    assert!(created_at_is_real, "the default now() was pg_catalog's");
    let mut db = cluster.connect();
    assert!(wait_until_published(&mut db, TIMEOUT));

    // The definitions pin search_path (or, for emit(), pin it in C and resolve nothing at call time).
    let unpinned: i64 = admin
        .query_one(
            "SELECT count(*) FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
             WHERE n.nspname = 'outbox' AND p.prosecdef AND p.prolang <> (SELECT oid FROM pg_language WHERE lanname = 'c')
               AND NOT coalesce(p.proconfig::text LIKE '%search_path=pg_catalog, pg_temp%', false)",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(
        unpinned, 0,
        "every SQL-level SECURITY DEFINER function pins search_path"
    );
}
