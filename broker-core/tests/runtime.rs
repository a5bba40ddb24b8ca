//! Consumer runtime behaviour that the conformance suite cannot provoke on a
//! real broker: a failing dead-letter publisher, dropped handles, tracing
//! context, dead-letter headers from partitioned backends.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use broker_core::consumer::dead_letter_message;
use broker_core::instrument::Instrumented;
use broker_core::message::header;
use broker_core::testkit::{fast_retry, Recorder};
use broker_core::{
    BrokerError, Consumer, FailureKind, HandlerError, Health, MemoryBroker, Message, Publisher,
    Received, Result, Subscriber, Subscription,
};

/// A publisher that refuses the first `failures` publishes with a
/// non-transient error, then forwards to the memory broker.
struct FlakyDeadLetters {
    inner: MemoryBroker,
    failures: AtomicUsize,
}

#[async_trait]
impl Publisher for FlakyDeadLetters {
    async fn publish(&self, topic: &str, message: Message) -> Result<()> {
        let left = self.failures.load(Ordering::SeqCst);
        if left > 0 {
            self.failures.store(left - 1, Ordering::SeqCst);
            return Err(BrokerError::Rejected {
                backend: "test",
                reason: "dead-letter topic refused".into(),
            });
        }
        self.inner.publish(topic, message).await
    }
    fn max_message_bytes(&self) -> usize {
        self.inner.max_message_bytes()
    }
    async fn health(&self) -> Health {
        Health::Healthy
    }
    async fn close(&self) -> Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn failed_dead_letter_publish_returns_message_for_redelivery() {
    let broker = MemoryBroker::new();
    let mut dlq = broker
        .subscribe(Subscription::new("t.dlq", "viewer"))
        .await
        .unwrap();
    let attempts = Arc::new(AtomicUsize::new(0));
    let handler = {
        let attempts = attempts.clone();
        move |_r: Received| {
            attempts.fetch_add(1, Ordering::SeqCst);
            async { Err::<(), _>(HandlerError::retryable("always fails")) }
        }
    };
    let consumer = Consumer::builder(broker.clone(), "t", "g")
        .dead_letters(FlakyDeadLetters {
            inner: broker.clone(),
            failures: AtomicUsize::new(2),
        })
        .retry(fast_retry(2))
        .handler(handler)
        .start()
        .await
        .unwrap();
    let sent = Message::new("x");
    broker.publish("t", sent.clone()).await.unwrap();

    let letter = tokio::time::timeout(Duration::from_secs(10), dlq.next())
        .await
        .expect("dead letter in time")
        .unwrap()
        .unwrap();
    assert_eq!(letter.message().id(), sent.id());
    consumer.shutdown(Duration::from_secs(5)).await.unwrap();
    // Two refused dead-letter publishes = the message went round three times.
    assert_eq!(attempts.load(Ordering::SeqCst), 6);
    // Attempts count the two earlier deliveries (one each, as far as the
    // broker's delivery count tells) and the last delivery's two runs.
    assert_eq!(letter.message().headers()[header::DLQ_ATTEMPTS], "4");
}

#[tokio::test]
async fn dropping_the_handle_stops_the_consumer_and_returns_messages() {
    let broker = MemoryBroker::new();
    let recorder = Recorder::default();
    let consumer = Consumer::builder(broker.clone(), "t", "g")
        .handler(recorder.handler())
        .start()
        .await
        .unwrap();
    broker.publish("t", Message::new("1")).await.unwrap();
    recorder
        .wait_until(Duration::from_secs(5), "first handled", |s| s.len() == 1)
        .await;
    drop(consumer);
    // The dropped consumer must have left the group: a new member gets the next message.
    let mut member = broker.subscribe(Subscription::new("t", "g")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let next = Message::new("2");
    broker.publish("t", next.clone()).await.unwrap();
    let d = tokio::time::timeout(Duration::from_secs(5), member.next())
        .await
        .expect("delivery to the remaining member")
        .unwrap()
        .unwrap();
    assert_eq!(d.message().id(), next.id());
    assert_eq!(recorder.seen().len(), 1);
}

#[tokio::test]
async fn trace_context_flows_from_publisher_to_handler() {
    let broker = MemoryBroker::new();
    let publisher = Instrumented::new(broker.clone());
    let recorder = Recorder::default();
    let consumer = Consumer::builder(broker.clone(), "t", "g")
        .handler(recorder.handler())
        .start()
        .await
        .unwrap();
    publisher.publish("t", Message::new("x")).await.unwrap();
    let explicit = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    publisher
        .publish("t", Message::new("y").with_traceparent(explicit))
        .await
        .unwrap();
    recorder
        .wait_until(Duration::from_secs(5), "both handled", |s| s.len() == 2)
        .await;
    consumer.shutdown(Duration::from_secs(5)).await.unwrap();
    let seen = recorder.seen();
    let started = seen[0]
        .message
        .traceparent()
        .expect("publisher started a trace");
    assert!(
        started.starts_with("00-") && started.len() == 55,
        "{started}"
    );
    assert_eq!(seen[1].message.traceparent(), Some(explicit));
    assert_eq!(publisher.metrics().snapshot().published, 2);
}

#[test]
fn dead_letter_keeps_message_and_adds_partition_and_offset() {
    let original = Message::new("p")
        .with_key("k")
        .with_header("h", "v")
        .with_correlation_id("c");
    let received = Received {
        message: original.clone(),
        topic: "orders".into(),
        redelivered: false,
        partition: Some(2),
        offset: Some(41),
        attempt: 3,
    };
    let letter = dead_letter_message(
        &received,
        &HandlerError::new(FailureKind::Handler, "x".repeat(5000)),
        "billing",
    );
    assert_eq!(letter.id(), original.id());
    assert_eq!(letter.payload(), original.payload());
    assert_eq!(letter.correlation_id(), Some("c"));
    let h = letter.headers();
    assert_eq!(h["h"], "v");
    assert_eq!(h[header::DLQ_PARTITION], "2");
    assert_eq!(h[header::DLQ_OFFSET], "41");
    assert_eq!(h[header::DLQ_ATTEMPTS], "3");
    assert_eq!(h[header::DLQ_GROUP], "billing");
    // Long reasons are cut so a dead letter stays within broker limits.
    assert!(h[header::DLQ_REASON].to_text().chars().count() <= 1024);
}

#[tokio::test]
async fn start_without_handler_is_a_typed_error() {
    let r = Consumer::builder(MemoryBroker::new(), "t", "g")
        .start()
        .await;
    assert!(matches!(r, Err(BrokerError::Misconfigured(_))));
    let r = Consumer::builder(MemoryBroker::new(), "bad topic", "g")
        .handler(|_r: Received| async { Ok(()) })
        .start()
        .await;
    assert!(matches!(r, Err(BrokerError::InvalidTopic(_))));
}

/// A dead-letter publisher that takes `delay` per publish and says when one began.
struct SlowDeadLetters {
    inner: MemoryBroker,
    delay: Duration,
    began: Arc<tokio::sync::Notify>,
}

#[async_trait]
impl Publisher for SlowDeadLetters {
    async fn publish(&self, topic: &str, message: Message) -> Result<()> {
        self.began.notify_one();
        tokio::time::sleep(self.delay).await;
        self.inner.publish(topic, message).await
    }
    fn max_message_bytes(&self) -> usize {
        self.inner.max_message_bytes()
    }
    async fn health(&self) -> Health {
        Health::Healthy
    }
    async fn close(&self) -> Result<()> {
        Ok(())
    }
}

/// Shutdown during a dead-letter publish lets that publish finish (within
/// the deadline) and acks the original: abandoning it would leave the dead
/// letter on the broker and redeliver the original as well.
#[tokio::test]
async fn shutdown_lets_an_in_flight_dead_letter_publish_finish() {
    let broker = MemoryBroker::new();
    let mut dlq = broker
        .subscribe(Subscription::new("t.dlq", "viewer"))
        .await
        .unwrap();
    let began = Arc::new(tokio::sync::Notify::new());
    let metrics = Arc::new(broker_core::metrics::Metrics::default());
    let consumer = Consumer::builder(broker.clone(), "t", "g")
        .metrics(metrics.clone())
        .dead_letters(SlowDeadLetters {
            inner: broker.clone(),
            delay: Duration::from_millis(500),
            began: began.clone(),
        })
        .handler(|_r: Received| async { Err::<(), _>(HandlerError::permanent("bad")) })
        .start()
        .await
        .unwrap();
    broker.publish("t", Message::new("x")).await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), began.notified())
        .await
        .expect("dead-letter publish began");
    consumer.shutdown(Duration::from_secs(5)).await.unwrap();
    assert_eq!(metrics.snapshot().dead_lettered, 1);

