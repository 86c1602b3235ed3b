//! What the gateway's test files share.

/// Says loudly that a test is skipped and why, on stderr and in `$SB_SKIP_LOG` (where
/// scripts/test collects skips to list them with its total).
pub(crate) fn skip(line: &str) {
    eprintln!("{line}");
    if let Ok(path) = std::env::var("SB_SKIP_LOG") {
        use std::io::Write;
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            let _ = writeln!(f, "{line}");
        }
    }
}
