//! The Markdown report of a macro bench run, and the facts about the
//! machine it states.

use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// A Markdown document under construction.
#[derive(Default)]
pub struct Report {
    md: String,
}

impl Report {
    /// An empty report.
    pub fn new() -> Report {
        Report::default()
    }

    /// A heading of `level` (1-6).
    pub fn heading(&mut self, level: usize, text: &str) {
        let _ = writeln!(self.md, "{} {text}\n", "#".repeat(level.clamp(1, 6)));
    }

    /// A paragraph.
    pub fn para(&mut self, text: &str) {
        let _ = writeln!(self.md, "{text}\n");
    }

    /// Raw Markdown, as is.
    pub fn raw(&mut self, text: &str) {
        self.md.push_str(text);
    }

    /// A table; cells are not escaped beyond `|`.
    pub fn table(&mut self, header: &[&str], rows: &[Vec<String>]) {
        let esc = |s: &str| s.replace('|', "\\|");
        let _ = writeln!(
            self.md,
            "| {} |",
            header
                .iter()
                .map(|h| esc(h))
                .collect::<Vec<_>>()
                .join(" | ")
        );
        let _ = writeln!(self.md, "|{}|", vec!["---"; header.len()].join("|"));
        for r in rows {
            let _ = writeln!(
                self.md,
                "| {} |",
                r.iter().map(|c| esc(c)).collect::<Vec<_>>().join(" | ")
            );
        }
        self.md.push('\n');
    }

    /// An image beside the report (`file` relative to the report).
    pub fn image(&mut self, alt: &str, file: &str) {
        let _ = writeln!(self.md, "![{alt}]({file})\n");
    }

    /// The Markdown text.
    pub fn into_string(self) -> String {
        self.md
    }
}

fn sh(cmd: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(cmd).args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// The machine as Markdown bullet points: CPU, cores, memory, kernel, and
/// `df -h` of each path in `disks`.
pub fn machine(disks: &[&Path]) -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map(|kb| format!("{:.1} GiB", kb as f64 / (1 << 20) as f64))
        .unwrap_or_else(|| "unknown".into());
    let kernel = sh("uname", &["-sr"]).unwrap_or_default();
    let os = std::fs::read_to_string("/etc/os-release")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("PRETTY_NAME=")).map(|l| {
                l.trim_start_matches("PRETTY_NAME=")
                    .trim_matches('"')
                    .to_string()
            })
        })
        .unwrap_or_default();
    let load = std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default();
    let mut s = format!(
        "- CPU: {model}, {cores} cores available\n- memory: {mem}\n- OS: {os}, {kernel}\n\
         - load average (1, 5, 15 min) when the report was written: {load} (the machine is \
         shared; other work running alongside adds noise to timings)\n"
    );
    for d in disks {
        let df = sh("df", &["-hT", &d.to_string_lossy()]).unwrap_or_default();
        if let Some(line) = df.lines().nth(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() >= 7 {
                let _ = writeln!(
                    s,
                    "- disk for `{}`: {} ({}), size {}, {} available",
                    d.display(),
                    f[0],
                    f[1],
                    f[2],
                    f[4]
                );
            }
        }
    }
    s
}

/// The git commit of the working tree, with `-dirty` when it has changes.
pub fn git_revision() -> String {
    let rev = sh("git", &["rev-parse", "--short=12", "HEAD"]).unwrap_or_else(|| "unknown".into());
    let dirty = sh("git", &["status", "--porcelain", "--untracked-files=no"])
        .is_some_and(|s| !s.is_empty());
    if dirty {
        format!("{rev}-dirty")
    } else {
        rev
    }
}

/// Today's date (UTC) as YYYY-MM-DD.
pub fn today() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (y, m, d) = civil_from_days((secs / 86_400) as i64);
    format!("{y:04}-{m:02}-{d:02}")
}

/// Days since 1970-01-01 to (year, month, day) (H. Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// Bytes in binary units: `1.5 MiB`.
pub fn bytes(n: u64) -> String {
    const U: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < U.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", U[i])
    }
}

/// A duration in milliseconds with 3 decimals.
pub fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1e3)
}

/// Parses a size such as `10G`, `256M`, `4KiB`, `1048576`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("bad size {s:?}"))?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kib" | "kb" => 10,
        "m" | "mib" | "mb" => 20,
        "g" | "gib" | "gb" => 30,
        "t" | "tib" | "tb" => 40,
        _ => return Err(format!("bad size unit in {s:?} (use K, M, G, T)")),
    };
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("size {s:?} too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_dates() {
        assert_eq!(parse_size("10G"), Ok(10 << 30));
        assert_eq!(parse_size("256MiB"), Ok(256 << 20));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("3X").is_err());
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(20_454), (2026, 1, 1));
        assert_eq!(bytes(1536), "1.5 KiB");
    }

    #[test]
    fn table_markdown() {
        let mut r = Report::new();
        r.table(&["a", "b"], &[vec!["1".into(), "x|y".into()]]);
        assert_eq!(r.into_string(), "| a | b |\n|---|---|\n| 1 | x\\|y |\n\n");
    }
}
