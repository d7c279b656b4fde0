//! Prints the messages on Kafka topics, from the beginning: `outbox-consume BROKERS TOPIC...`.
//! Used by `make demo`; stops after 5 seconds without a new message.

use std::time::Duration;

use outbox_pg_harness::TopicReader;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((brokers, topics)) = args.split_first() else {
        eprintln!("usage: outbox-consume BROKERS TOPIC...");
        std::process::exit(2);
    };
    let topics: Vec<&str> = topics.iter().map(String::as_str).collect();
    let reader = TopicReader::new(brokers, &topics);
    let mut received = Vec::new();
    loop {
        let before = received.len();
        reader.read_into(&mut received, before + 1, Duration::from_secs(5));
        if received.len() == before {
            break;
        }
        let m = &received[before];
        println!(
            "{} [partition {}, offset {}] key={}",
            m.topic, m.partition, m.offset, m.key
        );
        let mut headers: Vec<_> = m.headers.iter().collect();
        headers.sort();
        for (name, value) in headers {
            println!("    {name}: {value}");
        }
        println!("    value: {}", m.payload);
    }
    println!("{} message(s)", received.len());
}
