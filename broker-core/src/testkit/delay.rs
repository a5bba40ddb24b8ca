//! Checks of delayed publish ([`Publisher::publish_after`]): the delay is
//! kept (never early, at most one tier late), the message arrives exactly
//! as published, tiers leave in due order, and a message waits for a
//! consumer that restarts. Backends without delayed publish
//! ([`TestBackend::delayed_publish`] false) skip them.

use std::time::{Duration, Instant, SystemTime};

use super::*;
use crate::delay::{Tier, MAX_DELAY};
use crate::{AmqpProperties, AmqpValue, BrokerError, HeaderValue};

/// What a broker may add to a tier's wait (its own latency, a loaded test
/// machine) before a delayed message counts as late.
pub const DELAY_LATENCY: Duration = Duration::from_secs(2);

fn skipped(b: &dyn TestBackend, check: &str) -> bool {
    if b.delayed_publish() {
        return false;
    }
    eprintln!(
        "skipped {check}: {} has no delayed publish",
        b.capabilities().name
    );
    true
}

/// The tier `delay` waits.
fn tier(delay: Duration) -> Duration {
    Tier::for_delay(delay)
        .expect("a valid delay")
        .expect("a delay above zero")
        .duration()
}

/// The next delivery within `within`, or a panic naming `what`.
async fn next_within(
    stream: &mut Box<dyn DeliveryStream>,
    within: Duration,
    what: &str,
) -> Delivery {
    match tokio::time::timeout(within, stream.next()).await {
        Ok(Some(Ok(d))) => d,
        Ok(Some(Err(e))) => panic!("{what}: subscription failed: {e}"),
        Ok(None) => panic!("{what}: subscription ended"),
        Err(_) => panic!("{what}: nothing delivered within {within:?}"),
    }
}

/// A message using every field the backend carries.
fn faithful(b: &dyn TestBackend, payload: &str) -> Message {
    let mut m = Message::new(payload.to_owned())
        .with_key(&[0x00, 0xff, b'k'][..])
        .with_header("z-last", "1")
        .with_header("dup", "a")
        .with_header("a-first", &[0xfe, 0x00][..])
        .with_header("dup", "b")
        .with_header("nothing", HeaderValue::Null)
        .with_content_type("application/octet-stream")
        .with_correlation_id("corr-delayed")
        .with_traceparent("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
        .with_timestamp(SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_123));
    if b.capabilities().keeps_amqp {
        m = m
            .with_header("typed", AmqpValue::I64(-42))
            .with_amqp(AmqpProperties {
                kind: Some("reminder.due".into()),
                app_id: Some("conformance".into()),
                priority: Some(3),
                // Shorter than the delay: a broker that let it run during
                // the wait would deliver early or drop it.
                expiration: Some("1000".into()),
                ..Default::default()
            });
    }
    m
}

/// A delayed message arrives no earlier than its delay and no later than
/// its tier (plus [`DELAY_LATENCY`]), exactly as published (id, key,
/// headers in order, properties, payload), as a first delivery
/// (attempt 1, not redelivered). A zero delay publishes at once; a delay
/// above the longest tier is refused and sends nothing.
pub async fn delayed_publish_arrives_after_its_delay_exactly(b: &dyn TestBackend) {
    if skipped(b, "delayed_publish_arrives_after_its_delay_exactly") {
        return;
    }
    let topic = b.topic("delayed").await;
    let mut stream = subscribe(b, &topic, &unique("g")).await;
    let p = b.publisher().await;

    let delay = Duration::from_millis(2_500);
    let sent = faithful(b, "due in 2.5 s");
    let started = Instant::now();
    p.publish_after(&topic, sent.clone(), delay)
        .await
        .unwrap_or_else(|e| panic!("publish_after {delay:?}: {e}"));

    let too_long = MAX_DELAY + Duration::from_secs(1);
    match p
        .publish_after(&topic, Message::new("never"), too_long)
        .await
    {
        Err(BrokerError::DelayTooLong { delay, max }) => {
            assert_eq!((delay, max), (too_long, MAX_DELAY));
        }
        other => panic!("a delay above {MAX_DELAY:?} must fail with DelayTooLong, got {other:?}"),
    }

    let now = Message::new("no delay").with_key("k");
    p.publish_after(&topic, now.clone(), Duration::ZERO)
        .await
        .unwrap_or_else(|e| panic!("publish_after zero: {e}"));
    let first = next(b, &mut stream, "the message without delay").await;
    assert_eq!(
        first.message().id(),
        now.id(),
        "a zero delay publishes at once, before the delayed message"
    );
    assert!(
        started.elapsed() < delay,
        "zero delay arrived only after {:?}",
        started.elapsed()
    );
    first.ack().await.expect("ack");

    let latest = tier(delay) + DELAY_LATENCY;
    let d = next_within(&mut stream, latest, "the delayed message").await;
    let waited = started.elapsed();
    assert!(
        waited >= delay,
        "delayed by {delay:?}, arrived early after {waited:?}"
    );
    assert!(
        waited <= latest,
        "delayed by {delay:?} (tier {:?}), arrived late after {waited:?}",
        tier(delay)
    );
    assert_eq!(
        d.message(),
        &sent,
        "the delayed message must arrive exactly as published"
    );
    assert!(!d.received.redelivered, "the delay is not a redelivery");
    assert_eq!(d.received.attempt, 1, "the delay is not a delivery attempt");
    d.ack().await.expect("ack");
    assert_quiet(b, &mut stream, "after the delayed message").await;
}

