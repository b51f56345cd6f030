//! Processes of this host that have files open under given paths, read
//! from `/proc` as `fuser -m` does. Only processes in the server's own
//! mount namespace count: a container's processes live in namespaces of
//! their own (Docker stops and starts those around a switch), so what is
//! left are the host's, which a switch must not pull the files from under.

use std::path::{Path, PathBuf};

/// A host process and one file it has open.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostProcess {
    /// Its pid.
    pub pid: u32,
    /// Its command name (`/proc/PID/comm`).
    pub name: String,
    /// One file it has open under the paths asked about.
    pub file: PathBuf,
}

/// The processes of this mount namespace, other than this one, with a file
/// open under one of `paths` (each named once, with the first such file).
/// Processes that exit or cannot be read meanwhile are skipped.
pub fn using(paths: &[PathBuf]) -> Vec<HostProcess> {
    let Ok(ours) = std::fs::read_link("/proc/self/ns/mnt") else {
        return Vec::new();
    };
    let me = std::process::id();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let dir = p.path();
        if pid == me || std::fs::read_link(dir.join("ns/mnt")).ok().as_ref() != Some(&ours) {
            continue;
        }
        if let Some(file) = open_under(&dir, paths).or_else(|| mapped_under(&dir, paths)) {
            let name = std::fs::read_to_string(dir.join("comm"))
                .map(|s| s.trim().to_string())
                .unwrap_or_default();
            out.push(HostProcess { pid, name, file });
        }
    }
    out.sort_by_key(|h| h.pid);
    out
}

/// The process to stop for `h` to stop: its parent, and so on up, while
/// that one has the same name and works (its working directory) or holds
/// files under `paths`. A database's children hold its files while its
/// main process only works in its data directory: PostgreSQL's postmaster
/// was not named, and stopping the children it named (the checkpointer,
/// the autovacuum launcher) did not stop it. A shell that ran a program
/// there has another name and is left out.
pub fn top_of(h: &HostProcess, paths: &[PathBuf]) -> HostProcess {
    let mut top = h.clone();
    for _ in 0..64 {
        let Some(parent) = parent_of(top.pid).filter(|p| *p > 1) else {
            break;
        };
        let dir = PathBuf::from(format!("/proc/{parent}"));
        let name = std::fs::read_to_string(dir.join("comm"))
            .map(|s| s.trim().to_string())
            .unwrap_or_default();
        if name != top.name {
            break;
        }
        let works_there = std::fs::read_link(dir.join("cwd"))
            .is_ok_and(|cwd| paths.iter().any(|p| cwd.starts_with(p)));
        let file = match open_under(&dir, paths) {
            Some(f) => f,
            None if works_there => top.file.clone(),
            None => break,
        };
        top = HostProcess {
            pid: parent,
            name,
            file,
        };
    }
    top
}

/// The parent pid of `pid` (`/proc/PID/stat`, after the command name,
/// which may hold spaces and parentheses).
fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 1..];
    after.split_whitespace().nth(1)?.parse().ok()
}

/// The first file the process at `/proc/PID` (`dir`) has open under `paths`.
/// Only the links are read (no file system is asked) until one is under
/// `paths`: a file open on a hung mount elsewhere (another FUSE server
/// that stopped answering) held a checkout up for minutes.
fn open_under(dir: &Path, paths: &[PathBuf]) -> Option<PathBuf> {
    let targets = std::fs::read_dir(dir.join("fd"))
        .ok()?
        .flatten()
        .filter_map(|fd| std::fs::read_link(fd.path()).ok());
    first_under(targets, paths)
}

/// The first of `targets` (as `/proc` shows them) under one of `paths`.
fn first_under(mut targets: impl Iterator<Item = PathBuf>, paths: &[PathBuf]) -> Option<PathBuf> {
    targets
        .find(|target| {
            let path = without_deleted(target).unwrap_or(target);
            paths.iter().any(|p| path.starts_with(p))
        })
        .map(undeleted)
}

/// The first file the process at `/proc/PID` (`dir`) has mapped (its
/// program, its libraries, `mmap`) under `paths`: such a process has no
/// descriptor there but holds the files open (a Python process that had
/// imported a package from a venv in a dot was not named).
fn mapped_under(dir: &Path, paths: &[PathBuf]) -> Option<PathBuf> {
    let maps = std::fs::read_to_string(dir.join("maps")).ok()?;
    let targets = maps.lines().filter_map(|line| {
        // address perms offset dev inode path
        let path = line.splitn(6, char::is_whitespace).nth(5)?.trim_start();
        path.starts_with('/').then(|| PathBuf::from(path))
    });
    first_under(targets, paths)
}