    let letter = tokio::time::timeout(Duration::from_secs(5), dlq.next())
        .await
        .expect("dead letter published")
        .unwrap()
        .unwrap();
    assert_eq!(
        letter.message().headers()[header::DLQ_ERROR_KIND],
        "permanent"
    );
    let mut member = broker.subscribe(Subscription::new("t", "g")).await.unwrap();
    let again = tokio::time::timeout(Duration::from_millis(300), member.next()).await;
    assert!(
        again.is_err(),
        "original redelivered after its dead letter: {again:?}"
    );
}

/// A subscriber without a retry destination (the trait's default).
struct NoDelayedRetry(MemoryBroker);

#[async_trait]
impl Subscriber for NoDelayedRetry {
    async fn subscribe(
        &self,
        subscription: Subscription,
    ) -> Result<Box<dyn broker_core::DeliveryStream>> {
        self.0.subscribe(subscription).await
    }
    async fn health(&self) -> Health {
        Subscriber::health(&self.0).await
    }
}

#[tokio::test]
async fn delayed_retries_on_a_backend_without_them_fail_at_start() {
    let broker = MemoryBroker::new();
    let started = Consumer::from_parts(
        Arc::new(NoDelayedRetry(broker.clone())),
        Arc::new(broker.clone()),
        "t",
        "g",
    )
    .retry_mode(broker_core::RetryMode::Delayed)
    .handler(|_r: Received| async { Ok(()) })
    .start()
    .await;
    match started {
        Err(e @ BrokerError::Unsupported { .. }) => {
            assert!(e.to_string().contains("delayed retry"), "{e}")
        }
        Err(e) => panic!("expected Unsupported, got {e}"),
        Ok(_) => panic!("a delayed-retry consumer started on a backend without them"),
    }
}

