//! A consumer process that dies on a poison message: the crash-loop tests
//! (`tests/tests/crash_loop.rs`) start it again and again and check that
//! the delivery limit, kept by the broker, ends the loop.
//!
//! `crash-consumer BACKEND TOPIC GROUP LIMIT`, BACKEND `kafka` or
//! `rabbitmq`, broker addresses from `KAFKA_BROKERS` / `RABBITMQ_URL` as
//! the test command sets them. Prints `ready` once subscribed and
//! `handled <payload>` per message; a message whose payload is `poison`
//! aborts the process from inside the handler (as an out-of-memory kill
//! or a segfault would end it: no unwinding, nothing settled).

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use broker_core::config::KafkaSettings;
use broker_core::{Backoff, Consumer, Publisher, Received, Subscriber};

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, backend, topic, group, limit] = &args[..] else {
        eprintln!("usage: crash-consumer kafka|rabbitmq TOPIC GROUP LIMIT");
        std::process::exit(2);
    };
    let limit: u32 = limit.parse().expect("LIMIT is a number");
    let (subscriber, publisher): (Arc<dyn Subscriber>, Arc<dyn Publisher>) = match &**backend {
        "kafka" => {
            let brokers =
                std::env::var("KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".to_owned());
            let broker = broker_kafka::KafkaBroker::builder(
                KafkaSettings::new(brokers).client_id("crash-consumer"),
            )
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
        .concurrency(4)
        .retry(Backoff::none())
        .delivery_limit(limit)
        .handler(|m: Received| async move {
            if m.message.payload().as_ref() == b"poison" {
                std::process::abort();
            }
            let line = format!(
                "handled {} attempt {}\n",
                String::from_utf8_lossy(m.message.payload()),
                m.attempt
            );
            let mut out = std::io::stdout().lock();
            out.write_all(line.as_bytes()).expect("stdout");
            out.flush().expect("stdout");
            Ok(())
        })
        .start()
        .await
        .expect("start the consumer");
    println!("ready");
    std::io::stdout().flush().expect("stdout");
    tokio::signal::ctrl_c().await.expect("signal");
    consumer
        .shutdown(Duration::from_secs(5))
        .await
        .expect("shutdown");
}
