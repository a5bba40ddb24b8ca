//! Checks of the message model: what is published arrives byte for byte,
//! also through the dead-letter topic and a replay of it.

use std::time::{Duration, SystemTime};

use super::*;
use crate::handler::HandlerError;
use crate::message::header;
use crate::topic::dead_letter_topic;
use crate::{AmqpProperties, AmqpValue, HeaderValue, Headers};

/// A message with everything the model keeps that every backend carries:
/// a key and header values that are not UTF-8, a repeated header name,
/// names out of order, an empty and a null value, a content type.
pub fn exact_message() -> Message {
    Message::new(&[0xff, 0xfe, 0x00, 0x41][..])
        .with_key(&[0xff, 0xfe, 0x00, 0x41][..])
        .with_content_type("application/octet-stream")
        .with_header("z-bytes", &[0xff, 0xfe][..])
        .with_header("dup", "1")
        .with_header("a-empty", "")
        .with_header("dup", "2")
        .with_header("null", HeaderValue::Null)
        .with_header("unicode", "caf\u{e9} \u{2713}")
        .with_correlation_id("corr-1")
        .with_traceparent("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
        .with_timestamp(SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_123))
}

/// A message with typed AMQP header values and AMQP properties, as one
/// from another AMQP client would have.
pub fn amqp_message() -> Message {
    Message::new("typed")
        .with_key("k")
        .with_content_type("application/json")
        .with_header("int", AmqpValue::I32(-42))
        .with_header("long", AmqpValue::I64(1 << 40))
        .with_header("bool", AmqpValue::Bool(true))
        .with_header("double", AmqpValue::F64(2.5))
        .with_header(
            "decimal",
            AmqpValue::Decimal {
                scale: 2,
                value: 12345,
            },
        )
        .with_header("stamp", AmqpValue::Timestamp(1_700_000_000))
        .with_header("raw", AmqpValue::ByteArray((&[0xff, 0x00][..]).into()))
        .with_header(
            "list",
            AmqpValue::Array(vec![AmqpValue::I32(1), AmqpValue::LongString("x".into())]),
        )
        .with_header(
            "table",
            AmqpValue::Table(vec![
                ("a".into(), AmqpValue::Bool(false)),
                ("b".into(), AmqpValue::Void),
            ]),
        )
        .with_amqp(AmqpProperties {
            kind: Some("order.created".into()),
            app_id: Some("shop".into()),
            reply_to: Some("replies".into()),
            priority: Some(3),
            content_encoding: Some("identity".into()),
            expiration: Some("600000".into()),
            ..Default::default()
        })
}

/// `sent` as `b` carries it: unchanged where the backend keeps AMQP types
/// and properties; else typed values as their text and no AMQP properties
/// (the README's mapping table).
pub fn as_carried(b: &dyn TestBackend, sent: &Message) -> Message {
    if b.capabilities().keeps_amqp {
        return sent.clone();
    }
    let headers: Headers = sent
        .headers()
        .iter()
        .map(|(n, v)| match v {
            HeaderValue::Amqp(a) => (n, HeaderValue::from(a.to_text())),
            other => (n, other.clone()),
        })
        .collect();
    sent.clone()
        .with_headers(headers)
        .with_amqp(AmqpProperties::default())
}

/// A dead letter or a replay drops `expiration`, as RabbitMQ does.
fn without_expiration(mut m: Message) -> Message {
    if m.amqp().is_some_and(|p| p.expiration.is_some()) {
        m.amqp_mut().expiration = None;
    }
    m
}

