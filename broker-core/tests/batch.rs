//! Batch consume on the memory backend: what the conformance checks
//! (`testkit::batch_*`, run on every backend) cannot pin down on a real
//! broker: exact batch sizes and the wait bound on a paused clock, panics,
//! all-failed batches, the delivery limit, abandoning a batch at the
//! shutdown deadline, misconfiguration.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use broker_core::message::header;
use broker_core::testkit::{fast_retry, BatchRecorder};
use broker_core::{
    BatchError, BrokerError, Consumer, HandlerError, MemoryBroker, Message, Metrics, Publisher,
    Received, Subscriber, Subscription,
};
use tokio::time::Instant;

const TOPIC: &str = "demo.usage.recorded";

/// When a batch handler was called, and the payloads it got.
type Call = (Instant, Vec<String>);

fn numbered(n: usize) -> Vec<Message> {
    (0..n)
        .map(|i| Message::new(i.to_string()).with_key("k"))
        .collect()
}

fn payloads(batch: &[Received]) -> Vec<String> {
    batch
        .iter()
        .map(|r| String::from_utf8_lossy(r.message.payload()).into_owned())
        .collect()
}

async fn next_letter(dlq: &mut Box<dyn broker_core::DeliveryStream>) -> Message {
    let d = tokio::time::timeout(Duration::from_secs(10), dlq.next())
        .await
        .expect("dead letter in time")
        .expect("stream open")
        .expect("delivery");
    let m = d.message().clone();
    d.ack().await.expect("ack");
    m
}

/// 25 waiting messages, at most 10 per batch: 10 and 10 at once, then the
/// last 5 once the wait bound (1 s from their first) has passed.
#[tokio::test(start_paused = true)]
async fn batches_fill_to_the_limit_and_the_wait_bound_flushes_the_rest() {
    let broker = MemoryBroker::new();
    broker.publish_batch(TOPIC, numbered(25)).await.unwrap();
    let calls: Arc<Mutex<Vec<Call>>> = Arc::default();
    let started = Instant::now();
    let consumer = Consumer::builder(broker.clone(), TOPIC, "g")
        .batch(10, Duration::from_secs(1))
        .batch_handler({
            let calls = calls.clone();
            move |batch: Vec<Received>| {
                calls
                    .lock()
                    .unwrap()
                    .push((Instant::now(), payloads(&batch)));
                async { Ok::<(), BatchError>(()) }
            }
        })
        .start()
        .await
        .unwrap();
    while calls.lock().unwrap().len() < 3 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    consumer.shutdown(Duration::from_secs(5)).await.unwrap();
    let calls = calls.lock().unwrap().clone();
    let sizes: Vec<usize> = calls.iter().map(|(_, b)| b.len()).collect();
    assert_eq!(sizes, [10, 10, 5]);
    let all: Vec<String> = calls.iter().flat_map(|(_, b)| b.clone()).collect();
    let expected: Vec<String> = (0..25).map(|i| i.to_string()).collect();
    assert_eq!(all, expected, "in order, each once");
    assert!(
        calls[1].0 - started < Duration::from_millis(100),
        "full batches must not wait: second call after {:?}",
        calls[1].0 - started
    );
    let waited = calls[2].0 - calls[1].0;
    assert!(
        waited >= Duration::from_secs(1) && waited < Duration::from_millis(1100),
        "the short batch waits out the bound, no more: {waited:?}"
    );
}

/// A batch that reaches `max_messages` is handled at once, however long
/// the wait bound.
#[tokio::test(start_paused = true)]
async fn a_full_batch_does_not_wait() {
    let broker = MemoryBroker::new();
    let calls = BatchRecorder::default();
    let consumer = Consumer::builder(broker.clone(), TOPIC, "g")
        .batch(3, Duration::from_secs(3600))
        .batch_handler(calls.handler())
        .start()
        .await
        .unwrap();
    let published = Instant::now();
    broker.publish_batch(TOPIC, numbered(3)).await.unwrap();
    calls
        .wait_until(Duration::from_secs(7200), "the batch", |c| !c.is_empty())
        .await;
    assert!(
        published.elapsed() < Duration::from_secs(1),
        "waited {:?}",
        published.elapsed()
    );
    consumer.shutdown(Duration::from_secs(5)).await.unwrap();
    assert_eq!(payloads(&calls.calls()[0]), ["0", "1", "2"]);
}

