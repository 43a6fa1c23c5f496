//! The leader-only command: started in a process group of its own with the role in its
//! environment, stopped with SIGTERM to the group, SIGKILL after the grace period, and reaped.
//!
//! `podium exec` starts it through [`shim`] (argv from [`shimmed`]), so that the kernel kills
//! it when `podium exec` dies without a chance to stop it (SIGKILL, the OOM killer): a leader-
//! only command must not outlive the process that ends its term.
use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use clap::Args;
use rustix::process::{Pid, Signal, kill_process_group};
use tokio::process::Command;
use tokio::sync::{oneshot, watch};

/// The hidden subcommand [`shim`] runs as.
pub const SHIM: &str = "exec-shim";

/// `podium exec-shim --parent PID -- CMD [ARGS...]`: not for people.
#[derive(Args, Debug, Clone)]
pub struct ShimArgs {
    /// The `podium exec` process that started the shim.
    #[arg(long)]
    pub parent: i32,

    /// The command to become.
    #[arg(last = true, required = true, num_args = 1.., value_name = "CMD")]
    pub command: Vec<String>,
}

/// `argv` run through `podium` (at `program`) as [`shim`], on behalf of this process.
pub fn shimmed(program: &Path, argv: &[String]) -> Vec<String> {
    let mut shimmed = vec![
        program.to_string_lossy().into_owned(),
        SHIM.into(),
        "--parent".into(),
        std::process::id().to_string(),
        "--".into(),
    ];
    shimmed.extend_from_slice(argv);
    shimmed
}

/// The shim, in the child: asks the kernel for SIGKILL when its parent dies, then becomes CMD
/// (same pid, process group and environment). SIGKILL rather than SIGTERM: nobody is left to
/// escalate, and a command that ignores SIGTERM would run on as leader without a term.
/// Returns an exit code only if it cannot become CMD.
///
/// The kernel ties the signal to the parent *thread* that forked: `podium exec` forks from
/// its runtime's worker threads, which live as long as the process.
pub fn shim(args: &ShimArgs) -> i32 {
    use std::os::unix::process::CommandExt;
    if let Err(e) = rustix::process::set_parent_process_death_signal(Some(Signal::KILL)) {
        eprintln!("podium exec-shim: cannot ask for a parent-death signal: {e}");
        return 126;
    }
    // The parent may have died between the fork and the prctl, and then no signal comes:
    // this process would have been handed to another parent already.
    let parent = rustix::process::getppid().map(|pid| pid.as_raw_nonzero().get());
    if parent != Some(args.parent) {
        eprintln!(
            "podium exec-shim: podium exec ({}) is gone; not starting the command",
            args.parent
        );
        return 125;
    }
    let Some((program, rest)) = args.command.split_first() else {
        eprintln!("podium exec-shim: no command to run");
        return 127;
    };
    let e = std::process::Command::new(program).args(rest).exec();
    eprintln!("podium exec: cannot run {program:?}: {e}");
    127
}

/// How the command ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Exit {
    /// `exit 3`, `signal 15`, or why it could not be waited for.
    pub status: String,
    pub success: bool,
    /// Whether it was stopped by `podium exec` (a demotion, the end of the term, shutdown)
    /// rather than exiting on its own.
    pub requested: bool,
}

/// What the command learns of its role.
#[derive(Clone, Debug)]
pub struct Role {
    pub epoch: u64,
    pub group: String,
}

/// A running command. Dropping it without [`Running::stop`] kills it (`kill_on_drop`).
pub struct Running {
    pid: u32,
    epoch: u64,
    stop: Option<oneshot::Sender<Duration>>,
    exit: watch::Receiver<Option<Exit>>,
}

impl Running {
    /// Starts `argv` with `PODIUM_ROLE=leader`, `PODIUM_EPOCH` and `PODIUM_GROUP`, inheriting
    /// stdio.
    pub fn start(argv: &[String], role: &Role) -> std::io::Result<Running> {
        let (program, args) = argv.split_first().ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "no command to run")
        })?;
        let mut child = Command::new(program)
            .args(args)
            .env("PODIUM_ROLE", "leader")
            .env("PODIUM_EPOCH", role.epoch.to_string())
            .env("PODIUM_GROUP", &role.group)
            .stdin(Stdio::null())
            .stdout(Stdio::inherit())
            .stderr(Stdio::inherit())
            // Its own process group, so that a stop reaches what it forked as well.
            .process_group(0)
            .kill_on_drop(true)
            .spawn()?;
        let pid = child.id().unwrap_or(0);
        let (stop_tx, mut stop_rx) = oneshot::channel::<Duration>();
        let (exit_tx, exit_rx) = watch::channel(None);
        let epoch = role.epoch;
        tracing::info!(pid, epoch, command = %program, "started the command");
        tokio::spawn(async move {
            let exit = tokio::select! {
                status = child.wait() => {
                    let exit = exit(status, false);
                    tracing::warn!(pid, epoch, status = %exit.status, "the command exited on its own");
                    exit
                }
                Ok(grace) = &mut stop_rx => terminate(&mut child, pid, grace).await,
            };
            // Whatever it left behind in its group goes too.
            signal_group(pid, Signal::KILL);
            let _ = exit_tx.send(Some(exit));
        });
        Ok(Running {
            pid,
            epoch,
            stop: Some(stop_tx),
            exit: exit_rx,
        })
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// How it ended, once it has; a receiver to watch for that without holding `self`.
    pub fn exit_watch(&self) -> watch::Receiver<Option<Exit>> {
        self.exit.clone()
    }

    pub fn exited(&self) -> Option<Exit> {
        self.exit.borrow().clone()
    }

    /// SIGTERM to its group, SIGKILL after `grace`; returns once it has been reaped.
    pub async fn stop(mut self, grace: Duration) -> Exit {
        if let Some(stop) = self.stop.take() {
            // Fails only if it already exited; then the exit is (about to be) recorded.
            let _ = stop.send(grace);
        }
        let exit = match self.exit.wait_for(Option::is_some).await {
            Ok(exit) => exit.clone(),
            Err(_) => None,
        };
        let exit = exit.unwrap_or_else(|| Exit {
            status: "lost track of the command".into(),
            success: false,
            requested: true,
        });
        tracing::info!(pid = self.pid, epoch = self.epoch, status = %exit.status, "the command stopped");
        exit
    }
}

