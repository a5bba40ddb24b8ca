//! Checks of delayed, non-blocking retries ([`crate::RetryMode::Delayed`]):
//! a failing message does not hold up the next 1,000 of its key (its
//! partition, on Kafka), its attempts are counted across retries and
//! across a consumer restart, it reaches the dead-letter topic after the
//! last attempt, and the handler never sees the runtime's `x-retry-*`
//! headers. Backends whose subscriber has no retry destination
//! ([`Subscriber::delayed_retry`] false) skip them.

use std::time::Instant;

use super::*;
use crate::message::header;
use crate::topic::dead_letter_topic;
use crate::{HandlerError, RetryMode};

/// Ordinary messages published behind the failing one, on its key.
pub const BEHIND: usize = 1000;

async fn skipped(b: &dyn TestBackend, check: &str) -> bool {
    if b.subscriber().await.delayed_retry() {
        return false;
    }
    eprintln!(
        "skipped {check}: {} has no delayed retry",
        b.capabilities().name
    );
    true
}

/// Delays of 1 s then 5 s: the first two tiers, exactly.
fn tiered_retry(attempts: u32) -> Backoff {
    Backoff::retry_default()
        .max_attempts(attempts)
        .initial_delay(Duration::from_secs(1))
        .multiplier(5.0)
        .max_delay(Duration::from_secs(5))
        .without_jitter()
}

fn no_retry_headers(r: &Received) {
    for name in [
        header::RETRY_ATTEMPT,
        header::RETRY_DUE,
        header::RETRY_GROUP,
    ] {
        assert!(
            r.message.headers().get(name).is_none(),
            "the handler saw the runtime's header {name}"
        );
    }
}

/// A message that fails twice does not hold up the [`BEHIND`] messages of
/// its key published after it: they are all handled before its third
/// attempt, which succeeds; attempts are 1, 2, 3; nothing is dead-lettered.
pub async fn delayed_retry_lets_later_messages_pass(b: &dyn TestBackend) {
    if skipped(b, "delayed_retry_lets_later_messages_pass").await {
        return;
    }
    let topic = b.topic("retry-pass").await;
    let group = unique("g");
    let recorder = Recorder::default();
    let handler = {
        let recorder = recorder.clone();
        move |r: Received| {
            let fail = r.message.payload().as_ref() == b"flaky" && r.attempt < 3;
            recorder.record(r);
            async move {
                match fail {
                    true => Err(HandlerError::retryable("not yet")),
                    false => Ok(()),
                }
            }
        }
    };
    let consumer = start(
        consumer(b, &topic, &group)
            .await
            .retry(tiered_retry(3))
            .retry_mode(RetryMode::Delayed)
            .handler(handler),
    )
    .await;
    let mut letters = subscribe(b, &dead_letter_topic(&topic), &unique("dlq")).await;
    let flaky = Message::new("flaky").with_key("same-key");
    let mut messages = vec![flaky.clone()];
    messages.extend((0..BEHIND).map(|i| Message::new(format!("m-{i}")).with_key("same-key")));
    let started = Instant::now();
    publish_all(&*b.publisher().await, &topic, &messages).await;
    recorder
        .wait_until(
            b.capabilities().receive_timeout * 2 + Duration::from_secs(10),
            "the failing message's third attempt and every message behind it",
            |s| s.len() >= BEHIND + 3,
        )
        .await;
    stop(consumer).await;
    let seen = recorder.seen();
    seen.iter().for_each(no_retry_headers);
    let flaky_at: Vec<(usize, u32)> = seen
        .iter()
        .enumerate()
        .filter(|(_, r)| r.message.id() == flaky.id())
        .map(|(i, r)| (i, r.attempt))
        .collect();
    let attempts: Vec<u32> = flaky_at.iter().map(|(_, a)| *a).collect();
    assert_eq!(attempts, [1, 2, 3], "the failing message's attempts");
    let last_behind = seen
        .iter()
        .rposition(|r| r.message.id() != flaky.id())
        .expect("messages behind");
    let handled_behind = seen.iter().filter(|r| r.message.id() != flaky.id()).count();
    assert_eq!(handled_behind, BEHIND, "each message behind handled once");
    assert!(
        last_behind < flaky_at[2].0,
        "the {BEHIND} messages behind the failing one waited for its retries \
         (last of them at position {last_behind}, its third attempt at {})",
        flaky_at[2].0
    );
    eprintln!(
        "{}: {BEHIND} messages passed a failing one of their key; all done in {:?}",
        b.capabilities().name,
        started.elapsed()
    );
    assert_quiet(b, &mut letters, "no dead letter").await;
    letters.close().await.expect("close");
}

