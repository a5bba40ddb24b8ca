//! The two example modules, wired as the app wires them, on each backend:
//! typed events published and consumed (usage logs written in bulk),
//! invalid events refused at publish, undecodable payloads dead-lettered
//! with their reason.

mod common;

use std::sync::atomic::Ordering;

use broker::config::BrokerKind;
use broker::message::header;
use broker::testkit::unique;
use broker::topic::dead_letter_topic;
use broker::Brokers;
use broker::{BrokerError, Message, Subscription};
use examples::app::App;
use examples::credits_process::{CreditsProcessEnd, CreditsProcessEndMultimodel, ModelCredits};
use examples::feature_usage::FeatureUsageLog;

const EVENTS: u64 = 12;

fn usage(i: u64) -> FeatureUsageLog {
    FeatureUsageLog {
        user_id: format!("user-{}", i % 4),
        organization_id: None,
        feature: "export".into(),
        units: i + 1,
        used_at_ms: 1_700_000_000_000,
    }
}

fn end(i: u64) -> CreditsProcessEnd {
    CreditsProcessEnd {
        process_id: format!("run-{i}"),
        account_id: format!("acct-{}", i % 3),
        model: "small".into(),
        credits_used: 10,
        status: "completed".into(),
        ended_at_ms: 1_700_000_000_000,
    }
}

fn multimodel(i: u64) -> CreditsProcessEndMultimodel {
    CreditsProcessEndMultimodel {
        process_id: format!("multi-{i}"),
        account_id: format!("acct-{}", i % 3),
        models: vec![
            ModelCredits {
                model: "small".into(),
                credits_used: 1,
            },
            ModelCredits {
                model: "large".into(),
                credits_used: 4,
            },
        ],
        status: "failed".into(),
        ended_at_ms: 1_700_000_000_000,
    }
}