/// A panic fails every message of the batch; each is then retried on its
/// own, in order (attempt 2), and acked.
#[tokio::test]
async fn a_panicking_batch_handler_retries_each_message_alone() {
    let broker = MemoryBroker::new();
    broker.publish_batch(TOPIC, numbered(3)).await.unwrap();
    let calls = BatchRecorder::default();
    let metrics = Arc::new(Metrics::default());
    let consumer = Consumer::builder(broker.clone(), TOPIC, "g")
        .metrics(metrics.clone())
        .retry(fast_retry(3))
        .batch(3, Duration::from_secs(1))
        .batch_handler({
            let calls = calls.clone();
            move |batch: Vec<Received>| {
                let many = batch.len() > 1;
                calls.record(batch);
                async move {
                    if many {
                        panic!("bulk insert bug");
                    }
                    Ok::<(), BatchError>(())
                }
            }
        })
        .start()
        .await
        .unwrap();
    calls
        .wait_until(Duration::from_secs(10), "the retries", |c| c.len() >= 4)
        .await;
    consumer.shutdown(Duration::from_secs(5)).await.unwrap();
    let calls = calls.calls();
    let shapes: Vec<Vec<String>> = calls.iter().map(|b| payloads(b)).collect();
    assert_eq!(
        shapes,
        [vec!["0", "1", "2"], vec!["0"], vec!["1"], vec!["2"]]
    );
    assert!(calls[1..].iter().all(|b| b[0].attempt == 2));
    let m = metrics.snapshot();
    assert_eq!(
        (m.handled, m.failed, m.retried, m.dead_lettered),
        (3, 3, 3, 0),
        "{m:?}"
    );
}

/// "Every message failed" sends each through its own retries, then to the
/// dead-letter topic with its own headers.
#[tokio::test]
async fn an_all_failed_batch_dead_letters_each_message_after_its_retries() {
    let broker = MemoryBroker::new();
    let mut dlq = broker
        .subscribe(Subscription::new(format!("{TOPIC}.dlq"), "viewer"))
        .await
        .unwrap();
    let sent = numbered(3);
    broker.publish_batch(TOPIC, sent.clone()).await.unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let metrics = Arc::new(Metrics::default());
    let consumer = Consumer::builder(broker.clone(), TOPIC, "g")
        .metrics(metrics.clone())
        .retry(fast_retry(2))
        .batch(3, Duration::from_secs(1))
        .batch_handler({
            let calls = calls.clone();
            move |_batch: Vec<Received>| {
                calls.fetch_add(1, Ordering::SeqCst);
                async { Err::<(), _>(BatchError::all("database down")) }
            }
        })
        .start()
        .await
        .unwrap();
    for m in &sent {
        let letter = next_letter(&mut dlq).await;
        assert_eq!(letter.id(), m.id(), "dead letters in order");
        let h = letter.headers();
        assert_eq!(h[header::DLQ_ERROR_KIND], "handler");
        assert_eq!(h[header::DLQ_ATTEMPTS], "2");
        assert!(h[header::DLQ_REASON].to_text().contains("database down"));
    }
    consumer.shutdown(Duration::from_secs(5)).await.unwrap();
    // One call for the batch, one retry per message.
    assert_eq!(calls.load(Ordering::SeqCst), 4);
    let m = metrics.snapshot();
    assert_eq!(
        (m.handled, m.failed, m.retried, m.dead_lettered),
        (0, 6, 3, 3),
        "{m:?}"
    );
}

/// A delivery over the delivery limit goes to the dead-letter topic
/// without reaching the batch handler; the rest of its batch is handled.
#[tokio::test]
async fn a_delivery_over_the_limit_is_dead_lettered_not_batched() {
    let broker = MemoryBroker::new();
    let mut dlq = broker
        .subscribe(Subscription::new(format!("{TOPIC}.dlq"), "viewer"))
        .await
        .unwrap();
    let crashy = Message::new("crashy").with_key("k");
    broker.publish(TOPIC, crashy.clone()).await.unwrap();
    // Two deliveries that ended unsettled (a consumer that crashed twice):
    // one handed back, one held when its subscription closed.
    let mut raw = broker
        .subscribe(Subscription::new(TOPIC, "g"))
        .await
        .unwrap();
    let first = raw.next().await.unwrap().unwrap();
    assert_eq!(first.message().id(), crashy.id());
    first.nack(true).await.unwrap();
    let second = raw.next().await.unwrap().unwrap();
    assert_eq!(second.received.attempt, 2);
    raw.close().await.unwrap();
    drop(second);
    broker.publish_batch(TOPIC, numbered(2)).await.unwrap();

    let calls = BatchRecorder::default();
    let consumer = Consumer::builder(broker.clone(), TOPIC, "g")
        .delivery_limit(2)
        .batch(3, Duration::from_millis(200))
        .batch_handler(calls.handler())
        .start()
        .await
        .unwrap();
    let letter = next_letter(&mut dlq).await;
    assert_eq!(letter.id(), crashy.id());
    assert_eq!(letter.headers()[header::DLQ_ERROR_KIND], "delivery-limit");
    assert_eq!(letter.headers()[header::DLQ_ATTEMPTS], "2");
    calls
        .wait_until(Duration::from_secs(10), "the others", |c| {
            c.iter().map(Vec::len).sum::<usize>() >= 2
        })
        .await;
    consumer.shutdown(Duration::from_secs(5)).await.unwrap();
    let handled: Vec<String> = calls.calls().iter().flat_map(|b| payloads(b)).collect();
    assert_eq!(
        handled,
        ["0", "1"],
        "the handler never saw the crashing one"
    );
}