/// A message that always fails reaches the dead-letter topic after the
/// last attempt, unchanged, with `x-dlq-attempts` = 3 and without the
/// runtime's retry headers.
pub async fn delayed_retry_dead_letters_after_the_last_attempt(b: &dyn TestBackend) {
    if skipped(b, "delayed_retry_dead_letters_after_the_last_attempt").await {
        return;
    }
    let topic = b.topic("retry-dlq").await;
    let group = unique("g");
    let mut letters = subscribe(b, &dead_letter_topic(&topic), &unique("dlq")).await;
    let recorder = Recorder::default();
    let handler = {
        let recorder = recorder.clone();
        move |r: Received| {
            recorder.record(r);
            async { Err(HandlerError::retryable("always fails")) }
        }
    };
    let consumer = start(
        consumer(b, &topic, &group)
            .await
            .retry(tiered_retry(3))
            .retry_mode(RetryMode::Delayed)
            .handler(handler),
    )
    .await;
    let sent = Message::new("doomed").with_key("k").with_header("h", "v");
    b.publisher()
        .await
        .publish(&topic, sent.clone())
        .await
        .expect("publish");
    let timeout = b.capabilities().receive_timeout + Duration::from_secs(10);
    let letter = match tokio::time::timeout(timeout, letters.next()).await {
        Ok(Some(Ok(d))) => d,
        other => panic!(
            "no dead letter within {timeout:?}: {:?}",
            other.map(|o| o.map(|r| r.map(|d| d.received)))
        ),
    };
    let m = letter.message();
    assert_eq!(m.id(), sent.id());
    assert_eq!(m.payload(), sent.payload());
    assert_eq!(m.headers().get_str("h"), Some("v"));
    assert_eq!(m.headers().get_str(header::DLQ_ATTEMPTS), Some("3"));
    assert!(
        m.headers().get(header::RETRY_ATTEMPT).is_none()
            && m.headers().get(header::RETRY_DUE).is_none(),
        "the letter keeps no retry header"
    );
    letter.ack().await.expect("ack");
    stop(consumer).await;
    let seen = recorder.seen();
    seen.iter().for_each(no_retry_headers);
    let attempts: Vec<u32> = seen.iter().map(|r| r.attempt).collect();
    assert_eq!(attempts, [1, 2, 3]);
    letters.close().await.expect("close");
}

/// The consumer stops while a retry waits in its 5 s tier; a new consumer
/// of the group gets it once, as attempt 2, and nothing is lost.
pub async fn delayed_retry_survives_a_consumer_restart(b: &dyn TestBackend) {
    if skipped(b, "delayed_retry_survives_a_consumer_restart").await {
        return;
    }
    let topic = b.topic("retry-restart").await;
    let group = unique("g");
    let recorder = Recorder::default();
    let handler = {
        let recorder = recorder.clone();
        move |r: Received| {
            let fail = r.attempt == 1;
            recorder.record(r);
            async move {
                match fail {
                    true => Err(HandlerError::retryable("first attempt fails")),
                    false => Ok(()),
                }
            }
        }
    };
    // Only a 5 s tier: time to restart while the copy waits.
    let policy = Backoff::retry_default()
        .max_attempts(3)
        .initial_delay(Duration::from_secs(5))
        .max_delay(Duration::from_secs(5))
        .without_jitter();
    let build = || async {
        consumer(b, &topic, &group)
            .await
            .retry(policy.clone())
            .retry_mode(RetryMode::Delayed)
            .handler(handler.clone())
    };
    let first = start(build().await).await;
    let sent = Message::new("once").with_key("k");
    b.publisher()
        .await
        .publish(&topic, sent.clone())
        .await
        .expect("publish");
    recorder
        .wait_until(b.capabilities().receive_timeout, "the first attempt", |s| {
            !s.is_empty()
        })
        .await;
    let failed_at = Instant::now();
    stop(first).await;
    assert!(
        failed_at.elapsed() < Duration::from_secs(4),
        "the consumer stopped while the retry waited"
    );
    let second = start(build().await).await;
    recorder
        .wait_until(
            b.capabilities().receive_timeout + Duration::from_secs(10),
            "the retry after the restart",
            |s| s.len() >= 2,
        )
        .await;
    // Anything more would come within the quiet period.
    tokio::time::sleep(b.capabilities().quiet_period).await;
    stop(second).await;
    let seen = recorder.seen();
    seen.iter().for_each(no_retry_headers);
    let attempts: Vec<(String, u32)> = seen
        .iter()
        .map(|r| (r.message.id().to_owned(), r.attempt))
        .collect();
    assert_eq!(
        attempts,
        [(sent.id().to_owned(), 1), (sent.id().to_owned(), 2)],
        "attempt 1 before the restart, attempt 2 after it, nothing else"
    );
}
