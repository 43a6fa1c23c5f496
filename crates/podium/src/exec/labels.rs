//! Downward API mode: CMD runs while the pod's `podium.dev/role` label, as the kubelet writes
//! it into a Downward API volume, says `leader`. The kubelet refreshes those files on its own
//! schedule (up to a minute or more), and a pod cut off from the API server never sees its
//! demotion: there is no term and no acknowledged demotion. Prefer the push mode.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use podium_core::crd::{EPOCH_ANNOTATION, GROUP_ANNOTATION, ROLE_LABEL, ROLE_LEADER};

use super::ExecError;
use super::child::{Role, Running};

/// How often the files are read.
pub const POLL: Duration = Duration::from_millis(100);

pub struct Options {
    pub labels_file: PathBuf,
    pub annotations_file: Option<PathBuf>,
    pub argv: Vec<String>,
    pub grace: Duration,
    pub poll: Duration,
}

/// Parses a Downward API labels or annotations file: one `key="value"` a line, the value quoted
/// as Go's strconv.Quote does.
pub fn parse(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|line| {
            let (key, value) = line.split_once('=')?;
            Some((key.trim().to_string(), unquote(value.trim())?))
        })
        .collect()
}

fn unquote(value: &str) -> Option<String> {
    let inner = value.strip_prefix('"')?.strip_suffix('"')?;
    let mut out = String::with_capacity(inner.len());
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next()? {
            'n' => out.push('\n'),
            't' => out.push('\t'),
            'r' => out.push('\r'),
            other => out.push(other),
        }
    }
    Some(out)
}

/// What the files say now.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Seen {
    leader: bool,
    epoch: Option<u64>,
    group: String,
}

fn read(options: &Options, warned: &mut bool) -> Seen {
    let labels = match std::fs::read_to_string(&options.labels_file) {
        Ok(text) => {
            *warned = false;
            parse(&text)
        }
        Err(e) => {
            if !*warned {
                tracing::warn!(file = %options.labels_file.display(), error = %e, "cannot read the labels file: not leading");
                *warned = true;
            }
            BTreeMap::new()
        }
    };
    let annotations = options
        .annotations_file
        .as_deref()
        .and_then(|path: &Path| std::fs::read_to_string(path).ok())
        .map(|text| parse(&text))
        .unwrap_or_default();
    Seen {
        leader: labels.get(ROLE_LABEL).map(String::as_str) == Some(ROLE_LEADER),
        epoch: annotations
            .get(EPOCH_ANNOTATION)
            .and_then(|epoch| epoch.parse().ok()),
        group: annotations
            .get(GROUP_ANNOTATION)
            .cloned()
            .unwrap_or_default(),
    }
}

pub async fn run(options: Options) -> Result<(), ExecError> {
    tracing::warn!(
        labels = %options.labels_file.display(),
        "podium exec in Downward API mode: the command runs while the role label says leader. \
         This mode has NO term and NO demotion acknowledgement: the kubelet updates the file late, \
         and a pod cut off from the API server keeps running the command after another pod was elected"
    );
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(ExecError::Signals)?;
    let mut ticker = tokio::time::interval(options.poll);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut child: Option<Running> = None;
    let mut last = Seen::default();
    let mut warned = false;
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = terminate.recv() => { tracing::info!("SIGTERM: stopping the command"); break; }
            _ = tokio::signal::ctrl_c() => { tracing::info!("SIGINT: stopping the command"); break; }
        }
        let seen = read(&options, &mut warned);
        if seen.leader != last.leader {
            tracing::info!(
                role = if seen.leader { "leader" } else { "follower" },
                epoch = seen.epoch,
                "role label changed"
            );
        }
        let restart = child
            .as_ref()
            .is_some_and(|running| seen.epoch.is_some_and(|e| e != running.epoch()));
        if (!seen.leader || restart)
            && let Some(running) = child.take()
        {
            running.stop(options.grace).await;
        }
        // A command that exited on its own is not restarted until the pod leads again.
        if seen.leader && child.is_none() && (!last.leader || restart) {
            let role = Role {
                epoch: seen.epoch.unwrap_or(0),
                group: seen.group.clone(),
            };
            match Running::start(&options.argv, &role) {
                Ok(running) => child = Some(running),
                Err(e) => {
                    tracing::error!(error = %e, command = ?options.argv, "cannot start the command")
                }
            }
        }
        last = seen;
    }
    if let Some(running) = child.take() {
        running.stop(options.grace).await;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn downward_api_files_parse() {
        let text =
            "app=\"web\"\npodium.dev/role=\"leader\"\nnote=\"a \\\"quoted\\\" word\\n\"\nbroken\n";
        let parsed = parse(text);
        assert_eq!(parsed.get("podium.dev/role").unwrap(), "leader");
        assert_eq!(parsed.get("note").unwrap(), "a \"quoted\" word\n");
        assert_eq!(parsed.len(), 3);
    }

    #[tokio::test]
    async fn the_command_follows_the_label() {
        let dir = tempfile::tempdir().unwrap();
        let labels = dir.path().join("labels");
        let annotations = dir.path().join("annotations");
        let log = dir.path().join("log");
        std::fs::write(&labels, "podium.dev/role=\"follower\"\n").unwrap();
        std::fs::write(&annotations, "podium.dev/epoch=\"4\"\n").unwrap();
        let options = Options {
            labels_file: labels.clone(),
            annotations_file: Some(annotations),
            argv: vec![
                "sh".into(),
                "-c".into(),
                format!(
                    "echo \"start $PODIUM_EPOCH\" >> {}; exec sleep 1000",
                    log.display()
                ),
            ],
            grace: Duration::from_secs(5),
            poll: Duration::from_millis(20),
        };
        let task = tokio::spawn(run(options));
        let lines = || std::fs::read_to_string(&log).unwrap_or_default();
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(lines(), "");
        std::fs::write(&labels, "podium.dev/role=\"leader\"\n").unwrap();
        for _ in 0..100 {
            if !lines().is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(lines(), "start 4\n");
        task.abort();
        // Dropped with the task: kill_on_drop reaps the command.
    }
}
