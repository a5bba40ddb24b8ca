//! Bad input and faults against real brokers (issue 13): refusals are final
//! and typed, waits are bounded from the call, secrets never printed.
//!
//! - a closed port and a listener that accepts and never answers: `connect`
//!   gives up within the reconnect policy's 30 s, naming the address;
//! - a publish returns within its confirm timeout plus one second;
//! - refused credentials: a final `Refused` at once, and no password in any
//!   log line captured at TRACE once [`LAPIN_LOG_DIRECTIVE`] is applied
//!   (without it lapin prints the login as bytes, which the test checks);
//! - a private node with `max_message_size` 4 MiB
//!   (`scripts/ensure-rabbitmq-limits.sh`, started here if the test command
//!   did not): a 6 MiB publish is a final `MessageTooLarge` at once, the
//!   publishes beside it succeed, later oversize publishes fail before
//!   sending; a dead letter that node refuses is kept as a truncated copy.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use broker_core::testkit::{backend_selected, unique};
use broker_core::topic::dead_letter_topic;
use broker_core::{
    BrokerError, Consumer, HandlerError, Message, Publisher, Received, Subscriber, Subscription,
};
use broker_rabbitmq::{RabbitMqBroker, LAPIN_LOG_DIRECTIVE};

/// The documented connect bound (30 s) plus one second of slack.
const CONNECT_BOUND: Duration = Duration::from_secs(31);
const MIB: usize = 1024 * 1024;

/// Every event and span of the process at TRACE, as `target level fields`.
mod capture {
    use super::*;
    use tracing::field::{Field, Visit};
    use tracing::span::{Attributes, Id, Record};
    use tracing::{Event, Metadata, Subscriber};

    pub struct Line {
        pub target: String,
        pub level: tracing::Level,
        pub text: String,
    }

    static LINES: Mutex<Vec<Line>> = Mutex::new(Vec::new());
    static NEXT_SPAN: AtomicUsize = AtomicUsize::new(1);

    struct Fields(String);
    impl Visit for Fields {
        fn record_debug(&mut self, f: &Field, v: &dyn std::fmt::Debug) {
            self.0.push_str(&format!(" {}={:?}", f.name(), v));
        }
        fn record_str(&mut self, f: &Field, v: &str) {
            self.0.push_str(&format!(" {}={}", f.name(), v));
        }
    }

    struct Capture;
    fn keep(meta: &Metadata<'_>, fields: String) {
        LINES.lock().unwrap().push(Line {
            target: meta.target().to_owned(),
            level: *meta.level(),
            text: format!("{} {}{}", meta.target(), meta.name(), fields),
        });
    }
    impl Subscriber for Capture {
        fn enabled(&self, _: &Metadata<'_>) -> bool {
            true
        }
        fn new_span(&self, a: &Attributes<'_>) -> Id {
            let mut f = Fields(String::new());
            a.record(&mut f);
            keep(a.metadata(), f.0);
            Id::from_u64(NEXT_SPAN.fetch_add(1, Ordering::Relaxed) as u64)
        }
        fn record(&self, _: &Id, r: &Record<'_>) {
            let mut f = Fields(String::new());
            r.record(&mut f);
            LINES.lock().unwrap().push(Line {
                target: "span record".into(),
                level: tracing::Level::TRACE,
                text: f.0,
            });
        }
        fn record_follows_from(&self, _: &Id, _: &Id) {}
        fn event(&self, e: &Event<'_>) {
            let mut f = Fields(String::new());
            e.record(&mut f);
            keep(e.metadata(), f.0);
        }
        fn enter(&self, _: &Id) {}
        fn exit(&self, _: &Id) {}
    }

    pub fn init() {
        static ONCE: OnceLock<()> = OnceLock::new();
        ONCE.get_or_init(|| {
            tracing::subscriber::set_global_default(Capture).expect("no other subscriber");
        });
    }

    /// Lines matching `pick`, as text.
    pub fn lines(pick: impl Fn(&Line) -> bool) -> Vec<String> {
        LINES
            .lock()
            .unwrap()
            .iter()
            .filter(|l| pick(l))
            .map(|l| l.text.clone())
            .collect()
    }

