//! Real tools on a mount: `git clone` of a local repository and `cargo build`
//! of a small crate inside a dm mount, then a commit and a reset that the
//! tools' files survive.

use dm_tests::Server;
use std::path::{Path, PathBuf};
use std::process::Command;

const DM: &str = env!("CARGO_BIN_EXE_dm");

fn run(dir: &Path, cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .current_dir(dir)
        // The inner build must not share the outer build's target dir.
        .env_remove("CARGO_TARGET_DIR")
        .env("CARGO_NET_OFFLINE", "true")
        .env("GIT_AUTHOR_NAME", "t")
        .env("GIT_AUTHOR_EMAIL", "t@example.invalid")
        .env("GIT_COMMITTER_NAME", "t")
        .env("GIT_COMMITTER_EMAIL", "t@example.invalid")
        .output()
        .unwrap_or_else(|e| panic!("running {cmd}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed in {}:\n{text}",
        dir.display()
    );
    text
}

#[test]
fn git_clone_and_cargo_build_in_a_mount() {
    let s = Server::start(DM);
    s.ok(&["init", "code"]);
    s.ok(&["switch", "code"]);
    let mnt = PathBuf::from(s.ok(&["mount", "code"]).trim());

    // A local repository outside the mount, with a small crate in it.
    let src = tempfile::tempdir().unwrap();
    let repo = src.path().join("hello");
    run(
        src.path(),
        "cargo",
        &["new", "--vcs", "git", "--bin", "hello"],
    );
    std::fs::write(
        repo.join("src/main.rs"),
        "fn main() {\n    println!(\"hello from a dot\");\n}\n",
    )
    .unwrap();
    run(&repo, "cargo", &["generate-lockfile", "--offline"]);
    run(&repo, "git", &["add", "-A"]);
    run(&repo, "git", &["commit", "-qm", "hello"]);

    // Clone it into the mount and build it there (target dir in the mount).
    run(
        &mnt,
        "git",
        &["clone", "-q", repo.to_str().unwrap(), "hello"],
    );
    let work = mnt.join("hello");
    run(&work, "git", &["fsck", "--full"]);
    run(&work, "cargo", &["build", "--offline"]);
    let out = run(&work, "./target/debug/hello", &[]);
    assert!(out.contains("hello from a dot"), "{out}");

    // Commit; then break the checkout and roll back: git and the binary are
    // whole again.
    s.ok(&["commit", "-m", "built"]);
    std::fs::remove_dir_all(work.join(".git")).unwrap();
    std::fs::remove_file(work.join("target/debug/hello")).unwrap();
    s.ok(&["reset", "--hard", "HEAD"]);
    run(&work, "git", &["fsck", "--full"]);
    let status = run(&work, "git", &["status", "--porcelain"]);
    assert!(
        status.trim().is_empty(),
        "clean checkout expected:\n{status}"
    );
    let out = run(&work, "./target/debug/hello", &[]);
    assert!(out.contains("hello from a dot"), "{out}");
}
