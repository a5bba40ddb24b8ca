//! A consumer process that dies on a poison message: the crash-loop tests
//! (`tests/tests/crash_loop.rs`) start it again and again and check that
//! the delivery limit, kept by the broker, ends the loop.
//!
//! `crash-consumer BACKEND TOPIC GROUP LIMIT [LANES]`, BACKEND `kafka`,
//! `kafka-mock` (Kafka without creating topics: librdkafka's mock cluster)
//! or `rabbitmq`, LANES the consumer's concurrency (default 4), broker
//! addresses from `KAFKA_BROKERS` / `RABBITMQ_URL` as the test command
//! sets them. Prints `ready` once subscribed and `handled <payload>
//! attempt <n> partition <p>` per message (partition -1 where the backend
//! has none); a message whose payload is `poison` aborts the process from
//! inside the handler (as an out-of-memory kill or a segfault would end
//! it: no unwinding, nothing settled). No handler runs before `ready` is
//! printed, so the test always sees the process ready before it crashes.

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use broker_core::config::KafkaSettings;
use broker_core::{Backoff, Consumer, Publisher, Received, Subscriber};

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (backend, topic, group, limit, lanes) = match &args[..] {
        [_, backend, topic, group, limit] => (backend, topic, group, limit, "4"),
        [_, backend, topic, group, limit, lanes] => (backend, topic, group, limit, &**lanes),
        _ => {
            eprintln!("usage: crash-consumer kafka|kafka-mock|rabbitmq TOPIC GROUP LIMIT [LANES]");
            std::process::exit(2);
        }
    };
    let limit: u32 = limit.parse().expect("LIMIT is a number");
    let lanes: usize = lanes.parse().expect("LANES is a number");
    // Handlers wait for `ready` to be printed: a broker that redelivers the
    // poison message at once (RabbitMQ) would otherwise abort the process
    // before it says it is ready, and the test could not tell a crash from
    // a failed start.
    let (started, ready) = tokio::sync::watch::channel(false);
    let (subscriber, publisher): (Arc<dyn Subscriber>, Arc<dyn Publisher>) = match &**backend {
        "kafka" | "kafka-mock" => {
            let brokers =
                std::env::var("KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".to_owned());
            let broker = broker_kafka::KafkaBroker::builder(
                KafkaSettings::new(brokers).client_id("crash-consumer"),
            )
            .auto_create_topics(&**backend == "kafka")
            // As the Kafka tests do: tansu's group join waits half of it.
            .set("session.timeout.ms", "6000")
            .set("heartbeat.interval.ms", "1000")
            .connect()
            .await
            .expect("connect to Kafka");
            let broker = Arc::new(broker);
            (broker.clone(), broker)
        }
        "rabbitmq" => {
            let url = std::env::var("RABBITMQ_URL")
                .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned());
            let broker = broker_rabbitmq::RabbitMqBroker::builder(url)
                .exchange("broker.test")
                .queue_expiry(Duration::from_secs(120))
                .connect()
                .await
                .expect("connect to RabbitMQ");
            let broker = Arc::new(broker);
            (broker.clone(), broker)
        }
        other => panic!("unknown backend {other}"),
    };
    let consumer = Consumer::from_parts(subscriber, publisher, topic.as_str(), group.as_str())
        .concurrency(lanes)
        .retry(Backoff::none())
        .delivery_limit(limit)
        .handler(move |m: Received| {
            let mut ready = ready.clone();
            async move {
                let _ = ready.wait_for(|r| *r).await;
                handle(m)
            }
        })
        .start()
        .await
        .expect("start the consumer");
    println!("ready");
    std::io::stdout().flush().expect("stdout");
    started.send_replace(true);
    tokio::signal::ctrl_c().await.expect("signal");
    consumer
        .shutdown(Duration::from_secs(5))
        .await
        .expect("shutdown");
}

/// Aborts on the poison message; prints what it handled otherwise.
fn handle(m: Received) -> Result<(), broker_core::HandlerError> {
    if m.message.payload().as_ref() == b"poison" {
        std::process::abort();
    }
    // The test's payloads are short ASCII labels (`m12`), not user data.
    let line = format!(
        "handled {} attempt {} partition {}\n",
        String::from_utf8_lossy(m.message.payload()),
        m.attempt,
        m.partition.unwrap_or(-1)
    );
    let mut out = std::io::stdout().lock();
    out.write_all(line.as_bytes()).expect("stdout");
    out.flush().expect("stdout");
    Ok(())
}