/// A `/proc/PID/fd` target without the " (deleted)" the kernel adds once
/// the name's dentry was dropped, if it has one.
fn without_deleted(target: &Path) -> Option<&Path> {
    use std::os::unix::ffi::OsStrExt;
    let p = target.as_os_str().as_bytes().strip_suffix(b" (deleted)")?;
    Some(Path::new(std::ffi::OsStr::from_bytes(p)))
}

/// A `/proc/PID/fd` target without its " (deleted)" when the path is
/// there: dm drops the dentries on other mounts after each commit (to
/// refresh what they cached), so every file open on the followed mount
/// showed as "(deleted)" in the messages.
fn undeleted(target: PathBuf) -> PathBuf {
    match without_deleted(&target) {
        Some(p) if p.exists() => p.to_path_buf(),
        _ => target,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_parent_of_the_same_name_that_works_there_is_the_one_to_stop() {
        let dir = tempfile::tempdir().unwrap();
        let paths = [dir.path().to_path_buf()];
        std::fs::write(dir.path().join("f"), b"x").unwrap();
        // A shell working in the directory whose child shell holds the
        // file: the parent is the one to stop. The test process above it,
        // of another name, is not.
        let mut parent = std::process::Command::new("sh")
            .arg("-c")
            .arg("(exec 3<f; while :; do sleep 1; done) & wait")
            .current_dir(dir.path())
            .spawn()
            .unwrap();
        let mut child = None;
        for _ in 0..100 {
            child = using(&paths)
                .into_iter()
                .find(|h| h.name == "sh" && h.pid != parent.id());
            if child.is_some() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let child = child.expect("the child holding f");
        let top = top_of(&child, &paths);
        let _ = std::process::Command::new("pkill")
            .args(["-P", &child.pid.to_string()])
            .status();
        let _ = std::process::Command::new("kill")
            .arg(child.pid.to_string())
            .status();
        let _ = parent.kill();
        let _ = parent.wait();
        assert_eq!(top.pid, parent.id(), "{top:?}");
    }

    #[test]
    fn a_file_still_there_is_not_named_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("held");
        std::fs::write(&file, b"x").unwrap();
        let shown = |p: &Path| PathBuf::from(format!("{} (deleted)", p.display()));
        assert_eq!(undeleted(shown(&file)), file);
        let gone = dir.path().join("gone");
        assert_eq!(undeleted(shown(&gone)), shown(&gone));
        assert_eq!(undeleted(file.clone()), file);
    }

    #[test]
    fn finds_a_host_process_with_a_file_open_and_not_itself() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("held");
        std::fs::write(&file, b"x").unwrap();
        let mut child = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("exec 3<'{}'; exec sleep 30", file.display()))
            .spawn()
            .unwrap();
        let want = child.id();
        let mut found = Vec::new();
        for _ in 0..500 {
            found = using(&[dir.path().to_path_buf()]);
            // sh opens the file and then becomes sleep: wait for both.
            if found.iter().any(|h| h.pid == want && h.name == "sleep") {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        let h = found
            .iter()
            .find(|h| h.pid == want)
            .expect("the child is found");
        assert_eq!(
            (h.name.as_str(), h.file.as_path()),
            ("sleep", file.as_path())
        );
        assert!(found.iter().all(|h| h.pid != std::process::id()));
        assert!(using(&[PathBuf::from("/nonexistent-dm-path")]).is_empty());
    }

    #[test]
    fn finds_a_host_process_that_only_maps_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("lib data.so");
        std::fs::write(&file, vec![7u8; 8192]).unwrap();
        // Maps the file, closes its descriptor, and waits.
        let script = "import mmap,os,sys,time\n\
                      fd=os.open(sys.argv[1],os.O_RDONLY)\n\
                      m=mmap.mmap(fd,0,prot=mmap.PROT_READ)\n\
                      os.close(fd)\n\
                      print('mapped',flush=True)\n\
                      time.sleep(30)";
        let mut child = std::process::Command::new("python3")
            .args(["-c", script])
            .arg(&file)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.take().unwrap()),
            &mut line,
        )
        .unwrap();
        let found = using(&[dir.path().to_path_buf()]);
        let _ = child.kill();
        let _ = child.wait();
        assert_eq!(line.trim(), "mapped");
        let h = found
            .iter()
            .find(|h| h.pid == child.id())
            .expect("the child is found");
        assert_eq!(h.file, file);
    }
}
