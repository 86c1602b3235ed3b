//! The server side as a separate process: the bench starts itself with `--serve <system>`,
//! the child prints `ready` once its handlers are subscribed, then `progress <n>` twice a
//! second and `counted <n>` when all expected events arrived. It exits when its stdin closes
//! (the parent is gone) or when killed.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::{Notify, mpsc};

/// CPU time (user + system) used so far by process `pid` (`self` for this one), from
/// `/proc/<pid>/stat`; `None` where that cannot be read.
pub(crate) fn cpu_time(pid: &str) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    // Clock ticks are 100 per second on Linux.
    Some(Duration::from_millis(ticks * 10))
}

/// The whole machine's CPU time so far (all cores, clock ticks), from the first line of
/// `/proc/stat`: in all, idle (iowait included) and stolen by the hypervisor.
#[derive(Debug, Clone, Copy)]
pub(crate) struct MachineTicks {
    total: u64,
    idle: u64,
    steal: u64,
}

impl MachineTicks {
    /// Now; `None` where `/proc/stat` cannot be read.
    pub(crate) fn now() -> Option<Self> {
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        let fields = stat.lines().next()?.strip_prefix("cpu ")?;
        // user nice system idle iowait irq softirq steal (guest time is inside user).
        let v: Vec<u64> = fields
            .split_whitespace()
            .take(8)
            .map(str::parse)
            .collect::<Result<_, _>>()
            .ok()?;
        Some(MachineTicks {
            total: v.iter().sum(),
            idle: v.get(3)? + v.get(4)?,
            steal: *v.get(7)?,
        })
    }

    /// Idle and stolen shares (percent of all CPU time) between `earlier` and `self`.
    pub(crate) fn shares_since(&self, earlier: &MachineTicks) -> Option<[f64; 2]> {
        let total = self.total.checked_sub(earlier.total).filter(|t| *t > 0)? as f64;
        let pct = |a: u64, b: u64| a.saturating_sub(b) as f64 * 100.0 / total;
        Some([pct(self.idle, earlier.idle), pct(self.steal, earlier.steal)])
    }
}

/// A server process and what it reports.
pub(crate) struct ChildServer {
    child: Child,
    lines: mpsc::UnboundedReceiver<String>,
    last: u64,
}

impl ChildServer {
    /// Starts `--serve system` for `transport` at `url`, expecting `events` events, and waits
    /// (at most 60 s) until it is ready.
    pub(crate) async fn spawn(system: &str, transport: &str, url: &str, events: u64) -> Self {
        let exe = std::env::current_exe().expect("own path");
        let mut child = Command::new(exe)
            .args([
                "--serve",
                system,
                "--transport",
                transport,
                "--url",
                url,
                "--expect-events",
                &events.to_string(),
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the server process");
        let out = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::unbounded_channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut server = ChildServer {
            child,
            lines: rx,
            last: 0,
        };
        let ready = tokio::time::timeout(Duration::from_secs(60), async {
            while let Some(l) = server.lines.recv().await {
                if l == "ready" {
                    return true;
                }
            }
            false
        })
        .await;
        assert!(
            matches!(ready, Ok(true)),
            "the {system} server process for {transport} did not get ready"
        );
        server
    }

    /// Waits until the server counted `total` events or `limit` passed; returns its count.
    pub(crate) async fn counted(&mut self, total: u64, limit: Duration) -> u64 {
        let deadline = tokio::time::Instant::now() + limit;
        while self.last < total {
            match tokio::time::timeout_at(deadline, self.lines.recv()).await {
                Ok(Some(l)) => {
                    if let Some(n) = l
                        .strip_prefix("counted ")
                        .or_else(|| l.strip_prefix("progress "))
                        .and_then(|n| n.parse().ok())
                    {
                        self.last = n;
                    }
                }
                Ok(None) | Err(_) => break,
            }
        }
        self.last
    }
}

impl ChildServer {
    /// CPU time the server process has used so far.
    pub(crate) fn cpu_time(&self) -> Option<Duration> {
        cpu_time(&self.child.id().to_string())
    }
}

impl Drop for ChildServer {
    /// Asks the server to exit (its stdin closes) and gives it two seconds to do so, so that
    /// a profiler it runs under can write its report; kills it after that.
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        for _ in 0..40 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// In the server process: prints a line for the parent at once.
pub(crate) fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// In the server process: exits when the parent closes stdin; reports the count of events
/// twice a second and when all expected events arrived.
pub(crate) fn watch(counted: Arc<AtomicU64>, all: Arc<Notify>) {
    std::thread::spawn(|| {
        let mut buf = String::new();
        while std::io::stdin()
            .read_line(&mut buf)
            .map(|n| n > 0)
            .unwrap_or(false)
        {
            buf.clear();
        }
        std::process::exit(0);
    });
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = all.notified() => {
                    say(&format!("counted {}", counted.load(Ordering::Relaxed)));
                }
                _ = tokio::time::sleep(Duration::from_millis(500)) => {
                    say(&format!("progress {}", counted.load(Ordering::Relaxed)));
                }
            }
        }
    });
}
