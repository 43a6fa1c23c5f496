//! `podium-demo`: the story of `scripts/demo.sh`; every flag is in `podium-demo --help`.

use clap::Parser;
use podium_demo::DemoArgs;

#[derive(Parser, Debug)]
#[command(
    name = "podium-demo",
    version,
    about = "Show Podium at work on a throwaway local control plane: elect, fail over, time it"
)]
struct Cli {
    #[command(flatten)]
    demo: DemoArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    podium_demo::run(Cli::parse().demo).await
}
