//! Child processes of the testbed: spawning them so that they cannot outlive the test process,
//! capturing their output, picking ports.

use std::collections::HashSet;
use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};
use std::thread;

use anyhow::{Context, Result, anyhow, bail};

const START_MARKER: &str = "===== podium testbed: starting";

/// A child process whose output goes to a log file. Killed (and reaped) on drop.
pub(crate) struct ManagedProcess {
    name: String,
    child: Child,
    log: PathBuf,
    reaped: bool,
}

impl ManagedProcess {
    /// Starts `program args...`, appending its stdout and stderr to `log`.
    pub fn spawn(name: &str, program: &Path, args: &[String], log: &Path) -> Result<Self> {
        Self::spawn_env(name, program, args, &[], log)
    }

    /// [`ManagedProcess::spawn`] with extra environment variables.
    pub fn spawn_env(
        name: &str,
        program: &Path,
        args: &[String],
        env: &[(&str, &str)],
        log: &Path,
    ) -> Result<Self> {
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("opening log file {}", log.display()))?;
        // Restarts append to the same file; the marker makes each run easy to find.
        writeln!(
            file,
            "{START_MARKER} {} {}",
            program.display(),
            args.join(" ")
        )?;
        let stderr = file.try_clone()?;

        let mut cmd = match setpriv() {
            Some(setpriv) => {
                let mut cmd = Command::new(setpriv);
                cmd.args(["--pdeathsig", "KILL", "--"]).arg(program);
                cmd
            }
            None => Command::new(program),
        };
        cmd.args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::from(file))
            .stderr(Stdio::from(stderr));
        let child =
            spawn_from_long_lived_thread(cmd).with_context(|| format!("starting {name}"))?;
        Ok(ManagedProcess {
            name: name.to_string(),
            child,
            log: log.to_path_buf(),
            reaped: false,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// `Some(status)` once the process has exited on its own.
    pub fn exit_status(&mut self) -> Option<ExitStatus> {
        match self.child.try_wait() {
            Ok(Some(status)) => {
                self.reaped = true;
                Some(status)
            }
            _ => None,
        }
    }

    /// SIGKILL and reap. Idempotent. SIGKILL rather than SIGTERM: nothing here needs a graceful
    /// shutdown (etcd's data is thrown away or survives a crash), and an outage test wants a
    /// crash anyway.
    pub fn kill(&mut self) {
        if self.reaped {
            return;
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.reaped = true;
    }

    /// An error describing why this process is not usable, with the end of its log.
    pub fn failure(&self, what: &str) -> anyhow::Error {
        anyhow!(
            "{}: {what}\n--- last lines of {} ---\n{}",
            self.name,
            self.log.display(),
            log_tail(&self.log, 40)
        )
    }
}

impl Drop for ManagedProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The last `lines` lines of a log file (reads at most the last 64 KiB).
pub(crate) fn log_tail(path: &Path, lines: usize) -> String {
    let read = || -> io::Result<String> {
        let mut file = File::open(path)?;
        let len = file.metadata()?.len();
        file.seek(SeekFrom::Start(len.saturating_sub(64 * 1024)))?;
        let mut buf = Vec::new();
        file.read_to_end(&mut buf)?;
        Ok(String::from_utf8_lossy(&buf).into_owned())
    };
    match read() {
        Ok(text) => {
            let all: Vec<&str> = text.lines().collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        }
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}

/// `setpriv` if it exists and supports `--pdeathsig` (util-linux 2.33+).
fn setpriv() -> Option<&'static Path> {
    static SETPRIV: OnceLock<Option<PathBuf>> = OnceLock::new();
    SETPRIV
        .get_or_init(|| {
            let path = find_in_path("setpriv")?;
            let help = Command::new(&path).arg("--help").output().ok()?;
            String::from_utf8_lossy(&help.stdout)
                .contains("--pdeathsig")
                .then_some(path)
        })
        .as_deref()
}

pub(crate) fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_else(|| OsString::from("/usr/bin:/bin"));
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}

pub(crate) fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    fs::metadata(path)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

type SpawnRequest = (Command, mpsc::Sender<io::Result<Child>>);

/// Spawns `cmd` from a thread that lives as long as the process.
///
/// PR_SET_PDEATHSIG fires when the *thread* that forked the child exits, not the process. Test
/// threads (and the thread that starts the shared testbed) are short-lived, so spawning from them
/// would kill the control plane under the next test; one immortal spawner thread avoids that,
/// while the child still dies with the test process.
fn spawn_from_long_lived_thread(cmd: Command) -> io::Result<Child> {
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<SpawnRequest>>> = OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnRequest>();
        let started = thread::Builder::new()
            .name("podium-testbed-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
            });
        if let Err(e) = started {
            // Without the thread every request below fails with a clear error instead.
            eprintln!("podium testbed: cannot start the spawner thread: {e}");
        }
        Mutex::new(tx)
    });
    let (reply_tx, reply_rx) = mpsc::channel();
    spawner
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .send((cmd, reply_tx))
        .map_err(|_| io::Error::other("the testbed's spawner thread is gone"))?;
    reply_rx
        .recv()
        .map_err(|_| io::Error::other("the testbed's spawner thread is gone"))?
}

/// A free TCP port on 127.0.0.1, never the same one twice in this process.
///
/// The port is free when we look; another process may still grab it before our child binds it,
/// which is why startup retries with fresh ports when a child dies with "address already in use".
pub(crate) fn free_port() -> Result<u16> {
    static HANDED_OUT: Mutex<Option<HashSet<u16>>> = Mutex::new(None);
    for _ in 0..100 {
        let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .and_then(|l| l.local_addr())
            .context("binding 127.0.0.1:0 to find a free port")?
            .port();
        let mut handed_out = HANDED_OUT.lock().unwrap_or_else(|p| p.into_inner());
        if handed_out.get_or_insert_with(HashSet::new).insert(port) {
            return Ok(port);
        }
    }
    bail!("could not find a free port on 127.0.0.1")
}

/// Whether the latest run in a log could not bind its port.
pub(crate) fn lost_port_race(log: &Path) -> bool {
    let tail = log_tail(log, 200);
    let latest_run = tail.rsplit(START_MARKER).next().unwrap_or(&tail);
    latest_run.contains("address already in use")
}
