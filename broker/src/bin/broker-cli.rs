//! `broker-cli`: the operator's tool (see `broker::cli`). Install with
//! `cargo install --path broker --features cli`.

use std::process::ExitCode;

use broker::cli::{env_vars, main_with, Exit};

#[tokio::main]
async fn main() -> ExitCode {
    let vars = match env_vars() {
        Ok(vars) => vars,
        Err(e) => {
            eprintln!("broker-cli: error: {e}");
            return Exit::Config.into();
        }
    };
    let exit = main_with(
        std::env::args_os(),
        vars,
        &mut std::io::stdin().lock(),
        &mut std::io::stdout().lock(),
        &mut std::io::stderr(),
    )
    .await;
    exit.into()
}
