//! librdkafka's mock cluster in a process of its own, so the broker's CPU is not the
//! benchmark's: `mock-broker TOPIC:PARTITIONS...` prints the bootstrap servers, then serves until
//! its standard input closes.

use std::io::{Read, Write};

use rdkafka::mocking::MockCluster;

fn main() {
    let cluster = MockCluster::new(1).expect("mock cluster");
    for spec in std::env::args().skip(1) {
        let (name, partitions) = spec.split_once(':').unwrap_or((spec.as_str(), "1"));
        cluster
            .create_topic(name, partitions.parse().expect("partition count"), 1)
            .expect("create topic");
    }
    println!("{}", cluster.bootstrap_servers());
    std::io::stdout().flush().unwrap();
    let _ = std::io::stdin().read_to_end(&mut Vec::new());
}