/// At a short shutdown deadline the batch in flight is abandoned, not
/// acked: the next consumer gets its messages again, flagged redelivered.
#[tokio::test]
async fn a_short_deadline_abandons_the_batch_in_flight() {
    let broker = MemoryBroker::new();
    broker.publish_batch(TOPIC, numbered(4)).await.unwrap();
    let stuck = BatchRecorder::default();
    let consumer = Consumer::builder(broker.clone(), TOPIC, "g")
        .batch(2, Duration::from_millis(50))
        .batch_handler({
            let stuck = stuck.clone();
            move |batch: Vec<Received>| {
                stuck.record(batch);
                futures::future::pending::<Result<(), BatchError>>()
            }
        })
        .start()
        .await
        .unwrap();
    stuck
        .wait_until(Duration::from_secs(10), "stuck batch", |c| !c.is_empty())
        .await;
    consumer.shutdown(Duration::from_millis(100)).await.unwrap();
    let abandoned = stuck.calls()[0].clone();
    assert_eq!(payloads(&abandoned), ["0", "1"]);

    let calls = BatchRecorder::default();
    let consumer = Consumer::builder(broker.clone(), TOPIC, "g")
        .batch(4, Duration::from_millis(50))
        .batch_handler(calls.handler())
        .start()
        .await
        .unwrap();
    calls
        .wait_until(Duration::from_secs(10), "everything", |c| {
            c.iter().map(Vec::len).sum::<usize>() >= 4
        })
        .await;
    consumer.shutdown(Duration::from_secs(5)).await.unwrap();
    let handled: Vec<Received> = calls.messages();
    assert_eq!(payloads(&handled), ["0", "1", "2", "3"]);
    assert!(
        handled[..2].iter().all(|r| r.redelivered && r.attempt == 2),
        "the abandoned batch comes back as redeliveries"
    );
}

/// `.batch(..)` with a single-message handler is a typed error; the last
/// of `handler` and `batch_handler` wins.
#[tokio::test]
async fn batch_limits_need_a_batch_handler() {
    let broker = MemoryBroker::new();
    let refused = Consumer::builder(broker.clone(), TOPIC, "g")
        .batch(10, Duration::from_millis(10))
        .handler(|_r: Received| async { Ok(()) })
        .start()
        .await;
    assert!(
        matches!(refused, Err(BrokerError::Misconfigured(_))),
        "{:?}",
        refused.err()
    );

    // A single-message handler set after a batch handler replaces it.
    let seen = Arc::new(AtomicUsize::new(0));
    let consumer = Consumer::builder(broker.clone(), TOPIC, "g")
        .batch_handler(|_b: Vec<Received>| async {
            Err::<(), _>(BatchError::all(HandlerError::permanent("not me")))
        })
        .handler({
            let seen = seen.clone();
            move |_r: Received| {
                seen.fetch_add(1, Ordering::SeqCst);
                async { Ok(()) }
            }
        })
        .start()
        .await
        .unwrap();
    broker.publish(TOPIC, Message::new("x")).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while seen.load(Ordering::SeqCst) == 0 {
        assert!(Instant::now() < deadline, "the single handler never ran");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    consumer.shutdown(Duration::from_secs(5)).await.unwrap();
    assert_eq!(left_in_group(&broker).await, 0);
}

/// Nothing is left for the group `g`: every message was settled.
async fn left_in_group(broker: &MemoryBroker) -> usize {
    let mut stream = broker
        .subscribe(Subscription::new(TOPIC, "g"))
        .await
        .unwrap();
    let mut left = 0;
    while let Ok(Some(_)) = tokio::time::timeout(Duration::from_millis(100), stream.next()).await {
        left += 1;
    }
    left
}
