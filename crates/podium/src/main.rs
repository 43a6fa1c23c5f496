//! `podium`: parse the command line, start telemetry, and run what was asked.

use clap::Parser;
use podium::cli::{Cli, Command, RunArgs};
use podium::{crd, ctl, exec, operator, telemetry};

fn main() -> anyhow::Result<()> {
    let command = Cli::parse()
        .command
        .unwrap_or_else(|| Command::Run(RunArgs::from_env()));
    let runtime = match &command {
        // Becomes the command at once: no runtime, no threads.
        Command::ExecShim(args) => std::process::exit(exec::child::shim(args)),
        Command::Run(args) => operator::runtime(args.worker_threads)?,
        _ => tokio::runtime::Runtime::new()?,
    };
    runtime.block_on(run(command))
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Crd => {
            print!("{}", crd::crd_yaml());
            Ok(())
        }
        Command::Switchover(args) => ctl::switchover::run(ctl::client().await?, &args).await,
        Command::Status(args) => ctl::show::run(ctl::client().await?, &args).await,
        Command::ExecShim(args) => std::process::exit(exec::child::shim(&args)),
        Command::Exec(args) => {
            telemetry::init(args.log_format, "info");
            exec::run(args).await.map_err(anyhow::Error::from)
        }
        Command::Run(args) => {
            telemetry::init(args.log_format, "info,kube_runtime=warn");
            let kube_config = kube::Config::infer().await.map_err(|e| {
                anyhow::anyhow!(
                    "cannot build a Kubernetes client from KUBECONFIG or the in-cluster config: {e}"
                )
            })?;
            operator::run(kube_config, args.operator_config()).await
        }
    }
}
