//! `podium-bench`: the benchmark report; every flag is in `podium-bench --help`.

use anyhow::Result;
use podium_bench::{BenchArgs, run};

/// `podium-bench`: every flag is documented in `podium-bench --help`.
#[derive(clap::Parser, Debug)]
#[command(
    name = "podium-bench",
    version,
    about = "Measure Podium's failover latency, scale and API cost on a local control plane; prints a Markdown report"
)]
struct Cli {
    #[command(flatten)]
    bench: BenchArgs,
}

#[tokio::main]
async fn main() -> Result<()> {
    // `podium-bench exec ...` is `podium exec ...`: the notification section runs it in its
    // pods, and this executable is the one the bench is sure to have.
    if std::env::args().nth(1).as_deref() == Some("exec") {
        return podium_bench::run_exec(std::env::args().skip(1)).await;
    }
    run(<Cli as clap::Parser>::parse().bench).await
}
