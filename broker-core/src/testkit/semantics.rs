//! Checks of what the README promises every backend shares beyond the first
//! round: publishing before anyone subscribed, required groups, dead-letter
//! topics read by several groups, settling after close.

use std::time::Duration;

use super::*;
use crate::handler::HandlerError;
use crate::topic::dead_letter_topic;
use crate::{BrokerError, Message, Received};

/// Publishing to a topic no group has subscribed to yet succeeds (single
/// and batch). A group that subscribes afterwards receives what follows,
/// and, where the backend keeps messages for new groups
/// ([`TestBackend::new_groups_read_earlier_messages`]), the earlier ones too.
pub async fn publish_before_any_subscription_succeeds(b: &dyn TestBackend) {
    let topic = b.topic("early").await;
    let p = b.publisher().await;
    let first = Message::new("nobody subscribed yet").with_key("k");
    p.publish(&topic, first.clone())
        .await
        .unwrap_or_else(|e| panic!("publish before any subscription: {e}"));
    let batch = numbered(3, "early");
    p.publish_batch(&topic, batch.clone())
        .await
        .unwrap_or_else(|e| panic!("batch publish before any subscription: {e}"));

    let mut stream = subscribe(b, &topic, &unique("g")).await;
    let later = Message::new("after the first subscription").with_key("k");
    p.publish(&topic, later.clone())
        .await
        .expect("publish after subscribing");
    let mut expected = vec![later];
    if b.new_groups_read_earlier_messages() {
        expected.push(first);
        expected.extend(batch);
    }
    let got = take_acked(b, &mut stream, expected.len(), "new group").await;
    assert_eq!(received_ids(&got), ids(&expected));
    assert_quiet(b, &mut stream, "new group after the expected messages").await;
}

/// A group the publisher names as required receives every message,
/// including those published before the group first subscribed.
pub async fn required_group_receives_earlier_messages(b: &dyn TestBackend) {
    let topic = b.topic("required").await;
    let groups = [unique("req-a"), unique("req-b")];
    let p = b.publisher_with_required_groups(&topic, &groups).await;
    let sent = numbered(5, "before");
    publish_all(&*p, &topic, &sent).await;

    for group in &groups {
        let mut stream = subscribe(b, &topic, group).await;
        let got = take_acked(b, &mut stream, sent.len(), &format!("required {group}")).await;
        assert_eq!(
            received_ids(&got),
            ids(&sent),
            "required group {group} must get what was published before it subscribed"
        );
        assert_quiet(b, &mut stream, &format!("required {group} after all")).await;
        stream.close().await.expect("close");
    }
}

/// Two groups reading `{topic}.dlq` each get every dead letter written
/// after they subscribed, and, where the backend keeps messages for new
/// groups, the ones written before. The backend's dead-letter archive group
/// ([`TestBackend::dead_letter_archive_group`]), if it has one, gets them all.
pub async fn every_dead_letter_group_gets_every_letter(b: &dyn TestBackend) {
    let topic = b.topic("dlq-groups").await;
    let dlq = dead_letter_topic(&topic);
    let handle = start(
        consumer(b, &topic, &unique("g"))
            .await
            .handler(|_r: Received| async { Err::<(), _>(HandlerError::permanent("refused")) }),
    )
    .await;
    let p = b.publisher().await;
    let dead_lettered = |n: u64| {
        let handle = &handle;
        async move {
            let timeout = b.capabilities().receive_timeout;
            let deadline = tokio::time::Instant::now() + timeout;
            while handle.metrics().dead_lettered < n {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "{n} dead letters not written within {timeout:?}"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    let early = Message::new("dead before anyone looked").with_key("k");
    p.publish(&topic, early.clone()).await.expect("publish");
    dead_lettered(1).await;

    let groups = [unique("dlq-a"), unique("dlq-b")];
    let mut readers = Vec::new();
    for group in &groups {
        readers.push(subscribe(b, &dlq, group).await);
    }
    let late = Message::new("dead while they read").with_key("k");
    p.publish(&topic, late.clone()).await.expect("publish");
    dead_lettered(2).await;
    stop(handle).await;

    let mut expected = vec![late.clone()];
    if b.new_groups_read_earlier_messages() {
        expected.push(early.clone());
    }
    for (group, stream) in groups.iter().zip(&mut readers) {
        let what = format!("dead-letter group {group}");
        let got = take_acked(b, stream, expected.len(), &what).await;
        assert_eq!(received_ids(&got), ids(&expected), "{what}");
        assert_quiet(b, stream, &format!("{what} after its letters")).await;
    }
    if let Some(archive) = b.dead_letter_archive_group() {
        let mut stream = subscribe(b, &dlq, &archive).await;
        let got = take_acked(b, &mut stream, 2, "dead-letter archive").await;
        assert_eq!(
            received_ids(&got),
            ids(&[early, late]),
            "dead-letter archive"
        );
    }
}

/// `ack` and `nack` of a delivery whose subscription closed fail with
/// [`BrokerError::Closed`] and change nothing: the group gets the messages again.
pub async fn settling_after_close_is_closed(b: &dyn TestBackend) {
    let topic = b.topic("late-ack").await;
    let group = unique("g");
    let mut stream = subscribe(b, &topic, &group).await;
    let sent = numbered(2, "late");
    publish_all(&*b.publisher().await, &topic, &sent).await;
    let first = next(b, &mut stream, "first delivery").await;
    let second = next(b, &mut stream, "second delivery").await;
    stream.close().await.expect("close");

    let acked = first.ack().await;
    assert!(
        matches!(acked, Err(BrokerError::Closed(_))),
        "ack after close: {acked:?}"
    );
    let nacked = second.nack(true).await;
    assert!(
        matches!(nacked, Err(BrokerError::Closed(_))),
        "nack after close: {nacked:?}"
    );
    let mut again = subscribe(b, &topic, &group).await;
    let got = take_acked(b, &mut again, 2, "after the refused settlements").await;
    assert_eq!(received_ids(&got), ids(&sent));
}
