//! Real Kafka-protocol brokers: Tansu (a separate process) and librdkafka's mock cluster
//! (in this process, real TCP listeners, with fault injection).

use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::{free_port, wait_until};

pub use rdkafka::mocking::MockCluster;

fn tansu_bin() -> PathBuf {
    if let Some(path) = std::env::var_os("OUTBOX_TANSU") {
        return PathBuf::from(path);
    }
    let cargo_bin =
        PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cargo/bin/tansu");
    if cargo_bin.exists() {
        cargo_bin
    } else {
        PathBuf::from("tansu")
    }
}

/// A Tansu broker with in-memory storage on 127.0.0.1.
pub struct Tansu {
    pub port: u16,
    child: Option<Child>,
}

impl Tansu {
    pub fn start() -> Self {
        Self::start_on(free_port())
    }

    pub fn start_on(port: u16) -> Self {
        let url = format!("tcp://127.0.0.1:{port}");
        let child = Command::new(tansu_bin())
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
            ])
            .args(["--storage-engine", "memory://tansu/"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start tansu (see DEVELOPERS.md to install it)");
        let broker = Tansu {
            port,
            child: Some(child),
        };
        assert!(
            wait_until(Duration::from_secs(30), || TcpStream::connect((
                "127.0.0.1",
                port
            ))
            .is_ok()),
            "tansu did not start listening on {port}"
        );
        broker
    }

    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn create_topic(&self, name: &str, partitions: i32) {
        let output = Command::new(tansu_bin())
            .args([
                "topic",
                "create",
                "--broker",
                &format!("tcp://127.0.0.1:{}", self.port),
            ])
            .args(["--partitions", &partitions.to_string(), name])
            .output()
            .expect("tansu topic create");
        assert!(
            output.status.success(),
            "creating topic {name}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Tansu {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A mock cluster with `topics` (name, partitions) created up front.
pub fn mock_cluster(
    topics: &[(&str, i32)],
) -> MockCluster<'static, rdkafka::producer::DefaultProducerContext> {
    let cluster = MockCluster::new(1).expect("mock cluster");
    for (name, partitions) in topics {
        cluster
            .create_topic(name, *partitions, 1)
            .expect("mock topic");
    }
    cluster
}

/// TLS in front of a plaintext broker port (socat), with a fresh self-signed certificate for
/// 127.0.0.1. Tansu 0.6.0 cannot terminate TLS itself: its CLI puts --cert and --key in one
/// mutually exclusive group, so at most one of them can be given.
pub struct TlsProxy {
    pub port: u16,
    /// The self-signed certificate, to trust as the CA.
    pub ca: PathBuf,
    dir: PathBuf,
    child: Child,
}

impl TlsProxy {
    /// Listens on `port` with TLS and forwards to 127.0.0.1:`target`.
    pub fn start(port: u16, target: u16) -> Self {
        let dir = std::env::temp_dir().join(format!("outbox-tls-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let status = Command::new("openssl")
            .args([
                "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            ])
            .args([
                "-subj",
                "/CN=127.0.0.1",
                "-addext",
                "subjectAltName=IP:127.0.0.1",
            ])
            .arg("-keyout")
            .arg(dir.join("key.pem"))
            .arg("-out")
            .arg(dir.join("cert.pem"))
            .stderr(Stdio::null())
            .status()
            .expect("openssl");
        assert!(status.success(), "openssl req");
        let mut both = std::fs::read(dir.join("cert.pem")).unwrap();
        both.extend(std::fs::read(dir.join("key.pem")).unwrap());
        std::fs::write(dir.join("both.pem"), both).unwrap();
        let child = Command::new("socat")
            .arg(format!(
                "OPENSSL-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork,verify=0,cert={}",
                dir.join("both.pem").display()
            ))
            .arg(format!("TCP:127.0.0.1:{target}"))
            .stderr(Stdio::null())
            .spawn()
            .expect("socat (apt-get install socat)");
        assert!(
            wait_until(Duration::from_secs(10), || TcpStream::connect((
                "127.0.0.1",
                port
            ))
            .is_ok()),
            "socat did not listen on {port}"
        );
        TlsProxy {
            port,
            ca: dir.join("cert.pem"),
            dir,
            child,
        }
    }
}

impl Drop for TlsProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Tansu {
    /// A Tansu broker that advertises `advertised_port` (where a proxy forwards to it).
    pub fn start_behind(advertised_port: u16) -> Self {
        let port = free_port();
        let listen = format!("tcp://127.0.0.1:{port}");
        let advertised = format!("tcp://127.0.0.1:{advertised_port}");
        let child = Command::new(tansu_bin())
            .args([
                "broker",
                "--listener-url",
                &listen,
                "--advertised-listener-url",
                &advertised,
            ])
            .args(["--storage-engine", "memory://tansu/"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start tansu");
        let broker = Tansu {
            port,
            child: Some(child),
        };
        assert!(wait_until(Duration::from_secs(30), || TcpStream::connect(
            ("127.0.0.1", port)
        )
        .is_ok()));
        broker
    }
}

/// librdkafka's mock cluster driven through its C API, for what rdkafka's wrapper does not
/// offer: per-broker error stacks that can be counted, so a test proves its injected errors were
/// hit (consumed by real produce requests) rather than merely pushed.
pub struct CountedMock {
    cluster: *mut rdkafka::bindings::rd_kafka_mock_cluster_t,
    /// The client handle the cluster belongs to; it must outlive the cluster.
    _client: rdkafka::producer::BaseProducer,
}

/// The one broker of a [`CountedMock`].
const MOCK_BROKER: i32 = 1;

impl CountedMock {
    /// A one-broker cluster with `topics` (name, partitions).
    pub fn new(topics: &[(&str, i32)]) -> CountedMock {
        let client: rdkafka::producer::BaseProducer = rdkafka::ClientConfig::new()
            .create()
            .expect("client for the mock cluster");
        // SAFETY: the handle is valid for the client's life, which outlasts the cluster (Drop).
        let cluster = unsafe {
            rdkafka::bindings::rd_kafka_mock_cluster_new(
                rdkafka::producer::Producer::client(&client).native_ptr(),
                1,
            )
        };
        assert!(!cluster.is_null(), "mock cluster");
        let mock = CountedMock {
            cluster,
            _client: client,
        };
        for (name, partitions) in topics {
            let name = std::ffi::CString::new(*name).unwrap();
            // SAFETY: a live cluster and a NUL-terminated name.
            let err = unsafe {
                rdkafka::bindings::rd_kafka_mock_topic_create(
                    mock.cluster,
                    name.as_ptr(),
                    *partitions,
                    1,
                )
            };
            assert_eq!(
                err,
                rdkafka::types::RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR
            );
        }
        mock
    }

    pub fn bootstrap_servers(&self) -> String {
        // SAFETY: the cluster owns the returned string for its life; copied at once.
        unsafe {
            std::ffi::CStr::from_ptr(rdkafka::bindings::rd_kafka_mock_cluster_bootstraps(
                self.cluster,
            ))
        }
        .to_string_lossy()
        .into_owned()
    }

    /// Makes the next produce requests fail with `errors`, one request each, in order.
    pub fn push_produce_errors(&self, errors: &[rdkafka::types::RDKafkaRespErr]) {
        for error in errors {
            // SAFETY: a live cluster; one (error, round-trip-time) pair as the count says.
            let err = unsafe {
                rdkafka::bindings::rd_kafka_mock_broker_push_request_error_rtts(
                    self.cluster,
                    MOCK_BROKER,
                    rdkafka::types::RDKafkaApiKey::Produce as i16,
                    1,
                    *error as std::ffi::c_int,
                    0 as std::ffi::c_int,
                )
            };
            assert_eq!(
                err,
                rdkafka::types::RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR
            );
        }
    }

    /// Delays every answer of the broker by `ms` (0: none).
    pub fn set_round_trip_ms(&self, ms: i32) {
        // SAFETY: a live cluster and its one broker.
        let err = unsafe {
            rdkafka::bindings::rd_kafka_mock_broker_set_rtt(self.cluster, MOCK_BROKER, ms)
        };
        assert_eq!(
            err,
            rdkafka::types::RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR
        );
    }

    /// Injected produce errors not hit yet.
    pub fn produce_errors_left(&self) -> usize {
        let mut left = 0usize;
        // SAFETY: a live cluster and a valid out pointer.
        unsafe {
            rdkafka::bindings::rd_kafka_mock_broker_error_stack_cnt(
                self.cluster,
                MOCK_BROKER,
                rdkafka::types::RDKafkaApiKey::Produce as i16,
                &mut left,
            )
        };
        left
    }
}

impl Drop for CountedMock {
    fn drop(&mut self) {
        // SAFETY: created in `new`, destroyed once, before its client.
        unsafe { rdkafka::bindings::rd_kafka_mock_cluster_destroy(self.cluster) };
    }
}
