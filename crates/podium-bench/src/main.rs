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
    run(<Cli as clap::Parser>::parse().bench).await
}
