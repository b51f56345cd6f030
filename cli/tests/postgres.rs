//! PostgreSQL on a dot (the seed's main example), for real: initdb into a
//! dm mount, commit while the server runs, roll back, branch; and crash
//! safety: kill -9 the dm daemon under pgbench, restart, recover, check.
//!
//! Needs PostgreSQL's server binaries (Debian's `postgresql` package, which
//! ci/install-deps.sh installs) and root (to run PostgreSQL as `postgres`).

use dm_tests::Server;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const DM: &str = env!("CARGO_BIN_EXE_dm");

fn pg_bin(name: &str) -> PathBuf {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL is not installed (apt-get install postgresql)")
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|p| p.join(name).exists())
        .collect();
    dirs.sort();
    dirs.pop()
        .map(|d| d.join(name))
        .unwrap_or_else(|| panic!("PostgreSQL binary {name} not found"))
}

/// Runs a command as the postgres user; panics with its output on failure.
fn as_postgres(bin: &Path, args: &[&str]) -> String {
    let out = Command::new("runuser")
        .args(["-u", "postgres", "--"])
        .arg(bin)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("running runuser");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "{} {args:?} failed:\n{text}",
        bin.display()
    );
    text
}

/// One PostgreSQL cluster on a data directory inside a dm mount.
struct Pg {
    data: PathBuf,
    sock: tempfile::TempDir,
    port: u16,
}

impl Pg {
    /// `slot` keeps the tests of one run on different ports.
    fn new(data: PathBuf, slot: u16) -> Pg {
        let sock = tempfile::Builder::new()
            .prefix("dm-pg-sock-")
            .tempdir()
            .unwrap();
        chown_postgres(sock.path());
        let port = 20000 + (std::process::id() % 10000) as u16 * 2 + slot;
        Pg { data, sock, port }
    }

    fn initdb(&self) {
        std::fs::create_dir_all(&self.data).unwrap();
        chown_postgres(&self.data);
        as_postgres(
            &pg_bin("initdb"),
            &[
                "-D",
                self.data.to_str().unwrap(),
                "--data-checksums",
                "-A",
                "trust",
                "-U",
                "postgres",
            ],
        );
    }

