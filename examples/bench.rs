//! Temporary driver for `podium bench` until the subcommand is wired (deleted before merge).
use clap::{Parser, Subcommand};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    Bench(podium::bench::BenchArgs),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let Cli {
        command: Command::Bench(args),
    } = Cli::parse();
    podium::bench::run(args).await
}
