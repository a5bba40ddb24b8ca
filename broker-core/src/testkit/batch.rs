//! Checks of batch consume ([`crate::batch`]): bounded batches, partial
//! failure settled message by message, per-key order across batches, typed
//! batches, shutdown.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::*;
use crate::batch::{typed_batch, BatchError};
use crate::handler::HandlerError;
use crate::message::header;
use crate::topic::dead_letter_topic;
use crate::{Event, Message, Metrics, Received};

/// Records every call of a batch handler, and lets a check wait for them.
#[derive(Clone, Default)]
pub struct BatchRecorder {
    calls: Arc<Mutex<Vec<Vec<Received>>>>,
    changed: Arc<tokio::sync::Notify>,
}

impl BatchRecorder {
    /// Records one call.
    pub fn record(&self, batch: Vec<Received>) {
        self.calls.lock().unwrap().push(batch);
        self.changed.notify_waiters();
    }
    /// A batch handler that records every batch and succeeds.
    pub fn handler(&self) -> impl crate::BatchHandler {
        let recorder = self.clone();
        move |batch: Vec<Received>| {
            recorder.record(batch);
            async { Ok::<(), BatchError>(()) }
        }
    }
    /// Every call so far, in order.
    pub fn calls(&self) -> Vec<Vec<Received>> {
        self.calls.lock().unwrap().clone()
    }
    /// Every message of every call so far, in order.
    pub fn messages(&self) -> Vec<Received> {
        self.calls().into_iter().flatten().collect()
    }
    /// Waits until `done` holds for the calls so far, or panics after `timeout`.
    pub async fn wait_until(
        &self,
        timeout: Duration,
        what: &str,
        done: impl Fn(&[Vec<Received>]) -> bool,
    ) {
        let result = tokio::time::timeout(timeout, async {
            loop {
                let changed = self.changed.notified();
                tokio::pin!(changed);
                changed.as_mut().enable();
                if done(&self.calls.lock().unwrap()) {
                    return;
                }
                changed.await;
            }
        })
        .await;
        if result.is_err() {
            let calls = self.calls();
            panic!(
                "{what}: not reached within {timeout:?}; {} calls with {} messages",
                calls.len(),
                calls.iter().map(Vec::len).sum::<usize>()
            );
        }
    }
}

/// `n` messages over `keys` keys (`k0`, `k1`, ...), payload = the sequence
/// number within the key.
fn keyed(n: usize, keys: usize) -> Vec<Message> {
    (0..n)
        .map(|i| Message::new((i / keys).to_string()).with_key(format!("k{}", i % keys)))
        .collect()
}

fn seq(r: &Received) -> usize {
    String::from_utf8_lossy(r.message.payload())
        .parse()
        .unwrap_or_else(|_| panic!("payload is not a sequence number: {:?}", r.message))
}

fn key(r: &Received) -> String {
    r.message.key_str().unwrap_or_default().to_owned()
}

/// Creates `group` on `topic` before anything is published (a RabbitMQ
/// queue only holds what arrives after its first subscribe).
async fn create_group(b: &dyn TestBackend, topic: &str, group: &str) {
    subscribe(b, topic, group)
        .await
        .close()
        .await
        .expect("close the first subscription");
}