/// Keys and header values that are not UTF-8, repeated header names, header
/// order, empty and null values and the content type arrive exactly.
pub async fn bytes_and_repeated_headers_arrive_exactly(b: &dyn TestBackend) {
    let topic = b.topic("exact").await;
    let mut stream = subscribe(b, &topic, &unique("g")).await;
    let sent = exact_message();
    b.publisher()
        .await
        .publish(&topic, sent.clone())
        .await
        .expect("publish");
    let got = take_acked(b, &mut stream, 1, "exact message").await;
    assert_eq!(got[0].message, sent, "message changed in transit");
    assert_eq!(got[0].message.key(), Some(&[0xff, 0xfe, 0x00, 0x41][..]));
    assert_eq!(
        got[0].message.headers().get_all("dup").collect::<Vec<_>>(),
        ["1", "2"]
    );
}

/// Typed AMQP header values and AMQP properties arrive with their types
/// where the backend keeps them, as text where it does not.
pub async fn typed_headers_and_properties_arrive_as_mapped(b: &dyn TestBackend) {
    let topic = b.topic("typed").await;
    let mut stream = subscribe(b, &topic, &unique("g")).await;
    let sent = amqp_message();
    b.publisher()
        .await
        .publish(&topic, sent.clone())
        .await
        .expect("publish");
    let got = take_acked(b, &mut stream, 1, "typed message").await;
    assert_eq!(
        got[0].message,
        as_carried(b, &sent),
        "typed message mapped wrongly"
    );
    if !b.capabilities().keeps_amqp {
        assert_eq!(got[0].message.headers()["decimal"], "123.45");
        assert_eq!(got[0].message.headers()["int"], "-42");
    }
}

/// A message dead-lettered and replayed is the message sent: the dead
/// letter carries it unchanged plus the `x-dlq-*` headers (and without
/// `expiration`), and the replay puts exactly it back on its topic.
pub async fn dead_letter_and_replay_keep_the_message(b: &dyn TestBackend) {
    let topic = b.topic("exact-dlq").await;
    let dlq = dead_letter_topic(&topic);
    let group = unique("g");
    let (audit, replayer, reader) = (unique("audit"), unique("replay"), unique("reader"));
    // Every group exists before anything is written, so every backend keeps
    // what they will read (joined together: Kafka group joins take seconds).
    let (mut letters, replay_group, mut after_replay) = tokio::join!(
        subscribe(b, &dlq, &audit),
        subscribe(b, &dlq, &replayer),
        subscribe(b, &topic, &reader),
    );
    replay_group.close().await.expect("close");

    let sent = amqp_message()
        .with_key(&[0xff, 0xfe][..])
        .with_header("dup", &[0xff][..])
        .with_header("dup", HeaderValue::Null);
    let handle = start(
        consumer(b, &topic, &group)
            .await
            .handler(|_r: Received| async { Err::<(), _>(HandlerError::permanent("refused")) }),
    )
    .await;
    b.publisher()
        .await
        .publish(&topic, sent.clone())
        .await
        .expect("publish");

    let letter = next(b, &mut letters, "dead letter").await;
    let mut body = letter.message().clone();
    letter.ack().await.expect("ack dead letter");
    assert_eq!(body.headers()[header::DLQ_ORIGINAL_TOPIC], topic);
    body.headers_mut().retain(|n, _| !n.starts_with("x-dlq-"));
    let expected = without_expiration(as_carried(b, &sent));
    assert_eq!(body, expected, "dead letter differs from the message");
    stop(handle).await;

    // The first delivery to `reader` is the original.
    let original = take_acked(b, &mut after_replay, 1, "original").await;
    assert_eq!(original[0].message, as_carried(b, &sent));

    let subscriber = b.subscriber().await;
    let publisher = b.publisher().await;
    let report = crate::migrate::replay_dead_letters(
        &*subscriber,
        &*publisher,
        &dlq,
        &replayer,
        1,
        b.capabilities().receive_timeout,
    )
    .await
    .expect("replay");
    assert_eq!((report.replayed, report.left), (1, 0), "{report:?}");
    let replayed = take_acked(b, &mut after_replay, 1, "replayed").await;
    assert_eq!(replayed[0].message, expected, "replay changed the message");
}
