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

fn main() -> Result<()> {
    // `podium-bench exec ...` is `podium exec ...`: the notification section runs it in its
    // pods, and this executable is the one the bench is sure to have.
    if std::env::args().nth(1).as_deref() == Some("exec") {
        return tokio::runtime::Runtime::new()?
            .block_on(podium_bench::run_exec(std::env::args().skip(1)));
    }
    // ... and `podium-bench exec-shim ...` is how that exec starts its command.
    if std::env::args().nth(1).as_deref() == Some(podium::exec::child::SHIM)
        && let Some(podium::cli::Command::ExecShim(shim)) =
            <podium::cli::Cli as clap::Parser>::parse().command
    {
        std::process::exit(podium::exec::child::shim(&shim));
    }
    let args = <Cli as clap::Parser>::parse().bench;
    let runtime = if args.operator_child {
        // The operator under test runs on the runtime `podium run` would choose here.
        podium::operator::runtime(podium::cli::RunArgs::from_env().worker_threads)?
    } else {
        tokio::runtime::Runtime::new()?
    };
    runtime.block_on(run(args))
}