/// A batch handler gets at most `max_messages` per call, every message
/// exactly once, same-key messages in order; messages that were waiting
/// together arrive together; the last, short batch comes after the wait
/// bound (43 messages, at most 8 per call). Counters count messages.
pub async fn batch_handler_gets_bounded_batches(b: &dyn TestBackend) {
    const MESSAGES: usize = 43;
    const MAX: usize = 8;
    let topic = b.topic("batch").await;
    let group = unique("g");
    create_group(b, &topic, &group).await;
    let sent = keyed(MESSAGES, 4);
    publish_all(&*b.publisher().await, &topic, &sent).await;

    let calls = BatchRecorder::default();
    let metrics = Arc::new(Metrics::default());
    let handle = start(
        consumer(b, &topic, &group)
            .await
            .metrics(metrics.clone())
            .batch(MAX, Duration::from_millis(300))
            .batch_handler(calls.handler()),
    )
    .await;
    calls
        .wait_until(
            b.capabilities().receive_timeout * 2,
            "every message handled",
            |c| c.iter().map(Vec::len).sum::<usize>() >= MESSAGES,
        )
        .await;
    // Anything handled twice would show up now.
    tokio::time::sleep(b.capabilities().quiet_period).await;
    stop(handle).await;

    let calls = calls.calls();
    let sizes: Vec<usize> = calls.iter().map(Vec::len).collect();
    assert!(
        sizes.iter().all(|&n| (1..=MAX).contains(&n)),
        "batch sizes must be 1..={MAX}: {sizes:?}"
    );
    assert!(
        sizes.iter().any(|&n| n > 1),
        "messages waiting together were never handled together: {sizes:?}"
    );
    let handled: Vec<Received> = calls.into_iter().flatten().collect();
    assert_eq!(
        handled.len(),
        MESSAGES,
        "each message once; sizes {sizes:?}"
    );
    assert_eq!(received_ids(&handled), ids(&sent));
    let mut by_key: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for r in &handled {
        by_key.entry(key(r)).or_default().push(seq(r));
    }
    for (k, seqs) in &by_key {
        let expected: Vec<usize> = (0..seqs.len()).collect();
        assert_eq!(seqs, &expected, "key {k} handled out of order");
    }
    let m = metrics.snapshot();
    assert_eq!(
        (m.handled, m.failed, m.retried, m.dead_lettered),
        (MESSAGES as u64, 0, 0, 0),
        "{m:?}"
    );
}

/// A batch handler fails single messages: only those are retried (each on
/// its own, as a batch of one) or dead-lettered; the others are handled
/// once and acknowledged. The permanent failure reaches `{topic}.dlq`
/// unchanged with the usual headers; the group has nothing left after.
pub async fn batch_partial_failure_settles_each_message(b: &dyn TestBackend) {
    let topic = b.topic("batch-partial").await;
    let group = unique("g");
    create_group(b, &topic, &group).await;
    let mut dlq = subscribe(b, &dead_letter_topic(&topic), &unique("dlq")).await;
    let sent: Vec<Message> = (0..10)
        .map(|i| {
            let payload = match i {
                3 => "permanent".to_owned(),
                6 => "flaky".to_owned(),
                _ => format!("ok-{i}"),
            };
            Message::new(payload).with_key("one-key")
        })
        .collect();
    let (permanent, flaky) = (sent[3].clone(), sent[6].clone());
    let calls = BatchRecorder::default();
    let handler = {
        let calls = calls.clone();
        let flaky_seen = Arc::new(AtomicUsize::new(0));
        move |batch: Vec<Received>| {
            calls.record(batch.clone());
            let mut failed = Vec::new();
            for (i, r) in batch.iter().enumerate() {
                match &**r.message.payload() {
                    b"permanent" => failed.push((i, HandlerError::permanent("refused record"))),
                    b"flaky" if flaky_seen.fetch_add(1, Ordering::SeqCst) == 0 => {
                        failed.push((i, HandlerError::retryable("flaky once")))
                    }
                    _ => {}
                }
            }
            async move { BatchError::check(failed) }
        }
    };
    let metrics = Arc::new(Metrics::default());
    let handle = start(
        consumer(b, &topic, &group)
            .await
            .metrics(metrics.clone())
            .batch(10, Duration::from_millis(200))
            .batch_handler(handler),
    )
    .await;
    publish_all(&*b.publisher().await, &topic, &sent).await;

    let letter = next(b, &mut dlq, "dead letter of the permanent failure").await;
    let m = letter.message().clone();
    letter.ack().await.expect("ack dead letter");
    let ids_seen = |c: &[Vec<Received>]| -> HashMap<String, usize> {
        let mut count = HashMap::new();
        for r in c.iter().flatten() {
            *count.entry(r.message.id().to_owned()).or_default() += 1;
        }
        count
    };
    calls
        .wait_until(
            b.capabilities().receive_timeout,
            "every message handled, the flaky one twice",
            |c| {
                let count = ids_seen(c);
                sent.iter().all(|m| count.contains_key(m.id())) && count.get(flaky.id()) == Some(&2)
            },
        )
        .await;
    tokio::time::sleep(b.capabilities().quiet_period).await;
    stop(handle).await;

    assert_eq!(m.id(), permanent.id(), "only the permanent failure is dead");
    assert_eq!(m.payload(), permanent.payload());
    let h = m.headers();
    assert_eq!(h[header::DLQ_ERROR_KIND], "permanent");
    assert_eq!(h[header::DLQ_ATTEMPTS], "1");
    assert_eq!(h[header::DLQ_ORIGINAL_TOPIC], topic);
    assert!(
        h[header::DLQ_REASON].to_text().contains("refused record"),
        "reason: {}",
        h[header::DLQ_REASON]
    );
    assert_quiet(b, &mut dlq, "dead letters after the permanent one").await;

    let calls = calls.calls();
    let count = ids_seen(&calls);
    for m in &sent {
        let expected = if m.id() == flaky.id() { 2 } else { 1 };
        assert_eq!(
            count.get(m.id()),
            Some(&expected),
            "calls with {:?}",
            m.payload()
        );
    }
    let retry = calls
        .iter()
        .filter(|c| c.iter().any(|r| r.message.id() == flaky.id()))
        .nth(1)
        .expect("the flaky message's second call");
    assert_eq!(retry.len(), 1, "a failed message is retried on its own");
    assert_eq!(retry[0].attempt, 2, "the retry is the second attempt");
    let m = metrics.snapshot();
    assert_eq!(
        (m.handled, m.failed, m.retried, m.dead_lettered),
        (9, 2, 1, 1),
        "{m:?}"
    );
    // Everything was settled: the group has nothing left.
    let mut again = subscribe(b, &topic, &group).await;
    assert_quiet(b, &mut again, "the group after the batch").await;
}

