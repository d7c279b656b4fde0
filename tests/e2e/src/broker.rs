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
