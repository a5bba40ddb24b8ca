//! Coalesced acks (`broker_rabbitmq` settles a channel's acks with
//! `multiple`): out-of-order acks, nacks in between and abandoned
//! deliveries settle exactly the deliveries they name, and held-back acks
//! reach the broker by the time the subscription closes.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use broker_core::testkit::unique;
use broker_core::{Delivery, DeliveryStream, Message, Publisher, Subscriber, Subscription};

const N: usize = 20;

async fn take(stream: &mut Box<dyn DeliveryStream>, n: usize) -> Vec<Delivery> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let d = tokio::time::timeout(Duration::from_secs(10), stream.next())
            .await
            .expect("a delivery within 10 s")
            .expect("stream open")
            .expect("delivery ok");
        out.push(d);
    }
    out
}

fn number(d: &Delivery) -> usize {
    std::str::from_utf8(d.message().payload())
        .expect("utf-8")
        .parse()
        .expect("a number")
}

/// Whatever arrives within `quiet` of the last delivery.
async fn drain(stream: &mut Box<dyn DeliveryStream>, quiet: Duration) -> Vec<Delivery> {
    let mut out = Vec::new();
    while let Ok(Some(d)) = tokio::time::timeout(quiet, stream.next()).await {
        out.push(d.expect("delivery ok"));
    }
    out
}

#[tokio::test]
async fn out_of_order_acks_nacks_and_abandoned_deliveries_settle_exactly_their_own() {
    if !broker_core::testkit::backend_selected("rabbitmq") {
        return;
    }
    let broker = common::broker().await;
    let topic = unique("rmq.settle");
    let subscription = Subscription::new(&topic, "g").with_prefetch(N);
    let mut stream = broker
        .subscribe(subscription.clone())
        .await
        .expect("subscribe");
    for i in 0..N {
        broker
            .publish(&topic, Message::new(i.to_string()))
            .await
            .expect("publish");
    }
    let mut held = take(&mut stream, N).await;
    held.sort_by_key(number);
    // Settled from the back, so every ack but the last waits behind open
    // deliveries: 5 requeued, 7 rejected, 12 dropped unsettled (abandoned),
    // 15 left open until the end.
    let mut open15 = None;
    for d in held.into_iter().rev() {
        match number(&d) {
            5 => d.nack(true).await.expect("nack requeue"),
            7 => d.nack(false).await.expect("nack reject"),
            12 => drop(d),
            15 => open15 = Some(d),
            _ => d.ack().await.expect("ack"),
        }
    }
    // Only the requeued and the abandoned come back, while 15 is still open
    // on the channel: no multiple ack covered it, nor 5 or 12.
    let again = drain(&mut stream, Duration::from_secs(2)).await;
    let numbers: BTreeSet<usize> = again.iter().map(number).collect();
    assert_eq!(numbers, BTreeSet::from([5, 12]), "redelivered");
    assert!(again.iter().all(|d| d.received.redelivered));
    for d in again {
        d.ack().await.expect("ack after the redelivery");
    }
    open15.expect("15 was held").ack().await.expect("ack 15");
    stream.close().await.expect("close");

    // The held-back acks reached the broker before the channel closed:
    // a new subscription of the group gets nothing back.
    let mut stream = broker.subscribe(subscription).await.expect("resubscribe");
    let left = drain(&mut stream, Duration::from_secs(2)).await;
    assert_eq!(
        left.iter().map(number).collect::<Vec<_>>(),
        Vec::<usize>::new(),
        "acked deliveries came back"
    );
    stream.close().await.expect("close");
}

#[tokio::test]
async fn a_lone_ack_is_not_held_back_while_other_deliveries_wait() {
    if !broker_core::testkit::backend_selected("rabbitmq") {
        return;
    }
    let broker = common::broker().await;
    let topic = unique("rmq.settle.lone");
    let subscription = Subscription::new(&topic, "g").with_prefetch(N);
    let mut stream = broker
        .subscribe(subscription.clone())
        .await
        .expect("subscribe");
    for i in 0..3 {
        broker
            .publish(&topic, Message::new(i.to_string()))
            .await
            .expect("publish");
    }
    let mut held = take(&mut stream, 3).await;
    held.sort_by_key(number);
    let mut held = held.into_iter();
    // The first is acked while the two others stay open: its ack is held
    // back at most the flush interval, not until the others settle.
    held.next().expect("0").ack().await.expect("ack 0");
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Dropping the stream without close: the channel goes, and what was not
    // acked by then is requeued.
    drop(held);
    drop(stream);
    let mut stream = broker.subscribe(subscription).await.expect("resubscribe");
    let left: BTreeSet<usize> = drain(&mut stream, Duration::from_secs(2))
        .await
        .iter()
        .map(number)
        .collect();
    assert_eq!(left, BTreeSet::from([1, 2]), "only the unacked come back");
    stream.close().await.expect("close");
}