/// With four lanes and batches of up to 6, each key's messages reach the
/// handler in order, batches of different lanes run in parallel, and a
/// message that failed in a batch is retried (alone) before any later
/// batch with its key.
pub async fn batch_keeps_per_key_order(b: &dyn TestBackend) {
    const KEYS: usize = 5;
    const PER_KEY: usize = 24;
    let topic = b.topic("batch-order").await;
    let group = unique("g");
    create_group(b, &topic, &group).await;
    // (call number, key, seq), in the order the handler saw them.
    let log: Arc<Mutex<Vec<(usize, String, usize)>>> = Arc::default();
    let calls = Arc::new(AtomicUsize::new(0));
    let done = Recorder::default();
    let (in_flight, max_in_flight) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let handler = {
        let (log, calls, done) = (log.clone(), calls.clone(), done.clone());
        let (in_flight, max_in_flight) = (in_flight.clone(), max_in_flight.clone());
        move |batch: Vec<Received>| {
            let (log, done) = (log.clone(), done.clone());
            let (in_flight, max_in_flight) = (in_flight.clone(), max_in_flight.clone());
            let call = calls.fetch_add(1, Ordering::SeqCst);
            async move {
                let now = in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                max_in_flight.fetch_max(now, Ordering::SeqCst);
                let mut failed = Vec::new();
                {
                    let mut log = log.lock().unwrap();
                    for (i, r) in batch.iter().enumerate() {
                        let (k, s) = (key(r), seq(r));
                        let first = !log.iter().any(|(_, lk, ls)| *lk == k && *ls == s);
                        log.push((call, k, s));
                        if s % 5 == 2 && first {
                            failed.push((i, HandlerError::retryable("fails once")));
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
                in_flight.fetch_sub(1, Ordering::SeqCst);
                for (i, r) in batch.into_iter().enumerate() {
                    if !failed.iter().any(|(f, _)| *f == i) {
                        done.record(r);
                    }
                }
                BatchError::check(failed)
            }
        }
    };
    let handle = start(
        consumer(b, &topic, &group)
            .await
            .concurrency(4)
            .batch(6, Duration::from_millis(50))
            .batch_handler(handler),
    )
    .await;
    publish_all(&*b.publisher().await, &topic, &keyed(KEYS * PER_KEY, KEYS)).await;
    done.wait_until(
        b.capabilities().receive_timeout * 2,
        "every message handled",
        |s| s.len() >= KEYS * PER_KEY,
    )
    .await;
    stop(handle).await;

    let log = log.lock().unwrap().clone();
    for k in (0..KEYS).map(|k| format!("k{k}")) {
        let entries: Vec<&(usize, String, usize)> =
            log.iter().filter(|(_, lk, _)| *lk == k).collect();
        // The first time each message was seen: in order, none missing.
        let mut first_call: HashMap<usize, usize> = HashMap::new();
        let mut firsts = Vec::new();
        for (pos, (call, _, s)) in entries.iter().enumerate() {
            match first_call.get(s) {
                None => {
                    first_call.insert(*s, *call);
                    firsts.push(*s);
                }
                Some(&failed_in) => {
                    // A retry: alone in its call, and no message of the key
                    // from a later batch was seen between failure and retry.
                    assert_eq!(
                        log.iter().filter(|(c, _, _)| c == call).count(),
                        1,
                        "key {k}: the retry of {s} was not alone in its call"
                    );
                    let since_failure = entries[..pos]
                        .iter()
                        .skip_while(|(c, _, ls)| !(*c == failed_in && *ls == *s))
                        .filter(|(c, _, ls)| first_call.get(ls) == Some(c));
                    for (c, _, later) in since_failure {
                        assert_eq!(
                            *c, failed_in,
                            "key {k}: {later} (a later batch) was handled before the retry of {s}"
                        );
                    }
                }
            }
        }
        let expected: Vec<usize> = (0..PER_KEY).collect();
        assert_eq!(firsts, expected, "key {k} handled out of order");
        let retried = entries.len() - PER_KEY;
        let failing = (0..PER_KEY).filter(|s| s % 5 == 2).count();
        assert_eq!(
            retried, failing,
            "key {k}: each failing message retried once"
        );
    }
    assert!(
        max_in_flight.load(Ordering::SeqCst) >= 2,
        "batches of different lanes never ran in parallel"
    );
}

/// [`typed_batch`]: undecodable and invalid payloads are dead-lettered at
/// once (kinds `decode` and `validation`) without reaching the handler,
/// which gets the valid events in order.
pub async fn typed_batch_dead_letters_invalid_events(b: &dyn TestBackend) {
    let topic = b.topic("batch-typed").await;
    let group = unique("g");
    create_group(b, &topic, &group).await;
    let mut dlq = subscribe(b, &dead_letter_topic(&topic), &unique("dlq")).await;
    let events: Arc<Mutex<Vec<(u32, String)>>> = Arc::default();
    let done = Recorder::default();
    let handler = {
        let (events, done) = (events.clone(), done.clone());
        typed_batch(move |batch: Vec<(SampleEvent, Received)>| {
            let (events, done) = (events.clone(), done.clone());
            async move {
                for (event, meta) in batch {
                    events.lock().unwrap().push((event.quantity, event.sku));
                    done.record(meta);
                }
                Ok::<(), BatchError>(())
            }
        })
    };
    let handle = start(
        consumer(b, &topic, &group)
            .await
            .batch(10, Duration::from_millis(200))
            .batch_handler(handler),
    )
    .await;
    let valid = |quantity: u32| {
        SampleEvent {
            quantity,
            sku: "sku-1".into(),
        }
        .to_message()
        .expect("valid event")
    };
    let garbage = Message::new("not json {").with_key("sku-1");
    let invalid = Message::new(r#"{"quantity":0,"sku":"sku-1"}"#).with_key("sku-1");
    let sent = vec![
        valid(1),
        garbage.clone(),
        valid(2),
        invalid.clone(),
        valid(3),
    ];
    publish_all(&*b.publisher().await, &topic, &sent).await;

    let letters: BTreeMap<String, Message> = take_acked(b, &mut dlq, 2, "dead letters")
        .await
        .into_iter()
        .map(|r| (r.message.id().to_owned(), r.message))
        .collect();
    done.wait_until(
        b.capabilities().receive_timeout,
        "valid events handled",
        |s| s.len() >= 3,
    )
    .await;
    stop(handle).await;
    assert_eq!(
        letters[garbage.id()].headers()[header::DLQ_ERROR_KIND],
        "decode"
    );
    assert_eq!(
        letters[invalid.id()].headers()[header::DLQ_ERROR_KIND],
        "validation"
    );
    assert_eq!(letters[garbage.id()].headers()[header::DLQ_ATTEMPTS], "1");
    assert_eq!(
        *events.lock().unwrap(),
        [
            (1, "sku-1".to_owned()),
            (2, "sku-1".into()),
            (3, "sku-1".into())
        ],
        "the valid events, in order, once each"
    );
}

/// Shutdown while a batch is being handled: that batch finishes and is
/// acknowledged; messages queued behind it are not handled but handed back,
/// and a new consumer of the group handles exactly those.
pub async fn batch_shutdown_hands_back_unstarted(b: &dyn TestBackend) {
    let topic = b.topic("batch-shutdown").await;
    let group = unique("g");
    create_group(b, &topic, &group).await;
    let sent = keyed(12, 1);
    publish_all(&*b.publisher().await, &topic, &sent).await;

    let first_calls = BatchRecorder::default();
    let release = Arc::new(tokio::sync::Semaphore::new(0));
    let handler = {
        let (calls, release) = (first_calls.clone(), release.clone());
        move |batch: Vec<Received>| {
            calls.record(batch);
            let release = release.clone();
            async move {
                let _permit = release.acquire().await.expect("semaphore open");
                Ok::<(), BatchError>(())
            }
        }
    };
    let first = start(
        consumer(b, &topic, &group)
            .await
            .batch(3, Duration::from_millis(20))
            .batch_handler(handler),
    )
    .await;
    first_calls
        .wait_until(
            b.capabilities().receive_timeout,
            "first batch started",
            |c| !c.is_empty(),
        )
        .await;
    // Ask for shutdown (the first poll sends the stop signal), then let the
    // batch in flight finish.
    let shutdown = first.shutdown(Duration::from_secs(10));
    tokio::pin!(shutdown);
    assert!(
        futures::poll!(&mut shutdown).is_pending(),
        "shutdown finished with a batch in flight"
    );
    release.add_permits(1_000);
    shutdown.await.expect("graceful shutdown");
    let handled_first = first_calls.messages();
    assert_eq!(
        first_calls.calls().len(),
        1,
        "a batch started after shutdown was asked for"
    );

    let second_calls = BatchRecorder::default();
    let second = start(
        consumer(b, &topic, &group)
            .await
            .batch(3, Duration::from_millis(20))
            .batch_handler(second_calls.handler()),
    )
    .await;
    let rest = sent.len() - handled_first.len();
    second_calls
        .wait_until(
            b.capabilities().receive_timeout * 2,
            "the rest handled by the next consumer",
            |c| c.iter().map(Vec::len).sum::<usize>() >= rest,
        )
        .await;
    tokio::time::sleep(b.capabilities().quiet_period).await;
    stop(second).await;
    let handled_second = second_calls.messages();
    let mut all = handled_first.clone();
    all.extend(handled_second.iter().cloned());
    assert_eq!(
        all.len(),
        sent.len(),
        "each message handled once: first {}, second {}",
        handled_first.len(),
        handled_second.len()
    );
    assert_eq!(received_ids(&all), ids(&sent));
    // The first consumer handled the head of the key; the order in which a
    // broker hands back requeued messages is the backend's (the memory
    // backend puts each in front), so the rest is compared as a set.
    let head: Vec<usize> = handled_first.iter().map(seq).collect();
    assert_eq!(head, (0..head.len()).collect::<Vec<_>>(), "the first batch");
}
