//! Observability across a real broker: OpenTelemetry trace context from the
//! publisher's span to the handle span (feature `otel`), and the labelled
//! metrics after publish and handle (feature `metrics`). Memory always;
//! Kafka and RabbitMQ against the test brokers (`KAFKA_BROKERS`,
//! `RABBITMQ_URL`; `bash scripts/test.sh` starts both), skipped when
//! `BROKER_TEST_BACKENDS` leaves them out.

#![cfg(any(feature = "otel", feature = "metrics"))]

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

#[cfg(feature = "metrics")]
mod labelled_metrics {
    use super::*;

    use broker::metrics::names;
    use broker::{HandlerError, Message, MetricsSnapshot, Publisher, Received};
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};
    use metrics_util::MetricKind;

    /// One metric's kind, name, sorted labels and value.
    type Row = (MetricKind, String, Vec<(String, String)>, DebugValue);

    /// Publishes `ok`, `flaky` (fails once, then succeeds) and `bad`
    /// (permanent failure: dead-lettered) on `backend` with a local
    /// recorder, returning what it recorded and the consumer's counters.
    fn run(backend: &'static str, topic: &str, group: &str) -> (Vec<Row>, MetricsSnapshot) {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        // Current-thread runtime inside the local recorder's scope: every
        // task of the consumer records into it.
        let counters = metrics::with_local_recorder(&recorder, || {
            runtime.block_on(async {
                let brokers = connect(backend).await;
                let endpoints = endpoints(&brokers);
                let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
                let flaky_failed = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
                let consumer = endpoints
                    .consumer(topic, group)
                    .retry(broker_core::testkit::fast_retry(3))
                    .handler(move |received: Received| {
                        let tx = tx.clone();
                        let flaky_failed = flaky_failed.clone();
                        async move {
                            let body = String::from_utf8(received.message.payload().to_vec())
                                .expect("utf-8 payload");
                            let result = match body.as_str() {
                                "bad" => Err(HandlerError::permanent("refused for good")),
                                "flaky"
                                    if !flaky_failed
                                        .swap(true, std::sync::atomic::Ordering::SeqCst) =>
                                {
                                    Err(HandlerError::retryable("try again"))
                                }
                                _ => Ok(()),
                            };
                            tx.send(format!("{body}:{}", result.is_ok())).unwrap();
                            result
                        }
                    })
                    .start()
                    .await
                    .expect("consumer starts");
                for body in ["ok", "flaky", "bad"] {
                    endpoints
                        .publisher
                        .publish(topic, Message::new(body).with_key("k"))
                        .await
                        .expect("publish");
                }
                // ok, flaky (failed), flaky (retried), bad.
                let seen = take(&mut rx, 4).await;
                assert!(seen.contains(&"flaky:true".to_owned()), "{seen:?}");
                // The dead letter is published after the handler returned.
                let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
                while consumer.metrics().dead_lettered == 0 {
                    assert!(tokio::time::Instant::now() < deadline, "no dead letter");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                let counters = consumer.metrics();
                consumer.shutdown(Duration::from_secs(10)).await.unwrap();
                brokers.close().await.unwrap();
                counters
            })
        });
        let rows = snapshotter
            .snapshot()
            .into_vec()
            .into_iter()
            .map(|(key, _, _, value)| {
                let (kind, key) = key.into_parts();
                let mut labels: Vec<(String, String)> = key
                    .labels()
                    .map(|l| (l.key().to_owned(), l.value().to_owned()))
                    .collect();
                labels.sort();
                (kind, key.name().to_owned(), labels, value)
            })
            .collect();
        (rows, counters)
    }

    fn labels(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        let mut l: Vec<_> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        l.sort();
        l
    }

    fn value<'a>(rows: &'a [Row], name: &str, want: &[(String, String)]) -> &'a DebugValue {
        rows.iter()
            .find(|(_, n, l, _)| n == name && l == want)
            .map(|(_, _, _, v)| v)
            .unwrap_or_else(|| panic!("no {name} {want:?} in {rows:#?}"))
    }

    fn counters_and_histogram_carry_their_labels(backend: &'static str) {
        let topic = unique(&format!("obs.metrics.{backend}"));
        let group = unique("counted");
        let (rows, counters) = run(backend, &topic, &group);
        let consumer = [
            ("topic", topic.as_str()),
            ("group", group.as_str()),
            ("backend", backend),
        ];
        let with = |extra: &[(&str, &str)]| {
            let mut all = consumer.to_vec();
            all.extend_from_slice(extra);
            labels(&all)
        };
        let published = labels(&[("topic", topic.as_str()), ("backend", backend)]);
        assert_eq!(
            value(&rows, names::PUBLISHED, &published),
            &DebugValue::Counter(3)
        );
        assert_eq!(
            value(&rows, names::HANDLED, &with(&[])),
            &DebugValue::Counter(2)
        );
        assert_eq!(
            value(&rows, names::FAILED, &with(&[("kind", "handler")])),
            &DebugValue::Counter(1)
        );
        assert_eq!(
            value(&rows, names::FAILED, &with(&[("kind", "permanent")])),
            &DebugValue::Counter(1)
        );
        assert_eq!(
            value(&rows, names::RETRIED, &with(&[])),
            &DebugValue::Counter(1)
        );
        assert_eq!(
            value(&rows, names::DEAD_LETTERED, &with(&[])),
            &DebugValue::Counter(1)
        );
        // One observation per handler attempt: ok + flaky's retry succeed,
        // flaky's first attempt and bad fail.
        for (outcome, attempts) in [("ok", 2), ("error", 2)] {
            match value(
                &rows,
                names::HANDLE_DURATION,
                &with(&[("outcome", outcome)]),
            ) {
                DebugValue::Histogram(seconds) => {
                    assert_eq!(seconds.len(), attempts, "{outcome}: {seconds:?}");
                    assert!(seconds.iter().all(|s| s.0 >= 0.0 && s.0 < 30.0));
                }
                other => panic!("{} is a {other:?}", names::HANDLE_DURATION),
            }
        }
        // The unlabelled counters of the consumer say the same.
        assert_eq!(
            counters,
            MetricsSnapshot {
                published: 0,
                handled: 2,
                failed: 2,
                retried: 1,
                dead_lettered: 1,
            }
        );
    }

    #[test]
    fn memory_counters_and_histogram_carry_their_labels() {
        counters_and_histogram_carry_their_labels("memory");
    }

    #[cfg(feature = "rabbitmq")]
    #[test]
    fn rabbitmq_counters_and_histogram_carry_their_labels() {
        if backend_selected("rabbitmq") {
            counters_and_histogram_carry_their_labels("rabbitmq");
        }
    }

    #[cfg(feature = "kafka")]
    #[test]
    fn kafka_consumer_lag_gauge_carries_its_labels() {
        if !backend_selected("kafka") {
            return;
        }
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let topic = unique("obs.lag");
        let group = unique("lagging");
        let total = metrics::with_local_recorder(&recorder, || {
            runtime.block_on(async {
                let brokers = connect("kafka").await;
                let endpoints = endpoints(&brokers);
                for i in 0..3 {
                    endpoints
                        .publisher
                        .publish(&topic, Message::new(format!("m{i}")))
                        .await
                        .expect("publish");
                }
                let total = brokers
                    .kafka()
                    .unwrap()
                    .record_consumer_lag(&group, &topic)
                    .await
                    .expect("lag");
                brokers.close().await.unwrap();
                total
            })
        });
        let rows = snapshotter.snapshot().into_vec();
        let gauge = rows
            .iter()
            .find(|(key, ..)| key.key().name() == names::CONSUMER_LAG)
            .unwrap_or_else(|| panic!("no {} in {rows:#?}", names::CONSUMER_LAG));
        let mut got: Vec<(String, String)> = gauge
            .0
            .key()
            .labels()
            .map(|l| (l.key().to_owned(), l.value().to_owned()))
            .collect();
        got.sort();
        assert_eq!(
            got,
            labels(&[
                ("topic", topic.as_str()),
                ("group", group.as_str()),
                ("backend", "kafka")
            ])
        );
        assert_eq!(gauge.3, DebugValue::Gauge((total as f64).into()));
    }
}