    /// Whether the application's filter with [`LAPIN_LOG_DIRECTIVE`]
    /// (`lapin=off`) lets a line through.
    pub fn passes_filter(l: &Line) -> bool {
        let (off, _) = LAPIN_LOG_DIRECTIVE.split_once('=').unwrap();
        !(l.target == off || l.target.starts_with(&format!("{off}::")))
    }
}

/// `secret` as text and as the byte list lapin's frame log prints.
fn secret_forms(secret: &str) -> [String; 2] {
    let bytes: Vec<String> = secret.bytes().map(|b| b.to_string()).collect();
    [secret.to_owned(), bytes.join(", ")]
}

fn assert_no_secret(secret: &str, printed: &[String]) {
    for form in secret_forms(secret) {
        for p in printed {
            assert!(!p.contains(&form), "`{form}` printed: {p}");
        }
    }
}

fn closed_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// A listener that accepts connections and never answers (kept open until
/// the process ends).
fn silent_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in l.incoming().flatten() {
            held.push(s);
        }
    });
    port
}

async fn connect_fails_within_the_bound(port: u16, secret: &str) {
    capture::init();
    let url = format!("amqp://app:{secret}@127.0.0.1:{port}/%2f");
    let started = Instant::now();
    let err = RabbitMqBroker::builder(url)
        .connect()
        .await
        .expect_err("nothing answers there");
    let elapsed = started.elapsed();
    eprintln!("connect to 127.0.0.1:{port}: {elapsed:?}: {err}");
    assert!(elapsed <= CONNECT_BOUND, "connect took {elapsed:?}");
    assert!(
        matches!(err, BrokerError::Unavailable { .. }),
        "{err:?} after {elapsed:?}"
    );
    assert!(err.is_transient(), "{err:?}");
    let shown = err.to_string();
    let address = format!("127.0.0.1:{port}/%2f");
    assert!(shown.contains(&address), "names {address}: {shown}");
    let mut printed = vec![shown, format!("{err:?}")];
    printed.extend(capture::lines(|_| true));
    assert_no_secret(secret, &printed);
    // Our own retry warnings: one line per kind of failure per 10 s.
    let ours = capture::lines(|l| {
        l.target.starts_with("broker_rabbitmq")
            && l.level <= tracing::Level::WARN
            && l.text.contains(&format!("127.0.0.1:{port}"))
    });
    assert!(
        ours.len() <= 4,
        "{} warnings in {elapsed:?}: {ours:#?}",
        ours.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_to_a_closed_port_fails_within_the_bound() {
    connect_fails_within_the_bound(closed_port(), "s3cret-closed").await;
}

/// Was 181 s (15 s operation timeout on each of 10 attempts).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_to_a_silent_port_fails_within_the_bound() {
    let started = Instant::now();
    connect_fails_within_the_bound(silent_port(), "s3cret-silent").await;
    // Each attempt waited until the policy's time ran out: not at once.
    assert!(started.elapsed() >= Duration::from_secs(20));
}

/// A publish returns within its confirm timeout plus one second, whether
/// the port refuses or stays silent; the error is transient.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_returns_within_the_confirm_timeout() {
    for port in [closed_port(), silent_port()] {
        let broker = RabbitMqBroker::builder(format!("amqp://app:pw@127.0.0.1:{port}/%2f"))
            .confirm_timeout(Duration::from_secs(3))
            .build()
            .expect("builds");
        let started = Instant::now();
        let err = broker
            .publish("faults.bound", Message::new("x"))
            .await
            .expect_err("nothing answers there");
        let elapsed = started.elapsed();
        eprintln!("publish to 127.0.0.1:{port}: {elapsed:?}: {err}");
        assert!(elapsed <= Duration::from_secs(4), "{elapsed:?}: {err}");
        assert!(
            matches!(
                err,
                BrokerError::Timeout { .. } | BrokerError::Unavailable { .. }
            ),
            "{err:?}"
        );
        assert!(err.is_transient(), "{err:?}");
    }
}