    /// Starts PostgreSQL. Callers stop it first, so a postmaster.pid here
    /// is stale: it comes from a snapshot taken while PostgreSQL ran (a
    /// crash-consistent commit), whose PID may even be reused by now.
    fn start(&self) {
        let _ = std::fs::remove_file(self.data.join("postmaster.pid"));
        let opts = format!(
            "-p {} -k {} -c listen_addresses='' -c fsync=on -c synchronous_commit=on",
            self.port,
            self.sock.path().display()
        );
        let log = self.sock.path().join("pg.log");
        let out = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(pg_bin("pg_ctl"))
            .args(["-D", self.data.to_str().unwrap(), "-o", &opts, "-l"])
            .arg(&log)
            .args(["-w", "-t", "120", "start"])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "pg_ctl start failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }

    fn stop(&self) {
        let _ = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(pg_bin("pg_ctl"))
            .args([
                "-D",
                self.data.to_str().unwrap(),
                "-m",
                "fast",
                "-w",
                "-t",
                "60",
                "stop",
            ])
            .stdin(Stdio::null())
            .output();
    }

    /// Kills the postmaster and its backends with SIGKILL: its data
    /// directory vanished with the dm daemon. The PID comes from the socket
    /// lock file, which lives outside the mount.
    fn kill9(&self) {
        let lock = self
            .sock
            .path()
            .join(format!(".s.PGSQL.{}.lock", self.port));
        let pid = std::fs::read_to_string(&lock)
            .ok()
            .and_then(|t| t.lines().next().and_then(|l| l.trim().parse::<i32>().ok()));
        if let Some(pid) = pid {
            // Its children too: they exit when they notice the postmaster
            // is gone, but one (the walwriter) was seen left running after
            // the suite, in a data directory whose mount was gone.
            let children = Command::new("pgrep")
                .args(["-P", &pid.to_string()])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default();
            let _ = Command::new("kill")
                .arg("-9")
                .arg(pid.to_string())
                .args(children.split_whitespace())
                .status();
            let deadline = Instant::now() + Duration::from_secs(30);
            while Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        // Its backends exit when they notice the postmaster is gone.
        std::thread::sleep(Duration::from_millis(500));
        let _ = std::fs::remove_file(&lock);
        let _ = std::fs::remove_file(self.sock.path().join(format!(".s.PGSQL.{}", self.port)));
    }

    fn psql(&self, sql: &str) -> String {
        as_postgres(
            &pg_bin("psql"),
            &[
                "-h",
                self.sock.path().to_str().unwrap(),
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                "-d",
                "postgres",
                "-v",
                "ON_ERROR_STOP=1",
                "-At",
                "-c",
                sql,
            ],
        )
        .trim()
        .to_string()
    }

    /// Runs pg_amcheck (heap and all indexes) and returns its output.
    fn amcheck(&self) -> String {
        self.psql("CREATE EXTENSION IF NOT EXISTS amcheck");
        as_postgres(
            &pg_bin("pg_amcheck"),
            &[
                "-h",
                self.sock.path().to_str().unwrap(),
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                "--heapallindexed",
                "postgres",
            ],
        )
    }

    fn pgbench(&self, args: &[&str]) -> Child {
        let mut cmd = Command::new("runuser");
        cmd.args(["-u", "postgres", "--"])
            .arg(pg_bin("pgbench"))
            .args([
                "-h",
                self.sock.path().to_str().unwrap(),
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
            ])
            .args(args)
            .arg("postgres")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        cmd.spawn().expect("starting pgbench")
    }
}

fn chown_postgres(p: &Path) {
    let st = Command::new("chown")
        .args(["postgres:postgres"])
        .arg(p)
        .status()
        .unwrap();
    assert!(st.success());
}

fn open_up(s: &Server) {
    // The server's temp root is 0700; PostgreSQL runs as `postgres`.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(s.root(), std::fs::Permissions::from_mode(0o755)).unwrap();
}

fn mount(s: &Server, dot: &str) -> PathBuf {
    let p = PathBuf::from(s.ok(&["mount", dot]).trim());
    let mut parent = p.clone();
    use std::os::unix::fs::PermissionsExt;
    while parent.pop() && parent.starts_with(s.root()) {
        let _ = std::fs::set_permissions(&parent, std::fs::Permissions::from_mode(0o755));
    }
    p
}

#[test]
fn postgres_commit_reset_branch() {
    let s = Server::start(DM);
    open_up(&s);
    s.ok(&["init", "pg"]);
    s.ok(&["switch", "pg"]);
    let mnt = mount(&s, "pg");
    let pg = Pg::new(mnt.join("pgdata"), 0);
    pg.initdb();
    pg.start();
    pg.psql("CREATE TABLE t (id int PRIMARY KEY, v text)");
    pg.psql("INSERT INTO t SELECT g, md5(g::text) FROM generate_series(1, 10000) g");
    // Commit while PostgreSQL runs: a crash-consistent snapshot.
    s.ok(&["commit", "-m", "some data"]);
    pg.psql("DELETE FROM t");
    assert_eq!(pg.psql("SELECT count(*) FROM t"), "0");
    s.ok(&["commit", "-m", "deleted"]);
    // Roll back, stopping PostgreSQL around it as the Docker path does.
    pg.stop();
    s.ok(&["reset", "--hard", "HEAD^"]);
    pg.start();
    assert_eq!(pg.psql("SELECT count(*) FROM t"), "10000");
    assert_eq!(
        pg.psql("SELECT v FROM t WHERE id = 77"),
        format!("{:x}", md5_77())
    );
    // A branch: its changes do not reach master.
    pg.stop();
    s.ok(&["checkout", "-b", "experiment"]);
    pg.start();
    pg.psql("DELETE FROM t WHERE id > 5000");
    pg.psql("INSERT INTO t VALUES (20001, 'experiment')");
    assert_eq!(pg.psql("SELECT count(*) FROM t"), "5001");
    pg.stop();
    s.ok(&["commit", "-m", "experiment"]);
    s.ok(&["checkout", "master"]);
    pg.start();
    assert_eq!(pg.psql("SELECT count(*) FROM t"), "10000");
    assert_eq!(pg.psql("SELECT count(*) FROM t WHERE id = 20001"), "0");
    let check = pg.amcheck();
    assert!(!check.contains("corrupt"), "{check}");
    pg.stop();
}

/// md5("77"), as PostgreSQL's md5() prints it.
fn md5_77() -> u128 {
    0x28dd2c7955ce926456240b2ff0100bde
}

#[test]
fn postgres_survives_dm_kill9_under_pgbench() {
    let mut s = Server::start(DM);
    open_up(&s);
    s.ok(&["init", "pgcrash"]);
    s.ok(&["switch", "pgcrash"]);
    let mut mnt = mount(&s, "pgcrash");
    let mut pg = Pg::new(mnt.join("pgdata"), 1);
    pg.initdb();
    pg.start();
    as_postgres(
        &pg_bin("pgbench"),
        &[
            "-h",
            pg.sock.path().to_str().unwrap(),
            "-p",
            &pg.port.to_string(),
            "-U",
            "postgres",
            "-i",
            "-s",
            "1",
            "-q",
            "postgres",
        ],
    );
    pg.psql("CREATE TABLE acked (id bigint PRIMARY KEY)");
    let rounds: usize = std::env::var("DM_PG_CRASH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let mut acked_total = 0u64;
    for round in 0..rounds {
        let bench = pg.pgbench(&["-c", "2", "-T", "30", "-n"]);
        // Insert rows one transaction at a time; each Ok is a commit
        // PostgreSQL acknowledged (fsync on, synchronous_commit on).
        let start = Instant::now();
        let mut last_acked = None;
        let base = (round as u64 + 1) * 1_000_000;
        let mut i = 0u64;
        while start.elapsed() < Duration::from_millis(1500 + 300 * round as u64) {
            let id = base + i;
            // Panics unless PostgreSQL acknowledged the commit.
            pg.psql(&format!("INSERT INTO acked VALUES ({id})"));
            last_acked = Some(id);
            i += 1;
        }
        // kill -9 the dm daemon in the middle of the load.
        s.kill9();
        let mut bench = bench;
        let _ = bench.kill();
        let _ = bench.wait();
        pg.kill9();
        s.restart();
        mnt = mount(&s, "pgcrash");
        pg = Pg {
            data: mnt.join("pgdata"),
            sock: pg.sock,
            port: pg.port,
        };
        // PostgreSQL recovers from its WAL.
        pg.start();
        let last = last_acked.expect("no insert was acknowledged");
        let n: u64 = pg
            .psql(&format!(
                "SELECT count(*) FROM acked WHERE id BETWEEN {base} AND {last}"
            ))
            .parse()
            .unwrap();
        assert_eq!(
            n,
            last - base + 1,
            "round {round}: acknowledged inserts lost"
        );
        acked_total += n;
        let check = pg.amcheck();
        assert!(!check.contains("corrupt"), "round {round}: {check}");
        // Checksums on: a full scan reads every page.
        pg.psql("SELECT count(*) FROM pgbench_accounts");
    }
    assert!(acked_total > 0);
    pg.stop();
    // fsck exits non-zero when it finds a problem.
    s.ok(&["fsck"]);
}
