//! Command line tool on any backend: publish, tail, list and replay dead
//! letters. See `examples::cli` for the commands.
//!
//! ```text
//! cargo run --example cli -- publish feature_usage_topic '{"user_id":"u1"}' --key u1
//! RABBITMQ_URL=amqp://guest:guest@127.0.0.1:5672/%2f cargo run --example cli -- dlq list feature_usage_topic
//! ```

use broker::Brokers;
use examples::cli::{parse, run};

#[tokio::main]
async fn main() {
    let command = match parse(std::env::args().skip(1)) {
        Ok(command) => command,
        Err(message) => {
            eprintln!("{message}");
            std::process::exit(2);
        }
    };
    let result = async {
        let brokers = Brokers::from_env().await?;
        let done = run(command, &brokers, &mut std::io::stdout()).await;
        brokers.close().await?;
        done
    }
    .await;
    if let Err(e) = result {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