/// A wrong password is a final `Refused` at once; at TRACE no password
/// reaches the output once lapin's lines are filtered out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_login_is_final_and_no_secret_is_logged() {
    if !backend_selected("rabbitmq") {
        return;
    }
    capture::init();
    let secret = "s3cret-wrong-pw";
    let main = broker_core::config::SecretUrl::new(common::url())
        .amqp()
        .expect("RABBITMQ_URL");
    let url = format!(
        "amqp://guest:{secret}@{}:{}/%2f",
        main.host,
        main.port_or_default()
    );
    let started = Instant::now();
    let err = RabbitMqBroker::builder(url.clone())
        .connect()
        .await
        .expect_err("wrong password");
    let elapsed = started.elapsed();
    eprintln!("wrong password: {elapsed:?}: {err}");
    assert!(
        matches!(
            err,
            BrokerError::Refused {
                operation: "connect",
                ..
            }
        ),
        "{err:?}"
    );
    assert!(!err.is_transient());
    assert!(elapsed < Duration::from_secs(5), "{elapsed:?}");
    // The library's own output, Debug of the broker included.
    let broker = RabbitMqBroker::builder(url).build().expect("builds");
    let mut printed = vec![err.to_string(), format!("{err:?}"), format!("{broker:?}")];
    printed.extend(capture::lines(capture::passes_filter));
    assert_no_secret(secret, &printed);
    // Without the filter, lapin's TRACE frame log shows the login: the
    // filter is what keeps it out.
    let [_, as_bytes] = secret_forms(secret);
    let lapin = capture::lines(|l| !capture::passes_filter(l));
    assert!(
        lapin.iter().any(|l| l.contains(&as_bytes)),
        "lapin's TRACE lines no longer show the login: {} lines",
        lapin.len()
    );
}

/// Malformed URLs are refused before connecting, without the password.
#[tokio::test]
async fn malformed_urls_are_refused_without_the_password() {
    for url in [
        "amqp//app:s3cret@h:5672/%2f",
        "amqp:/app:s3cret@h/",
        "amqp://app:s3cret@[::1]/%2f",
    ] {
        let err = RabbitMqBroker::builder(url).connect().await.expect_err(url);
        assert!(matches!(err, BrokerError::Config(_)), "{err:?}");
        assert!(!err.is_transient());
        let shown = format!("{err} {err:?}");
        assert!(shown.contains("RABBITMQ_URL"), "{shown}");
        assert!(!shown.contains("s3cret"), "{shown}");
        // IPv6 is lapin's limitation, known to this crate only.
        if !url.contains('[') {
            let config = broker_core::config::BrokerConfig::from_vars([("RABBITMQ_URL", url)]);
            if let Ok(config) = config {
                panic!("{url} accepted: {config:?}");
            }
        }
    }
}

/// The private node with `max_message_size` 4 MiB: `RABBITMQ_LIMITS_URL`
/// from the test command, else started here.
fn limits_node() -> Option<String> {
    if !backend_selected("rabbitmq") {
        return None;
    }
    if let Ok(url) = std::env::var("RABBITMQ_LIMITS_URL") {
        return Some(url);
    }
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../scripts/ensure-rabbitmq-limits.sh"
    );
    let out = std::process::Command::new("timeout")
        .args(["120", "bash", script, "start"])
        .output()
        .expect("run ensure-rabbitmq-limits.sh");
    assert!(
        out.status.success(),
        "ensure-rabbitmq-limits.sh start: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("RABBITMQ_LIMITS_URL=").map(str::to_owned))
}

async fn limits_broker(url: &str) -> RabbitMqBroker {
    RabbitMqBroker::builder(url)
        .exchange("broker.test")
        .queue_expiry(common::queue_expiry())
        .connect()
        .await
        .expect("the limits node")
}