async fn modules_work_on(brokers: Brokers) {
    let app = App::new(brokers, &unique("app")).with_topic_prefix(&unique("examples"));
    let usage_endpoints = app.feature_usage_endpoints().expect("endpoints");
    let credits_endpoints = app.credits_endpoints().expect("endpoints");
    // Watch the feature usage dead letters (before anything is published:
    // RabbitMQ queues keep only what arrives after they exist).
    let mut dead_letters = usage_endpoints
        .subscriber
        .subscribe(Subscription::new(
            dead_letter_topic(&app.feature_usage.topic),
            unique("dlq-viewer"),
        ))
        .await
        .expect("subscribe to the dead letters");
    let running = app.start(4).await.expect("start the app");

    // A client flushing its buffer of usage logs: they arrive together.
    let logs: Vec<FeatureUsageLog> = (0..EVENTS).map(usage).collect();
    app.feature_usage
        .send_feature_usage_logs(&*usage_endpoints.publisher, &logs)
        .await
        .expect("send usage logs");
    for i in 0..EVENTS {
        app.credits_process
            .send_process_end(&*credits_endpoints.publisher, &end(i))
            .await
            .expect("send end");
        app.credits_process
            .send_process_end_multimodel(&*credits_endpoints.publisher, &multimodel(i))
            .await
            .expect("send multimodel end");
    }

    // Invalid events are refused before anything is sent.
    let mut invalid = usage(0);
    invalid.units = 0;
    let refused = app
        .feature_usage
        .send_feature_usage_log(&*usage_endpoints.publisher, &invalid)
        .await
        .expect_err("units must be at least 1");
    assert!(matches!(refused, BrokerError::Validation(_)), "{refused:?}");
    // In a batch too, and then none of the batch is sent.
    let refused = app
        .feature_usage
        .send_feature_usage_logs(&*usage_endpoints.publisher, &[usage(1), invalid])
        .await
        .expect_err("units must be at least 1");
    assert!(matches!(refused, BrokerError::Validation(_)), "{refused:?}");
    let mut no_models = multimodel(0);
    no_models.models.clear();
    let refused = app
        .credits_process
        .send_process_end_multimodel(&*credits_endpoints.publisher, &no_models)
        .await
        .expect_err("at least one model");
    assert!(matches!(refused, BrokerError::Validation(_)), "{refused:?}");
    let mut unknown_status = end(0);
    unknown_status.status = "exploded".into();
    assert!(app
        .credits_process
        .send_process_end(&*credits_endpoints.publisher, &unknown_status)
        .await
        .is_err());

    // A foreign producer's garbage reaches the consumer: dead-lettered, not retried.
    let garbage = Message::new("not json").with_key("user-x");
    usage_endpoints
        .publisher
        .publish(&app.feature_usage.topic, garbage.clone())
        .await
        .expect("publish raw");

    let done = running
        .wait_until(common::WAIT, |t| {
            t.usage_logs.load(Ordering::Relaxed) >= EVENTS
                && t.process_ends.load(Ordering::Relaxed) >= EVENTS
                && t.multimodel_ends.load(Ordering::Relaxed) >= EVENTS
        })
        .await;
    assert!(done, "not all handled: {}", running.totals.summary());
    let letter = tokio::time::timeout(common::WAIT, dead_letters.next())
        .await
        .expect("dead letter in time")
        .expect("stream open")
        .expect("delivery");
    assert_eq!(letter.message().id(), garbage.id());
    assert_eq!(letter.message().headers()[header::DLQ_ERROR_KIND], "decode");
    letter.ack().await.expect("ack");
    dead_letters.close().await.expect("close");

    let totals = &running.totals;
    // Units 1..=EVENTS; 10 credits per end and 5 per multi-model end.
    assert_eq!(
        totals.usage_units.load(Ordering::Relaxed),
        EVENTS * (EVENTS + 1) / 2
    );
    assert_eq!(totals.credits.load(Ordering::Relaxed), EVENTS * 15);
    // Exactly the valid events: the refused ones never arrived.
    assert_eq!(totals.usage_logs.load(Ordering::Relaxed), EVENTS);
    // Written in bulk: logs that arrived together share a write (four
    // users, so at most four lanes, each writing its users' logs).
    let writes = totals.usage_writes.load(Ordering::Relaxed);
    assert!(
        (1..EVENTS).contains(&writes),
        "{writes} bulk writes for {EVENTS} logs: {}",
        totals.summary()
    );
    assert_eq!(totals.process_ends.load(Ordering::Relaxed), EVENTS);
    assert_eq!(totals.multimodel_ends.load(Ordering::Relaxed), EVENTS);
    running
        .shutdown(std::time::Duration::from_secs(10))
        .await
        .expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn modules_on_memory() {
    let brokers = common::brokers_for(BrokerKind::Memory).await.unwrap();
    modules_work_on(brokers).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn modules_on_kafka() {
    let Some(brokers) = common::brokers_for(BrokerKind::Kafka).await else {
        return;
    };
    modules_work_on(brokers).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn modules_on_rabbitmq() {
    let Some(brokers) = common::brokers_for(BrokerKind::RabbitMq).await else {
        return;
    };
    modules_work_on(brokers).await;
}

/// Each module follows its own `BROKER_ROUTE_<MODULE>`.
#[tokio::test]
async fn each_module_takes_its_route() {
    use broker::config::{BrokerConfig, Route};
    let config = BrokerConfig::from_vars([
        ("BROKER_ROUTE_CREDITS_PROCESS", "memory"),
        ("BROKER_ROUTE_FEATURE_USAGE", "memory"),
    ])
    .expect("config");
    let app = App::new(Brokers::connect(config).await.unwrap(), "app");
    assert_eq!(
        app.feature_usage_endpoints().unwrap().route,
        Route::Single(BrokerKind::Memory)
    );
    let refused = BrokerConfig::from_vars([("BROKER_ROUTE_CREDITS_PROCESS", "kafka")])
        .expect_err("a route to a disabled broker is a startup error");
    assert_eq!(refused.var(), "BROKER_ROUTE_CREDITS_PROCESS");
}
