//! The example app: the feature-usage-log and credits-process modules, each
//! on the broker its route names, publishing a few events and consuming them.
//!
//! ```text
//! cargo run --example app                                  # memory: no broker
//! RABBITMQ_URL=amqp://guest:guest@127.0.0.1:5672/%2f cargo run --example app
//! KAFKA_ENABLED=true KAFKA_BROKERS=127.0.0.1:9092 \
//!   RABBITMQ_URL=amqp://guest:guest@127.0.0.1:5672/%2f \
//!   BROKER_ROUTE_CREDITS_PROCESS=rabbitmq cargo run --example app
//! ```
//!
//! `APP_NAME` names the consumer groups (default `example-app`);
//! `DEMO_EVENTS` is how many events of each kind to publish (default 5).

use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use broker::Brokers;
use examples::app::App;
use examples::credits_process::{
    self, CreditsProcessEnd, CreditsProcessEndMultimodel, ModelCredits,
};
use examples::feature_usage::{self, FeatureUsageLog};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let name = std::env::var("APP_NAME").unwrap_or_else(|_| "example-app".into());
    let events: u64 = match std::env::var("DEMO_EVENTS") {
        Ok(v) => v
            .parse()
            .map_err(|_| format!("DEMO_EVENTS must be a number, not `{v}`"))?,
        Err(_) => 5,
    };
    let brokers = Brokers::from_env().await?;
    for module in [feature_usage::MODULE, credits_process::MODULE] {
        println!("{module}: {:?}", brokers.config().route(module));
    }
    let app = App::new(brokers.clone(), &name);
    // Consumers first: a RabbitMQ queue only holds what arrives after it exists.
    let running = app.start(4).await?;

    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_millis() as i64;
    let usage = app.feature_usage_endpoints()?;
    let credits = app.credits_endpoints()?;
    for i in 0..events {
        let user = format!("user-{}", i % 3);
        let log = FeatureUsageLog {
            user_id: user.clone(),
            organization_id: Some("org-1".into()),
            feature: "export".into(),
            units: i + 1,
            used_at_ms: now,
        };
        app.feature_usage
            .send_feature_usage_log(&*usage.publisher, &log)
            .await?;
        let end = CreditsProcessEnd {
            process_id: format!("run-{i}"),
            account_id: user.clone(),
            model: "small".into(),
            credits_used: 10,
            status: "completed".into(),
            ended_at_ms: now,
        };
        app.credits_process
            .send_process_end(&*credits.publisher, &end)
            .await?;
        let multi = CreditsProcessEndMultimodel {
            process_id: format!("multi-run-{i}"),
            account_id: user,
            models: vec![
                ModelCredits {
                    model: "small".into(),
                    credits_used: 3,
                },
                ModelCredits {
                    model: "large".into(),
                    credits_used: 7,
                },
            ],
            status: "completed".into(),
            ended_at_ms: now,
        };
        app.credits_process
            .send_process_end_multimodel(&*credits.publisher, &multi)
            .await?;
    }

    let all_handled = running
        .wait_until(Duration::from_secs(60), |t| {
            t.usage_logs.load(Ordering::Relaxed) >= events
                && t.process_ends.load(Ordering::Relaxed) >= events
                && t.multimodel_ends.load(Ordering::Relaxed) >= events
        })
        .await;
    println!("handled: {}", running.totals.summary());
    running.shutdown(Duration::from_secs(10)).await?;
    brokers.close().await?;
    if !all_handled {
        return Err("not every event was handled within 60 s".into());
    }
    Ok(())
}