#[tokio::test]
async fn a_message_arriving_with_retry_headers_counts_their_attempts() {
    // As a retry copy arrives: attempt 3 of at most 3, the last one.
    let broker = MemoryBroker::new();
    let recorder = Recorder::default();
    let mut letters = broker
        .subscribe(Subscription::new("t.dlq", "check"))
        .await
        .unwrap();
    let consumer = Consumer::builder(broker.clone(), "t", "g")
        .retry(fast_retry(3))
        .retry_mode(broker_core::RetryMode::Delayed)
        .handler({
            let recorder = recorder.clone();
            move |r: Received| {
                recorder.record(r);
                async { Err(HandlerError::retryable("fails")) }
            }
        })
        .start()
        .await
        .unwrap();
    let copy = Message::new("x")
        .with_header(header::RETRY_ATTEMPT, "3")
        .with_header(header::RETRY_DUE, "0");
    broker.publish("t", copy.clone()).await.unwrap();
    let letter = tokio::time::timeout(Duration::from_secs(5), letters.next())
        .await
        .expect("dead letter in time")
        .unwrap()
        .unwrap();
    consumer.shutdown(Duration::from_secs(5)).await.unwrap();
    let seen = recorder.seen();
    assert_eq!(seen.len(), 1, "the last attempt runs once");
    assert_eq!(seen[0].attempt, 3);
    assert!(seen[0]
        .message
        .headers()
        .get(header::RETRY_ATTEMPT)
        .is_none());
    assert_eq!(letter.message().headers()[header::DLQ_ATTEMPTS], "3");
    assert_eq!(letter.message().id(), copy.id());
}

/// A subscriber whose subscription fails for good at once, as a RabbitMQ
/// subscription does when a bounded resubscribe policy runs out.
struct GivesUp;

struct FailedStream(Option<BrokerError>);

#[async_trait]
impl broker_core::DeliveryStream for FailedStream {
    async fn next(&mut self) -> Option<Result<broker_core::Delivery>> {
        self.0.take().map(Err)
    }
    async fn close(self: Box<Self>) -> Result<()> {
        Ok(())
    }
}

#[async_trait]
impl Subscriber for GivesUp {
    async fn subscribe(&self, _: Subscription) -> Result<Box<dyn broker_core::DeliveryStream>> {
        Ok(Box::new(FailedStream(Some(BrokerError::Unavailable {
            backend: "test",
            attempts: 12,
            source: "connect to node-1:5672/%2f: refused".into(),
        }))))
    }
    async fn health(&self) -> Health {
        Health::Healthy
    }
}

#[tokio::test]
async fn a_consumer_whose_subscription_fails_for_good_says_why_it_stopped() {
    let consumer = Consumer::from_parts(Arc::new(GivesUp), Arc::new(MemoryBroker::new()), "t", "g")
        .handler(Recorder::default().handler())
        .start()
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while consumer.is_running() {
        assert!(tokio::time::Instant::now() < deadline, "still running");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let why = consumer.stopped_by().expect("a reason");
    assert!(
        why.contains("unavailable") && why.contains("node-1:5672"),
        "{why}"
    );
    assert!(matches!(
        consumer.shutdown(Duration::from_secs(1)).await,
        Err(BrokerError::Unavailable { .. })
    ));
}

#[tokio::test]
async fn a_running_or_shut_down_consumer_has_no_stop_reason() {
    let broker = MemoryBroker::new();
    let consumer = Consumer::builder(broker.clone(), "t", "g")
        .handler(Recorder::default().handler())
        .start()
        .await
        .unwrap();
    assert_eq!(consumer.stopped_by(), None);
    consumer.shutdown(Duration::from_secs(1)).await.unwrap();
}
