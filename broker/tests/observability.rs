//! Observability across a real broker: OpenTelemetry trace context from the
//! publisher's span to the handle span (feature `otel`). Memory always;
//! Kafka and RabbitMQ against the test brokers (`KAFKA_BROKERS`,
//! `RABBITMQ_URL`; `bash scripts/test.sh` starts both), skipped when
//! `BROKER_TEST_BACKENDS` leaves them out.

#![cfg(feature = "otel")]

use std::time::Duration;

use broker::config::BrokerConfig;
use broker::{Brokers, BrokersBuilder, Endpoints};
#[cfg(any(feature = "kafka", feature = "rabbitmq"))]
use broker_core::testkit::backend_selected;
use broker_core::testkit::unique;

#[allow(dead_code)] // unused when both backends are compiled out
async fn connect(backend: &str) -> Brokers {
    match backend {
        "memory" => Brokers::connect(BrokerConfig::memory()).await.unwrap(),
        "rabbitmq" => {
            let url = std::env::var("RABBITMQ_URL")
                .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
            BrokersBuilder::from_vars([
                ("RABBITMQ_URL", url.as_str()),
                ("RABBITMQ_QUEUE_EXPIRY_MS", "120000"),
            ])
            .unwrap()
            .connect()
            .await
            .expect("connect to RabbitMQ")
        }
        "kafka" => {
            let servers =
                std::env::var("KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into());
            BrokersBuilder::from_vars([("KAFKA_ENABLED", "true"), ("KAFKA_BROKERS", &servers)])
                .unwrap()
                .connect()
                .await
                .expect("connect to Kafka")
        }
        other => panic!("unknown backend {other}"),
    }
}

fn endpoints(brokers: &Brokers) -> Endpoints {
    brokers.endpoints("observed").unwrap()
}

/// Waits for `n` items on `rx`.
async fn take<T>(rx: &mut tokio::sync::mpsc::UnboundedReceiver<T>, n: usize) -> Vec<T> {
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(90), async {
        while got.len() < n {
            got.push(rx.recv().await.expect("handler channel open"));
        }
    })
    .await
    .unwrap_or_else(|_| panic!("only {} of {n} messages handled in time", got.len()));
    got
}

#[cfg(feature = "otel")]
mod trace {
    use super::*;

    use broker::{Message, Publisher, Received};
    use opentelemetry::trace::{SpanContext, TraceContextExt, TracerProvider as _};
    use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
    use tracing::Instrument;
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    use tracing_subscriber::layer::SubscriberExt;

    /// What the handler saw: the message's `traceparent` and the span
    /// context it ran in.
    type Seen = (Option<String>, SpanContext);

    /// Publishes one message inside an `http_request` span and one that
    /// carries its own `traceparent`, handles both on `backend`, and checks
    /// the spans the OpenTelemetry layer exported.
    async fn trace_crosses(backend: &str) {
        let exporter = InMemorySpanExporter::default();
        let provider = SdkTracerProvider::builder()
            .with_simple_exporter(exporter.clone())
            .build();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("observability")));
        // Current-thread runtime: the consumer's tasks run on this thread,
        // under this subscriber.
        let _guard = tracing::subscriber::set_default(subscriber);

        let brokers = connect(backend).await;
        let endpoints = endpoints(&brokers);
        let topic = unique(&format!("obs.trace.{backend}"));
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Seen>();
        let consumer = endpoints
            .consumer(&topic, &unique("traced"))
            .handler(move |received: Received| {
                let tx = tx.clone();
                async move {
                    let cx = tracing::Span::current().context();
                    let seen = cx.span().span_context().clone();
                    tx.send((received.message.traceparent().map(str::to_owned), seen))
                        .unwrap();
                    Ok(())
                }
            })
            .start()
            .await
            .expect("consumer starts");

        let request = tracing::info_span!("http_request");
        endpoints
            .publisher
            .publish(&topic, Message::new("traced").with_key("k"))
            .instrument(request.clone())
            .await
            .expect("publish");
        let request_cx = request.context().span().span_context().clone();
        drop(request);
        let seen = take(&mut rx, 1).await.remove(0);

        // A message that already has a traceparent keeps it, even inside a span.
        let own = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        endpoints
            .publisher
            .publish(
                &topic,
                Message::new("own").with_key("k").with_traceparent(own),
            )
            .instrument(tracing::info_span!("other_request"))
            .await
            .expect("publish");
        let seen_own = take(&mut rx, 1).await.remove(0);

        consumer.shutdown(Duration::from_secs(10)).await.unwrap();
        brokers.close().await.unwrap();
        provider.force_flush().unwrap();
        let spans = exporter.get_finished_spans().unwrap();
        // The runtime's and the Instrumented layer's spans of this topic
        // (the ones with a `traceparent`: backends and client libraries
        // have spans named `publish` too).
        let named = |name: &str| -> Vec<&SpanData> {
            let has =
                |s: &SpanData, key: &str| s.attributes.iter().any(|kv| kv.key.as_str() == key);
            spans
                .iter()
                .filter(|s| {
                    s.name == name
                        && has(s, "traceparent")
                        && s.attributes
                            .iter()
                            .any(|kv| kv.key.as_str() == "topic" && kv.value.as_str() == topic)
                })
                .collect::<Vec<_>>()
        };
        let publishes = named("publish");
        let handles = named("handle");
        assert_eq!(publishes.len(), 2, "publish spans: {spans:#?}");
        assert_eq!(handles.len(), 2, "handle spans: {spans:#?}");
        let trace_id = request_cx.trace_id();
        assert!(request_cx.is_valid());

        // The publish span is a child of the request's; its context is
        // what the message carries.
        let publish = publishes
            .iter()
            .find(|s| s.parent_span_id == request_cx.span_id())
            .expect("a publish span under the request span");
        assert_eq!(publish.span_context.trace_id(), trace_id);
        let publish_id = publish.span_context.span_id();
        assert_eq!(
            seen.0.as_deref(),
            Some(format!("00-{trace_id}-{publish_id}-01").as_str()),
            "the message carries the publish span's context"
        );

        // The handle span continues the publisher's trace, as a child of
        // the publish span; the handler runs inside it.
        let handle = handles
            .iter()
            .find(|s| s.span_context.trace_id() == trace_id)
            .expect("a handle span in the request's trace");
        assert_eq!(handle.parent_span_id, publish_id);
        assert!(handle.parent_span_is_remote);
        assert_eq!(seen.1.trace_id(), trace_id);
        assert_eq!(seen.1.span_id(), handle.span_context.span_id());

        // The message with its own traceparent: kept as it was, and the
        // handle span is the child of the span it names.
        assert_eq!(seen_own.0.as_deref(), Some(own));
        let handle_own = handles
            .iter()
            .find(|s| s.span_context.trace_id() != trace_id)
            .expect("a second handle span");
        assert_eq!(
            handle_own.span_context.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(handle_own.parent_span_id.to_string(), "00f067aa0ba902b7");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn memory_handle_span_continues_the_publishers_trace() {
        trace_crosses("memory").await;
    }

    #[cfg(feature = "rabbitmq")]
    #[tokio::test(flavor = "current_thread")]
    async fn rabbitmq_handle_span_continues_the_publishers_trace() {
        if backend_selected("rabbitmq") {
            trace_crosses("rabbitmq").await;
        }
    }

    #[cfg(feature = "kafka")]
    #[tokio::test(flavor = "current_thread")]
    async fn kafka_handle_span_continues_the_publishers_trace() {
        if backend_selected("kafka") {
            trace_crosses("kafka").await;
        }
    }
}