async fn terminate(child: &mut tokio::process::Child, pid: u32, grace: Duration) -> Exit {
    if let Ok(Some(status)) = child.try_wait() {
        return exit(Ok(status), false);
    }
    tracing::info!(
        pid,
        grace_ms = grace.as_millis() as u64,
        "stopping the command (SIGTERM)"
    );
    signal_group(pid, Signal::TERM);
    match tokio::time::timeout(grace, child.wait()).await {
        Ok(status) => exit(status, true),
        Err(_) => {
            tracing::warn!(pid, "the command outlived its grace period: SIGKILL");
            signal_group(pid, Signal::KILL);
            let _ = child.start_kill();
            exit(child.wait().await, true)
        }
    }
}

/// Signals the process group `pid` leads. Never group 0 or 1 (this process's group, or every
/// process).
fn signal_group(pid: u32, signal: Signal) {
    let Some(pid) = i32::try_from(pid)
        .ok()
        .filter(|&pid| pid > 1)
        .and_then(Pid::from_raw)
    else {
        return;
    };
    match kill_process_group(pid, signal) {
        Ok(()) | Err(rustix::io::Errno::SRCH) => {}
        Err(e) => {
            tracing::warn!(pid = pid.as_raw_nonzero().get(), error = %e, "cannot signal the command")
        }
    }
}

fn exit(status: std::io::Result<ExitStatus>, requested: bool) -> Exit {
    use std::os::unix::process::ExitStatusExt;
    match status {
        Ok(status) => Exit {
            status: match (status.code(), status.signal()) {
                (Some(code), _) => format!("exit {code}"),
                (None, Some(signal)) => format!("signal {signal}"),
                _ => status.to_string(),
            },
            success: status.success(),
            requested,
        },
        Err(e) => Exit {
            status: format!("cannot wait for it: {e}"),
            success: false,
            requested,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shim_names_this_process_and_passes_the_command_untouched() {
        let argv = shimmed(
            Path::new("/bin/podium"),
            &["sh".into(), "-c".into(), "--parent 1".into()],
        );
        let pid = std::process::id().to_string();
        assert_eq!(
            argv,
            [
                "/bin/podium",
                "exec-shim",
                "--parent",
                pid.as_str(),
                "--",
                "sh",
                "-c",
                "--parent 1"
            ]
        );
    }

    fn role() -> Role {
        Role {
            epoch: 7,
            group: "ns/g".into(),
        }
    }

    fn sh(script: &str) -> Vec<String> {
        vec!["sh".into(), "-c".into(), script.into()]
    }

    #[tokio::test]
    async fn the_role_is_in_the_environment_and_a_natural_exit_is_recorded() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("env");
        let script = format!(
            "echo \"$PODIUM_ROLE $PODIUM_EPOCH $PODIUM_GROUP\" > {}; exit 3",
            out.display()
        );
        let running = Running::start(&sh(&script), &role()).unwrap();
        let mut watch = running.exit_watch();
        let exit = watch
            .wait_for(Option::is_some)
            .await
            .unwrap()
            .clone()
            .unwrap();
        assert_eq!((exit.status.as_str(), exit.requested), ("exit 3", false));
        assert_eq!(std::fs::read_to_string(&out).unwrap(), "leader 7 ns/g\n");
        // Stopping a command that already exited returns its exit at once.
        assert_eq!(running.stop(Duration::from_secs(5)).await.status, "exit 3");
    }

    #[tokio::test]
    async fn stop_sends_sigterm_then_sigkill_after_the_grace() {
        let running = Running::start(&sh("exec sleep 1000"), &role()).unwrap();
        let exit = running.stop(Duration::from_secs(5)).await;
        assert_eq!((exit.status.as_str(), exit.requested), ("signal 15", true));

        // Ignores SIGTERM: killed once the grace is over.
        let running = Running::start(&sh("trap '' TERM; sleep 1000 & wait"), &role()).unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        let started = std::time::Instant::now();
        let exit = running.stop(Duration::from_millis(300)).await;
        assert_eq!(exit.status, "signal 9");
        assert!(started.elapsed() >= Duration::from_millis(300));
    }

    #[tokio::test]
    async fn stop_reaches_the_commands_children() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("pid");
        // sh forks sleep and waits: SIGTERM to sh alone would leave sleep running.
        let script = format!("sleep 1000 & echo $! > {}; wait", pidfile.display());
        let running = Running::start(&sh(&script), &role()).unwrap();
        let mut grandchild = None;
        for _ in 0..50 {
            if let Ok(pid) = std::fs::read_to_string(&pidfile)
                && let Ok(pid) = pid.trim().parse::<i32>()
            {
                grandchild = Some(pid);
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let grandchild = grandchild.expect("the script wrote its child's pid");
        running.stop(Duration::from_secs(5)).await;
        let alive = || {
            std::fs::read_to_string(format!("/proc/{grandchild}/stat"))
                .is_ok_and(|stat| !stat.contains(") Z "))
        };
        for _ in 0..50 {
            if !alive() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("the command's child {grandchild} outlived the stop");
    }
}