/// Was 33.7 s and a transient `Unavailable { attempts: 10 }`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversize_publish_is_final_at_once_and_spares_the_others() {
    let Some(url) = limits_node() else { return };
    let broker = limits_broker(&url).await;
    let topic = unique("faults.size");
    let small = (0..20).map(|i| {
        let broker = broker.clone();
        let topic = topic.clone();
        async move {
            broker
                .publish(&topic, Message::new(format!("small {i}")))
                .await
        }
    });
    let big = async {
        let started = Instant::now();
        let r = broker
            .publish(&topic, Message::new(vec![1u8; 6 * MIB]))
            .await;
        (r, started.elapsed())
    };
    let (smalls, (big, elapsed)) = tokio::join!(futures::future::join_all(small), big);
    eprintln!("6 MiB publish: {elapsed:?}: {big:?}");
    let err = big.expect_err("the node's limit is 4 MiB");
    assert!(
        matches!(err, BrokerError::MessageTooLarge { size, max } if size == 6 * MIB && max == 4 * MIB),
        "{err:?}"
    );
    assert!(!err.is_transient());
    assert!(elapsed < Duration::from_secs(5), "{elapsed:?}");
    for r in smalls {
        r.expect("the publishes beside it are accepted");
    }
    // Learned: the next one fails before anything is sent.
    assert_eq!(broker.max_message_bytes(), 4 * MIB);
    let started = Instant::now();
    let again = broker
        .publish(&topic, Message::new(vec![1u8; 5 * MIB]))
        .await
        .expect_err("known to be too large");
    assert!(
        matches!(again, BrokerError::MessageTooLarge { max, .. } if max == 4 * MIB),
        "{again:?}"
    );
    assert!(started.elapsed() < Duration::from_millis(500));
    broker
        .publish(&topic, Message::new(vec![1u8; MIB]))
        .await
        .expect("below the limit");
    broker.close().await.expect("close");
}

/// A dead letter the broker refuses for good is published as a truncated
/// copy with the reason and the original size, once: the original is acked,
/// not redelivered and refused forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letter_refused_for_size_is_kept_truncated() {
    let Some(url) = limits_node() else { return };
    let main = common::broker().await;
    let limits = limits_broker(&url).await;
    let topic = unique("faults.dlq");
    let group = unique("g");
    let dlq = dead_letter_topic(&topic);
    // A reader of the dead-letter topic on the small node (its queue keeps the letters).
    let mut letters = limits
        .subscribe(Subscription::new(&dlq, "audit"))
        .await
        .expect("subscribe to the dead-letter topic");
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = calls.clone();
    let consumer = Consumer::builder(main.clone(), &topic, &group)
        .dead_letters(limits.clone())
        .handler(move |_: Received| {
            counted.fetch_add(1, Ordering::Relaxed);
            async { Err(HandlerError::permanent("rejected by the handler")) }
        })
        .start()
        .await
        .expect("consumer");
    let original = Message::new(vec![7u8; 6 * MIB]).with_key("k1");
    main.publish(&topic, original.clone())
        .await
        .expect("6 MiB on the main node");
    let letter = tokio::time::timeout(Duration::from_secs(60), letters.next())
        .await
        .expect("a letter within 60 s")
        .expect("stream open")
        .expect("delivery");
    let m = letter.message();
    assert_eq!(m.id(), original.id());
    assert_eq!(
        m.payload().len(),
        broker_core::consumer::TRUNCATED_LETTER_BYTES
    );
    let h = m.headers();
    assert_eq!(
        h.get_str(broker_core::consumer::DLQ_TRUNCATED),
        Some("true")
    );
    let size = (6 * MIB).to_string();
    assert_eq!(
        h.get_str(broker_core::consumer::DLQ_ORIGINAL_SIZE),
        Some(size.as_str())
    );
    let why = h
        .get_str(broker_core::consumer::DLQ_PUBLISH_ERROR)
        .unwrap_or_default();
    assert!(why.contains("exceeds the limit"), "{why}");
    assert!(h.get_str("x-dlq-reason").is_some());
    letter.ack().await.expect("ack");
    // Not redelivered: the handler ran once.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(calls.load(Ordering::Relaxed), 1);
    consumer
        .shutdown(Duration::from_secs(10))
        .await
        .expect("shutdown");
    letters.close().await.expect("close");
    common::delete_queues(common::queues_of(&topic, &group)).await;
    main.close().await.expect("close");
    limits.close().await.expect("close");
}
