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

/// `cp -p`, `cp -a` and `mv` from another filesystem keep modes. They set
/// the copy's access ACL where that works instead of calling chmod; dm
/// stored the ACL as a plain xattr, took it for done and left mode 600.
#[test]
fn cp_and_mv_into_a_mount_keep_modes() {
    let s = Server::start(DM);
    s.ok(&["init", "copies"]);
    s.ok(&["switch", "copies"]);
    let mnt = PathBuf::from(s.ok(&["mount", "copies"]).trim());
    let src = tempfile::tempdir().unwrap();
    let file = src.path().join("f");
    std::fs::write(&file, b"x").unwrap();
    let dir = src.path().join("d");
    std::fs::create_dir_all(dir.join("sub")).unwrap();
    std::fs::write(dir.join("sub/g"), b"y").unwrap();
    let set_mode = |p: &Path, m: u32| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap()
    };
    set_mode(&file, 0o644);
    set_mode(&dir, 0o755);
    set_mode(&dir.join("sub"), 0o751);
    set_mode(&dir.join("sub/g"), 0o640);
    let f = file.to_str().unwrap();
    run(
        src.path(),
        "cp",
        &["-p", f, mnt.join("cp_p").to_str().unwrap()],
    );
    run(
        src.path(),
        "cp",
        &["-a", f, mnt.join("cp_a").to_str().unwrap()],
    );
    run(
        src.path(),
        "cp",
        &[
            "-a",
            dir.to_str().unwrap(),
            mnt.join("tree").to_str().unwrap(),
        ],
    );
    run(src.path(), "mv", &[f, mnt.join("moved").to_str().unwrap()]);
    let mode = |p: &str| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(mnt.join(p)).unwrap().permissions().mode() & 0o7777
    };
    assert_eq!(mode("cp_p"), 0o644);
    assert_eq!(mode("cp_a"), 0o644);
    assert_eq!(mode("moved"), 0o644);
    assert_eq!(mode("tree"), 0o755);
    assert_eq!(mode("tree/sub"), 0o751);
    assert_eq!(mode("tree/sub/g"), 0o640);
    // ACLs are refused as on a filesystem mounted noacl.
    let out = Command::new("python3")
        .args([
            "-c",
            "import os, sys\n\
             try:\n    os.setxattr(sys.argv[1], 'system.posix_acl_access', b'\\x02\\0\\0\\0')\n\
             except OSError as e:\n    print(e.strerror)",
        ])
        .arg(mnt.join("cp_p"))
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "Operation not supported",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// util-linux's fallocate(1) on a mount: extending, keeping the size,
/// punching a hole and zeroing a range behave as on ext4 (they failed with
/// EOPNOTSUPP, and glibc's posix_fallocate fell back to a write per 4 KiB);
/// collapsing a range is refused.
#[test]
fn fallocate_extends_punches_and_zeroes() {
    let s = Server::start(DM);
    s.ok(&["init", "alloc"]);
    s.ok(&["switch", "alloc"]);
    let mnt = PathBuf::from(s.ok(&["mount", "alloc"]).trim());
    let f = mnt.join("f");
    let mut want = vec![0xabu8; 64 << 10];
    std::fs::write(&f, &want).unwrap();
    let fa = |args: &[&str]| {
        let mut a = args.to_vec();
        a.push(f.to_str().unwrap());
        run(&mnt, "fallocate", &a);
    };
    fa(&["-l", "1MiB"]);
    want.resize(1 << 20, 0);
    // Times change as on ext4, also where nothing else did (keep-size
    // past the end).
    let mtime = || {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(&f).unwrap().mtime()
    };
    run(
        &mnt,
        "touch",
        &["-m", "-d", "@1000000000", f.to_str().unwrap()],
    );
    fa(&["-n", "-o", "2MiB", "-l", "4MiB"]);
    assert!(mtime() > 1_000_000_000, "fallocate -n left mtime");
    fa(&["-n", "-l", "4MiB"]);
    fa(&["-p", "-o", "4096", "-l", "8192"]);
    want[4096..12288].fill(0);
    fa(&["-z", "-o", "100", "-l", "50"]);
    want[100..150].fill(0);
    fa(&["-z", "-o", "1MiB", "-l", "4096"]);
    want.resize((1 << 20) + 4096, 0);
    let out = Command::new("fallocate")
        .args(["-c", "-o", "0", "-l", "4096"])
        .arg(&f)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not supported"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // More than the disk holds: ENOSPC, as on ext4, with or without
    // keeping the size; nothing changed.
    for keep in [&[][..], &["-n"][..]] {
        let out = Command::new("fallocate")
            .args(keep)
            .args(["-l", "1PiB"])
            .arg(&f)
            .output()
            .unwrap();
        assert!(
            !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("No space left"),
            "{keep:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert_eq!(std::fs::metadata(&f).unwrap().len(), want.len() as u64);
    // What the server stored, not what this kernel cached.
    std::fs::write("/proc/sys/vm/drop_caches", "3").unwrap();
    assert_eq!(std::fs::read(&f).unwrap(), want);
    // A punch takes time by the blocks the file holds in the range, not
    // by its length: zeros written over 1 TiB of a sparse file took
    // minutes and stored a block per 64 KiB.
    let sparse = mnt.join("sparse");
    run(&mnt, "truncate", &["-s", "1T", sparse.to_str().unwrap()]);
    run(
        &mnt,
        "fallocate",
        &["-p", "-o", "1", "-l", "1T", sparse.to_str().unwrap()],
    );
    assert_eq!(std::fs::metadata(&sparse).unwrap().len(), 1 << 40);
    std::fs::remove_file(&sparse).unwrap();
    s.ok(&["commit", "-m", "allocated"]);
    std::fs::write(&f, b"gone").unwrap();
    s.ok(&["reset", "--hard", "HEAD"]);
    assert_eq!(std::fs::read(&f).unwrap(), want);
}