/// Delays to different tiers arrive in due order, not publish order, and
/// messages of one tier in the order they were published.
pub async fn delayed_messages_arrive_in_due_order(b: &dyn TestBackend) {
    if skipped(b, "delayed_messages_arrive_in_due_order") {
        return;
    }
    let topic = b.topic("delay-order").await;
    let mut stream = subscribe(b, &topic, &unique("g")).await;
    let p = b.publisher().await;
    let plan = [
        ("late", Duration::from_secs(4)),
        ("early", Duration::from_secs(1)),
        ("early-too", Duration::from_millis(400)),
    ];
    let started = Instant::now();
    for (payload, delay) in plan {
        p.publish_after(&topic, Message::new(payload), delay)
            .await
            .unwrap_or_else(|e| panic!("publish_after {payload}: {e}"));
    }
    let latest = tier(Duration::from_secs(4)) + DELAY_LATENCY;
    let mut order = Vec::new();
    for (payload, delay) in [plan[1], plan[2], plan[0]] {
        let d = next_within(&mut stream, latest, &format!("`{payload}`")).await;
        assert!(
            started.elapsed() >= delay,
            "`{payload}` arrived after {:?}, before its delay {delay:?}",
            started.elapsed()
        );
        order.push(String::from_utf8_lossy(d.message().payload()).into_owned());
        d.ack().await.expect("ack");
    }
    assert_eq!(
        order,
        ["early", "early-too", "late"],
        "due order: the 1 s tier (in publish order) before the 5 s tier"
    );
    assert_quiet(b, &mut stream, "after the delayed messages").await;
}

/// A consumer that stops while delayed messages wait and starts again (on
/// a new connection) gets each of them once: one that fell due while it
/// was away, one that falls due after it is back.
pub async fn delayed_message_waits_through_a_consumer_restart(b: &dyn TestBackend) {
    if skipped(b, "delayed_message_waits_through_a_consumer_restart") {
        return;
    }
    let topic = b.topic("delay-restart").await;
    let group = unique("g");
    let stream = subscribe(b, &topic, &group).await;
    let p = b.publisher().await;
    let while_away = Message::new("due while away").with_key("k1");
    let after_return = Message::new("due after the restart").with_key("k2");
    let started = Instant::now();
    p.publish_after(&topic, while_away.clone(), Duration::from_millis(500))
        .await
        .expect("publish_after 500 ms");
    p.publish_after(&topic, after_return.clone(), Duration::from_secs(4))
        .await
        .expect("publish_after 4 s");
    stream.close().await.expect("close the first subscription");

    // Away past the first message's tier, back before the second's.
    tokio::time::sleep(tier(Duration::from_millis(500)) + Duration::from_millis(500)).await;
    let mut stream = subscribe(b, &topic, &group).await;
    let latest = tier(Duration::from_secs(4)) + DELAY_LATENCY;
    for expected in [&while_away, &after_return] {
        let d = next_within(&mut stream, latest, "after the restart").await;
        assert_eq!(d.message(), expected, "each delayed message, in due order");
        assert!(
            !d.received.redelivered,
            "never delivered before the restart"
        );
        assert_eq!(d.received.attempt, 1);
        d.ack().await.expect("ack");
    }
    assert!(started.elapsed() >= Duration::from_secs(4));
    assert_quiet(b, &mut stream, "each delayed message once").await;
}
