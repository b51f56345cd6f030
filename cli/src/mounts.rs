//! The server's mount table: which volume is mounted where.
//!
//! Unpinned mounts (`dot`, `dot.subdot`) follow the dot's current branch: a
//! checkout switches them to the new branch's filesystem. Pinned mounts
//! (`dot@branch`) stay on their branch. The table is saved in the data dir
//! so that mounts come back after a restart (also after a crash, once the
//! stale FUSE mounts are cleaned up).

use crate::api::{MountView, UnrestoredMount};
use crate::server::error::{ApiError, ApiResult};
use dm_fs::{Mount, MountOptions};
use dm_store::{DotName, Store, VolumeName};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

/// `path` with symlinks resolved as far as it exists (the missing rest
/// appended as given).
fn nearest_real(path: &Path) -> PathBuf {
    let mut rest = Vec::new();
    let mut at = path;
    loop {
        if let Ok(real) = std::fs::canonicalize(at) {
            return rest.iter().rev().fold(real, |p, c| p.join(c));
        }
        match (at.parent(), at.file_name()) {
            (Some(parent), Some(name)) => {
                rest.push(name.to_os_string());
                at = parent;
            }
            _ => return path.to_path_buf(),
        }
    }
}

/// Whether `path` is a directory with something in it.
fn holds_files(path: &Path) -> bool {
    std::fs::read_dir(path).is_ok_and(|mut d| d.next().is_some())
}

/// The paths of the mounts saved in `state_file` (`mounts.json`) by a
/// server, empty if there is none or it cannot be read.
pub fn saved_paths(state_file: &Path) -> Vec<PathBuf> {
    std::fs::read(state_file)
        .ok()
        .and_then(|b| serde_json::from_slice::<Vec<Record>>(&b).ok())
        .map(|records| records.into_iter().map(|r| r.path).collect())
        .unwrap_or_default()
}

/// A mount as saved in `mounts.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Record {
    volume: String,
    path: PathBuf,
    managed: bool,
    /// Written by a clean stop, which unmounted it: the path was a plain
    /// directory since, which its user may have used. Without it (a
    /// crash), what the path holds came after the mount died.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    stopped: bool,
    /// The data dir of the server that saved it (none in tables saved
    /// before it was kept): a server started on a copy of that data dir
    /// leaves the user's paths to it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    data_dir: Option<PathBuf>,
    /// Why the last start could not mount it again (not saved).
    #[serde(skip)]
    failed: String,
}

struct Entry {
    volume: VolumeName,
    path: PathBuf,
    /// True when the path was chosen by the server (under the mount dir).
    managed: bool,
    mount: Mount,
}

impl Entry {
    fn view(&self) -> MountView {
        MountView {
            volume: self.volume.to_string(),
            dot: self.volume.dot.to_string(),
            branch: self.mount.branch(),
            pinned: self.volume.branch.is_some(),
            subdot: self.volume.subdot.clone(),
            path: self.path.display().to_string(),
        }
    }

    fn record(&self) -> Record {
        Record {
            volume: self.volume.to_string(),
            path: self.path.clone(),
            managed: self.managed,
            stopped: false,
            data_dir: None,
            failed: String::new(),
        }
    }
}

/// Owns every FUSE mount of the server. All methods block: call them from
/// `spawn_blocking`.
pub struct MountManager {
    store: Arc<Store>,
    mount_dir: PathBuf,
    state_file: PathBuf,
    entries: Mutex<Vec<Entry>>,
    /// Saved mounts this start could not restore although their dot is
    /// still here (a mount point in the way, fusermount3 broken): kept in
    /// the table, so that the next start tries again, until `dm unmount`
    /// of the path or the dot's deletion forgets them. Locked after
    /// `entries`.
    unrestored: Mutex<Vec<Record>>,
}

impl MountManager {
    /// A manager mounting under `mount_dir` and saving its table in `state_file`.
    pub fn new(store: Arc<Store>, mount_dir: &Path, state_file: &Path) -> MountManager {
        MountManager {
            store,
            mount_dir: mount_dir.to_path_buf(),
            state_file: state_file.to_path_buf(),
            entries: Mutex::new(Vec::new()),
            unrestored: Mutex::new(Vec::new()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Entry>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn options(volume: &VolumeName) -> MountOptions {
        MountOptions {
            fsname: format!("dm:{volume}"),
            ..MountOptions::default()
        }
    }

    /// The path the server picks for a volume: `M/<ns>/<dot>[@<branch>]/<subdot>`.
    pub fn default_path(&self, volume: &VolumeName) -> PathBuf {
        let dot = match &volume.branch {
            Some(b) => format!("{}@{}", volume.dot.name, b),
            None => volume.dot.name.clone(),
        };
        self.mount_dir
            .join(&volume.dot.namespace)
            .join(dot)
            .join(&volume.subdot)
    }

    /// Cleans up stale mounts left by a previous run (the saved table and
    /// anything dead under the mount dir), then mounts the saved table again.
    pub fn restore(&self) {
        let records: Vec<Record> = match std::fs::read(&self.state_file) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                tracing::warn!("ignoring unreadable {}: {e}", self.state_file.display());
                Vec::new()
            }),
            Err(_) => Vec::new(),
        };
        // Each path's dead mount (after a crash) is detached right before
        // the path is mounted again: detached all first, writers going on
        // by path (getting ENOTCONN until then) filled the bare
        // directories meanwhile, and their later writes went there.
        // Every saved path, and the directory holding it, asked at once,
        // with one deadline: a stopped FUSE server (its mount at a saved
        // path, or the file system the path is in) held the start as long
        // as it stayed stopped, or 5 s per dead mount when each was asked
        // in turn.
        let probed: Vec<PathBuf> = records
            .iter()
            .flat_map(|r| {
                let parent = r.path.parent().unwrap_or(&r.path).to_path_buf();
                [r.path.clone(), parent]
            })
            .collect();
        let answers = dm_fs::answer_all(&probed, PATH_PATIENCE);
        for (i, r) in records.into_iter().enumerate() {
            if answers[2 * i + 1] != Some(true) {
                let parent = r.path.parent().unwrap_or(&r.path);
                tracing::warn!(
                    "could not restore the mount of {} at {}: {} does not answer within {} s \
                     (a file system that hangs: another FUSE server, stopped?) (kept: the next \
                     start tries again; `dm unmount PATH` forgets it)",
                    r.volume,
                    r.path.display(),
                    parent.display(),
                    PATH_PATIENCE.as_secs()
                );
                self.unrestored_lock().push(Record {
                    failed: format!("{} did not answer", parent.display()),
                    ..r
                });
                continue;
            }
            let volume = match VolumeName::parse(&r.volume) {
                Ok(v) => v,
                Err(e) => {
                    tracing::warn!(
                        "could not restore the mount of {} at {}: {e}",
                        r.volume,
                        r.path.display()
                    );
                    continue;
                }
            };
            // Before any cleanup: a path this start does not mount again is
            // left as it is (a server started on a copy of the data dir
            // detached the original server's mounts there).
            if let Some(why) = self.not_to_restore(&r) {
                tracing::warn!(
                    "not restoring the mount of {volume} at {}: {why}",
                    r.path.display()
                );
                continue;
            }
            match dm_fs::cleanup_stale_mount_probed(&r.path, answers[2 * i]) {
                // A clean stop removed the server's own mount paths.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => tracing::warn!("cleaning up {}: {e}", r.path.display()),
                Ok(dm_fs::Leftover::Live) => {
                    tracing::warn!(
                        "not restoring the mount of {volume} at {}: a file system that answers is \
                         mounted there (another dm server's, one started on a copy of this data \
                         dir or with the same mount dir?); left alone and forgotten",
                        r.path.display()
                    );
                    continue;
                }
                Ok(_) => {}
            }
            // Files put in a server path while it was not mounted (by a
            // writer that went on by path after a crash) would be hidden
            // by the mount: moved aside first.
            if r.managed && holds_files(&r.path) {
                self.move_aside(&r.path, &volume);
            }
            // Likewise a path of the user's whose mount died with a crash
            // (it was empty under the mount: `dm mount` takes it empty, so
            // what is there now came since the detach above, from writers
            // going on by path). After a clean stop it was a plain
            // directory, which may have been used on purpose since: it is
            // not mounted again over files then.
            if !r.managed
                && holds_files(&r.path)
                && (r.stopped || !self.move_aside_users(&r.path, &volume))
            {
                tracing::warn!(
                    "could not restore the mount of {volume} at {}: it holds files now, not mounted again over them (`dm mount {volume} PATH` elsewhere)",
                    r.path.display()
                );
                continue;
            }
            match self.mount_inner(volume.clone(), r.path.clone(), r.managed) {
                Ok(v) => tracing::info!("restored mount of {} at {}", v.volume, v.path),
                Err(e) => {
                    let still_here = match &volume.branch {
                        Some(b) => self.store.branch_info(&volume.dot, b).is_ok(),
                        None => self.store.dot_info(&volume.dot).is_ok(),
                    };
                    tracing::warn!(
                        "could not restore the mount of {volume} at {}: {}{}",
                        r.path.display(),
                        e.message,
                        if still_here {
                            " (kept: the next start tries again; `dm unmount PATH` forgets it)"
                        } else {
                            ""
                        }
                    );
                    if still_here {
                        self.unrestored_lock().push(Record {
                            failed: e.message,
                            ..r
                        });
                    }
                }
            }
        }
        self.cleanup_dead_under_mount_dir();
        self.save(&self.lock());
    }

    /// Why a saved mount is not to be made again at its path: a server
    /// path outside this start's mount dir (the server's directories moved),
    /// or a path that leads elsewhere now through another user's symlink,
    /// made while dm was down (to get a dot mounted where they can read
    /// it, or over a system directory).
    fn not_to_restore(&self, r: &Record) -> Option<String> {
        if r.managed && !r.path.starts_with(&self.mount_dir) {
            return Some(format!(
                "it is outside this server's mount dir {} (Docker and `dm mount` mount the volume there when asked)",
                self.mount_dir.display()
            ));
        }
        // A user's path saved by the server of another data dir that is
        // still there: this one is a copy of it (a restored backup tried
        // elsewhere), whose start took the path over from it.
        if let (false, Some(made_in)) = (r.managed, &r.data_dir) {
            if made_in.join("store").is_dir() && !same_dir(made_in, self.state_file.parent()?) {
                return Some(format!(
                    "the server of {} mounted it, and this data dir is a copy of that one (a \
                     restored backup?); that server mounts it again when it starts (`dm mount {} \
                     {}` mounts it from here instead)",
                    made_in.display(),
                    r.volume,
                    r.path.display()
                ));
            }
        }
        // Symlinks of this user or root are theirs to make (/var/run).
        use std::os::unix::fs::MetadataExt;
        let me = nix::unistd::geteuid().as_raw();
        // A FUSE mount there is no symlink, and its server may be stopped
        // (looking at it would wait as long): only the ancestors then.
        let mounted = dm_fs::fuse_mount_points().is_ok_and(|m| m.contains(&r.path));
        r.path.ancestors().skip(usize::from(mounted)).find_map(|a| {
            let m = std::fs::symlink_metadata(a).ok()?;
            (m.file_type().is_symlink() && m.uid() != me && m.uid() != 0).then(|| {
                format!(
                    "{} is a symlink of uid {} now, to {}; `dm mount` it again where you mean it",
                    a.display(),
                    m.uid(),
                    std::fs::read_link(a).unwrap_or_default().display()
                )
            })
        })
    }

    /// This server's data dir (where `mounts.json` is), canonical.
    fn data_dir(&self) -> Option<PathBuf> {
        std::fs::canonicalize(self.state_file.parent()?).ok()
    }

    /// Moves a server mount point that holds files to
    /// `MOUNT_DIR/lost+found/<seconds since 1970>/<its path under MOUNT_DIR>`
    /// (on the same file system; `<seconds>-2`, `-3`... when taken: two
    /// stops in a second), and says so in the log.
    fn move_aside(&self, path: &Path, volume: &VolumeName) {
        let secs = unix_secs();
        let rel = path.strip_prefix(&self.mount_dir).unwrap_or(path);
        let rel = rel.strip_prefix("/").unwrap_or(rel);
        let found = self.mount_dir.join("lost+found");
        let dest = first_free(|suffix| found.join(format!("{secs}{suffix}")).join(rel));
        let moved = dest
            .parent()
            .map_or(Ok(()), std::fs::create_dir_all)
            .and_then(|()| std::fs::rename(path, &dest));
        match moved {
            Ok(()) => tracing::warn!(
                "{} held files written while {volume} was not mounted there (outside the dot): \
                 moved to {}",
                path.display(),
                dest.display()
            ),
            Err(e) => tracing::warn!(
                "{} holds files written while {volume} was not mounted there (outside the dot); \
                 moving them to {} failed: {e} (a mount there hides them until it is unmounted)",
                path.display(),
                dest.display()
            ),
        }
    }

    /// Moves a mount point of the user's that holds files beside it, as
    /// `NAME.dm-lost+found-<seconds since 1970>` (where the user looks, on
    /// their file system: under the mount dir they went to `/tmp` for a
    /// user without `XDG_RUNTIME_DIR`, which a reboot empties), and makes
    /// it again, empty, with its mode and owner. False (and logged, the
    /// files left where they are, not mounted over) if that fails.
    fn move_aside_users(&self, path: &Path, volume: &VolumeName) -> bool {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let Ok(meta) = std::fs::metadata(path) else {
            return false;
        };
        let secs = unix_secs();
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        let dest = first_free(|suffix| {
            path.with_file_name(format!("{name}.dm-lost+found-{secs}{suffix}"))
        });
        if let Err(e) = std::fs::rename(path, &dest) {
            tracing::warn!(
                "{} holds files written while {volume} was not mounted there (outside the dot); \
                 moving them to {} failed: {e}",
                path.display(),
                dest.display()
            );
            return false;
        }
        let made = std::fs::create_dir(path)
            .and_then(|()| {
                std::fs::set_permissions(
                    path,
                    std::fs::Permissions::from_mode(meta.mode() & 0o7777),
                )
            })
            .and_then(|()| std::os::unix::fs::chown(path, Some(meta.uid()), Some(meta.gid())));
        if let Err(e) = made {
            tracing::warn!("making {} again: {e}", path.display());
            return false;
        }
        tracing::warn!(
            "{} held files written while {volume} was not mounted there (outside the dot): \
             moved to {}",
            path.display(),
            dest.display()
        );
        true
    }

    /// Removes a server mount point once unmounted, and its parents up to
    /// the mount dir while they are empty: a writer going on by path while
    /// the server is stopped then fails, rather than filling a directory
    /// the next mount would hide; and deleted dots leave nothing behind.
    /// What such a writer put there between the unmount and the removal
    /// is moved aside (see [`Self::move_aside`]): left there, the
    /// directory took its writes, thousands of files after a stop, with no
    /// error.
    fn remove_mount_point(&self, path: &Path, volume: &VolumeName) {
        if !path.starts_with(&self.mount_dir) || path == self.mount_dir {
            return;
        }
        match std::fs::remove_dir(path) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOTEMPTY) => self.move_aside(path, volume),
            Err(_) => return,
        }
        let mut at = path.parent();
        while let Some(dir) = at.filter(|d| d.starts_with(&self.mount_dir) && *d != self.mount_dir)
        {
            if std::fs::remove_dir(dir).is_err() {
                break;
            }
            at = dir.parent();
        }
    }

    /// Walks three levels under the mount dir and cleans up every directory
    /// whose FUSE server is gone (stat fails with ENOTCONN).
    fn cleanup_dead_under_mount_dir(&self) {
        fn walk(dir: &Path, depth: u32) {
            let Ok(rd) = std::fs::read_dir(dir) else {
                return;
            };
            for ent in rd.flatten() {
                let p = ent.path();
                match std::fs::metadata(&p) {
                    Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => {
                        if let Err(e) = dm_fs::cleanup_stale_mount(&p) {
                            tracing::warn!("cleaning up {}: {e}", p.display());
                        }
                    }
                    Ok(m) if m.is_dir() && depth > 1 => walk(&p, depth - 1),
                    _ => {}
                }
            }
        }
        walk(&self.mount_dir, 3);
    }

    fn unrestored_lock(&self) -> MutexGuard<'_, Vec<Record>> {
        self.unrestored.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn save(&self, entries: &[Entry]) {
        let mut records: Vec<Record> = entries.iter().map(Entry::record).collect();
        let mut unrestored = self.unrestored_lock();
        // A path mounted again since is the new mount's.
        unrestored.retain(|r| entries.iter().all(|e| e.path != r.path));
        records.extend(unrestored.iter().cloned());
        drop(unrestored);
        self.save_records(&records);
    }

    fn save_records(&self, records: &[Record]) {
        let here = self.data_dir();
        let records: Vec<Record> = records
            .iter()
            .map(|r| Record {
                data_dir: here.clone(),
                ..r.clone()
            })
            .collect();
        let res = serde_json::to_vec_pretty(&records)
            .map_err(std::io::Error::other)
            .and_then(|bytes| {
                let tmp = self.state_file.with_extension("json.tmp");
                std::fs::write(&tmp, bytes)?;
                std::fs::rename(&tmp, &self.state_file)
            });
        if let Err(e) = res {
            tracing::error!("saving {}: {e}", self.state_file.display());
        }
    }

    /// Every mount.
    pub fn list(&self) -> Vec<MountView> {
        self.forget_unmounted();
        self.lock().iter().map(Entry::view).collect()
    }

    /// Forgets the user's mounts that were unmounted outside dm
    /// (`fusermount3 -u`, `umount`): still listed, they said the path
    /// showed the dot while what was written there went to the host disk.
    /// Only those whose FUSE session ended: one merely hidden by a mount
    /// the user put over it still runs (and forgetting it unmounted the
    /// user's file system at the path). dm's own paths are Docker's and
    /// the server's: left to them.
    fn forget_unmounted(&self) {
        let mut entries = self.lock();
        let (gone, kept): (Vec<Entry>, Vec<Entry>) = std::mem::take(&mut *entries)
            .into_iter()
            .partition(|e| !e.managed && e.mount.session_ended());
        *entries = kept;
        if gone.is_empty() {
            return;
        }
        for e in gone {
            tracing::warn!(
                "{} was unmounted outside dm: forgotten (`dm mount {} {}` mounts it again)",
                e.path.display(),
                e.volume,
                e.path.display()
            );
            if let Err(err) = e.mount.unmount() {
                tracing::warn!("ending the session of {}: {err}", e.path.display());
            }
        }
        self.save(&entries);
    }

    /// The mounts of `dot` that the last start could not restore (kept
    /// for the next; `dm unmount PATH` forgets one).
    pub fn unrestored_of(&self, dot: &DotName) -> Vec<UnrestoredMount> {
        self.unrestored_lock()
            .iter()
            .filter(|r| VolumeName::parse(&r.volume).is_ok_and(|v| &v.dot == dot))
            .map(|r| UnrestoredMount {
                volume: r.volume.clone(),
                path: r.path.display().to_string(),
                error: r.failed.clone(),
            })
            .collect()
    }

    /// The mounts of one dot.
    pub fn list_dot(&self, dot: &DotName) -> Vec<MountView> {
        self.forget_unmounted();
        self.lock()
            .iter()
            .filter(|e| &e.volume.dot == dot)
            .map(Entry::view)
            .collect()
    }

    /// Mounts `volume` at `path` (or at its default path). Mounting the same
    /// volume at the same path again answers the existing mount.
    pub fn mount(&self, volume: &str, path: Option<PathBuf>) -> ApiResult<MountView> {
        let volume = VolumeName::parse(volume)?;
        // The dot first: `dm mount PATH DOT` (swapped) is told it names no
        // dot, not that DOT's path is taken.
        self.store.dot_info(&volume.dot)?;
        let (path, managed) = match path {
            Some(p) => {
                if !p.is_absolute() {
                    return Err(ApiError::bad_request(format!(
                        "mount path {} is not absolute",
                        p.display()
                    )));
                }
                self.check_user_path(&p, &volume)?;
                // The server's own path for the volume, named: still the
                // server's (removed at a stop, its files moved aside at
                // the next start).
                let managed = p == self.default_path(&volume);
                (p, managed)
            }
            None => (self.default_path(&volume), true),
        };
        let view = self.mount_inner(volume, path, managed)?;
        self.save(&self.lock());
        Ok(view)
    }

    fn mount_inner(
        &self,
        volume: VolumeName,
        path: PathBuf,
        managed: bool,
    ) -> ApiResult<MountView> {
        let mut entries = self.lock();
        if let Some(i) = entries.iter().position(|e| e.path == path) {
            let e = &entries[i];
            if e.mount.is_covered() {
                return Err(covered(&path));
            }
            if !e.mount.is_alive() {
                // Unmounted behind dm's back (`umount`): mounted again
                // below, or writes would go to the bare directory.
                tracing::warn!(
                    "{} no longer showed {}; mounting it again",
                    path.display(),
                    e.volume
                );
                drop(entries.remove(i));
            } else if e.volume == volume {
                return Ok(e.view());
            } else {
                return Err(ApiError::conflict(format!(
                    "{} is already the mount of {}; unmount it first (`dm unmount {}`)",
                    path.display(),
                    e.volume,
                    path.display()
                )));
            }
        }
        Self::check_mount_point(&path)?;
        check_open_file_room(&volume)?;
        let info = self.store.dot_info(&volume.dot)?;
        let branch = match &volume.branch {
            Some(b) => {
                self.store.branch_info(&volume.dot, b)?;
                b.clone()
            }
            None => info.current_branch.clone(),
        };
        let fs = self.store.branch_fs(&volume.dot, &branch)?;
        fs.subdot_ino(&volume.subdot, true)?;
        std::fs::create_dir_all(&path).map_err(|e| {
            ApiError::internal(format!("creating mount point {}: {e}", path.display()))
        })?;
        let mount =
            Mount::mount(&path, fs, &volume.subdot, &Self::options(&volume)).map_err(|e| {
                ApiError::internal(format!("mounting {volume} at {}: {e}", path.display()))
            })?;
        tracing::info!("mounted {volume} (branch {branch}) at {}", path.display());
        let entry = Entry {
            volume,
            path,
            managed,
            mount,
        };
        let view = entry.view();
        entries.push(entry);
        Ok(view)
    }

    /// A path the user gave `dm mount`: a directory (made if missing) that
    /// holds nothing, or is already the mount of this volume; a mount over
    /// files would hide them until the unmount.
    fn check_user_path(&self, path: &Path, volume: &VolumeName) -> ApiResult<()> {
        let real = nearest_real(path);
        let entries = self.lock();
        if entries.iter().any(|e| e.path == path) {
            // Mounted by dm: mount_inner answers (the same volume, or who).
            return Ok(());
        }
        // Inside another of dm's mounts: the mount point would be a
        // directory of that dot (committed with it), and a checkout of it
        // would take the mount away.
        let inside = |p: &Path, outer: &Path| p.starts_with(outer) && p != outer;
        if let Some(outer) = entries
            .iter()
            .find(|e| inside(path, &e.path) || inside(&real, &e.path))
        {
            return Err(ApiError::conflict(format!(
                "{} is inside the mount of {} at {}: give a path outside dm's mounts",
                path.display(),
                outer.volume,
                outer.path.display()
            )));
        }
        drop(entries);
        // Another dm server's mount (not in this one's table), at or
        // above the path: said as such, not as a directory with files.
        // One whose server is gone is no one's (a server killed between
        // mounting it and saving its table left it, which the next start
        // knew nothing of): detached, and the path mounted.
        if let Some(at) = dm_fs::dm_mount_holding(path)
            .ok()
            .flatten()
            .filter(|at| !(at == path && detach_dead(path)))
        {
            return Err(ApiError::conflict(if at == path {
                format!(
                    "{} is the mount of another dm server's dot (a server on another data \
                     dir); unmount it there, or give another path",
                    path.display()
                )
            } else {
                format!(
                    "{} is inside the mount of another dm server's dot at {}: give a path \
                     outside dm's mounts",
                    path.display(),
                    at.display()
                )
            }));
        }
        Self::check_own_dir(path)?;
        Self::check_empty_dir(path, volume)
    }

    /// A server not run as root mounts only over directories of its own
    /// user: over another's (one it may write to, mode 777) that user saw
    /// this server's files in their own directory, and could neither write
    /// there nor unmount it.
    fn check_own_dir(path: &Path) -> ApiResult<()> {
        use std::os::unix::fs::MetadataExt;
        let me = nix::unistd::geteuid();
        match std::fs::metadata(path) {
            Ok(m) if !me.is_root() && m.uid() != me.as_raw() => {
                let owner = nix::unistd::User::from_uid(m.uid().into())
                    .ok()
                    .flatten()
                    .map_or_else(|| format!("uid {}", m.uid()), |u| u.name);
                Err(ApiError::bad_request(format!(
                    "{} belongs to {owner}: this dm server runs as uid {me} and mounts only into \
                     directories of its own user; give a path of yours",
                    path.display()
                )))
            }
            _ => Ok(()),
        }
    }

    /// `path` is missing, or an empty directory (a symlink to one too).
    fn check_empty_dir(path: &Path, volume: &VolumeName) -> ApiResult<()> {
        match std::fs::metadata(path) {
            Ok(m) if !m.is_dir() => Err(ApiError::bad_request(format!(
                "{} is a file, not a directory: give `dm mount {volume}` a directory (it is made if missing)",
                path.display()
            ))),
            Ok(_) if holds_files(path) => Err(ApiError::conflict(format!(
                "{} is not empty: its files would be hidden while {volume} is mounted there; give an empty or new directory",
                path.display()
            ))),
            Ok(_) => Ok(()),
            Err(_) => Ok(()),
        }
    }

    /// Refuses a mount point where something else is mounted (another dm
    /// server's mount, say: mounting over it would hide it, and unmounting
    /// would take the wrong one). A dead FUSE mount left by a crash is
    /// cleaned up.
    fn check_mount_point(path: &Path) -> ApiResult<()> {
        use std::os::unix::fs::MetadataExt;
        let meta = match std::fs::metadata(path) {
            Ok(m) => m,
            // A dead FUSE mount (its daemon crashed): unmounted.
            Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => {
                return dm_fs::cleanup_stale_mount(path).map(|_| ()).map_err(|e| {
                    ApiError::internal(format!("cleaning up {}: {e}", path.display()))
                });
            }
            // Missing: created below.
            Err(_) => return Ok(()),
        };
        let Some(parent) = path.parent() else {
            return Ok(());
        };
        match std::fs::metadata(parent) {
            Ok(p) if p.dev() != meta.dev() => Err(ApiError::conflict(format!(
                "{} is a mount point already (another file system is mounted there); unmount it or choose another path",
                path.display()
            ))),
            _ => Ok(()),
        }
    }

    /// Files open through the mount at `path` (0 when dm mounts nothing there).
    pub fn open_files(&self, path: &Path) -> usize {
        self.lock()
            .iter()
            .find(|e| e.path == path)
            .map_or(0, |e| e.mount.open_files())
    }

    /// Whether a process uses the mount at `path` (a file open, a working
    /// directory there); false when dm mounts nothing there.
    pub fn is_busy(&self, path: &Path) -> bool {
        self.lock()
            .iter()
            .find(|e| e.path == path)
            .is_some_and(|e| e.mount.is_busy())
    }

    /// Unmounts the mount at `path`; true if it was busy and only detached
    /// lazily (a process this server cannot see still works in it).
    pub fn unmount(&self, path: &Path) -> ApiResult<bool> {
        let mut entries = self.lock();
        let Some(i) = entries.iter().position(|e| e.path == path) else {
            let forgotten = {
                let mut unrestored = self.unrestored_lock();
                let before = unrestored.len();
                unrestored.retain(|r| r.path != path);
                before != unrestored.len()
            };
            if forgotten {
                self.save(&entries);
                return Ok(false);
            }
            if matches!(dm_fs::dm_mount_holding(path), Ok(Some(at)) if at == path)
                && detach_dead(path)
            {
                return Ok(false);
            }
            return Err(ApiError::not_found(format!(
                "nothing is mounted by dm at {} (see `dm dot show` for the mounts)",
                path.display()
            )));
        };
        if entries[i].mount.is_covered() {
            // An unmount of the path would take the user's mount on top.
            return Err(covered(path));
        }
        let entry = entries.remove(i);
        let res = self.unmount_entry(entry);
        self.save(&entries);
        res
    }

    fn unmount_entry(&self, entry: Entry) -> ApiResult<bool> {
        let path = entry.path.clone();
        let detached = entry.mount.unmount().map_err(|e| {
            ApiError::internal(format!(
                "unmounting {}: {e} (is a process still using it? try `{} {}`)",
                path.display(),
                if nix::unistd::geteuid().is_root() {
                    "umount -l"
                } else {
                    "fusermount3 -u -z"
                },
                path.display()
            ))
        })?;
        if entry.managed {
            self.remove_mount_point(&path, &entry.volume);
        }
        tracing::info!("unmounted {}", path.display());
        Ok(detached)
    }

    /// Unmounts every mount of `dot`, then deletes it with `delete`. The
    /// table is saved once the delete is done: saved before it, a server
    /// killed in between came back with the dot and without its mounts. A
    /// delete that fails keeps them for the next start to mount again.
    pub fn unmount_dot_then<T>(
        &self,
        dot: &DotName,
        delete: impl FnOnce() -> ApiResult<T>,
    ) -> ApiResult<T> {
        let mut entries = self.lock();
        let mut first_err = None;
        let mut records = Vec::new();
        let mut i = 0;
        while i < entries.len() {
            if &entries[i].volume.dot == dot {
                let e = entries.remove(i);
                records.push(e.record());
                if let Err(err) = self.unmount_entry(e) {
                    first_err.get_or_insert(err);
                }
            } else {
                i += 1;
            }
        }
        let out = match first_err {
            Some(err) => Err(err),
            None => delete(),
        };
        let mut unrestored = self.unrestored_lock();
        match &out {
            // Mounts of it that a start could not restore go too.
            Ok(_) => {
                unrestored.retain(|r| VolumeName::parse(&r.volume).map_or(true, |v| &v.dot != dot))
            }
            Err(e) => unrestored.extend(records.into_iter().map(|r| Record {
                failed: format!("unmounted for a delete of {dot} that failed: {}", e.message),
                ..r
            })),
        }
        drop(unrestored);
        self.save(&entries);
        out
    }

    /// Paths of the mounts pinned to `branch` of `dot`.
    pub fn pinned_paths(&self, dot: &DotName, branch: &str) -> Vec<PathBuf> {
        self.lock()
            .iter()
            .filter(|e| &e.volume.dot == dot && e.volume.branch.as_deref() == Some(branch))
            .map(|e| e.path.clone())
            .collect()
    }

    /// The mounts of volumes that `which` picks and that have files or
    /// directories open, with how many.
    pub fn open_files_where(&self, which: impl Fn(&VolumeName) -> bool) -> Vec<(PathBuf, usize)> {
        self.lock()
            .iter()
            .filter(|e| which(&e.volume))
            .map(|e| (e.path.clone(), e.mount.open_files_and_dirs()))
            .filter(|(_, n)| *n > 0)
            .collect()
    }

    /// Makes `branch` the current branch of `dot` (creating it first when
    /// `create`: at the commit it holds, or the current head, grown from
    /// the branch it names, see [`dm_store::Store::create_branch_from`])
    /// and moves the unpinned mounts to it.
    pub fn checkout(
        &self,
        dot: &DotName,
        branch: &str,
        create: Option<(Option<dm_store::Id>, Option<&str>)>,
    ) -> ApiResult<()> {
        let entries = self.lock();
        if let Some((from, origin)) = create {
            self.store.create_branch_from(dot, branch, from, origin)?;
        } else {
            self.store.branch_info(dot, branch)?;
        }
        self.store.set_current_branch(dot, branch)?;
        let fs = self.store.branch_fs(dot, branch)?;
        for e in entries
            .iter()
            .filter(|e| &e.volume.dot == dot && e.volume.branch.is_none())
        {
            fs.subdot_ino(&e.volume.subdot, true)?;
            e.mount.switch(fs.clone()).map_err(|err| {
                ApiError::internal(format!(
                    "switching the mount at {} to branch {branch}: {err}",
                    e.path.display()
                ))
            })?;
        }
        Ok(())
    }

    /// Flushes the kernel's dirty pages of every mount showing `branch` of
    /// `dot` into the store (before a commit).
    pub fn sync_kernel(&self, dot: &DotName, branch: &str) {
        // Mount::sync also waits for mmap-dirtied pages still on their way
        // to the daemon (syncfs alone can return before they arrive).
        for e in self
            .lock()
            .iter()
            .filter(|e| &e.volume.dot == dot && e.mount.branch() == branch)
        {
            if let Err(err) = e.mount.sync() {
                tracing::warn!("syncing {} before a commit: {err}", e.path.display());
            }
        }
    }

    /// When several mounts show `branch` of `dot`, makes each of them drop
    /// the kernel's cached view so that they agree (after a commit). The
    /// kernel caches per mount, so a write through one mount is not seen
    /// through another until then; see cli/REQUESTS.md.
    pub fn refresh_shared(&self, dot: &DotName, branch: &str) -> ApiResult<()> {
        let entries = self.lock();
        let shown: Vec<&Entry> = entries
            .iter()
            .filter(|e| &e.volume.dot == dot && e.mount.branch() == branch)
            .collect();
        if shown.len() > 1 {
            let fs = self.store.branch_fs(dot, branch)?;
            for e in shown {
                e.mount.switch(fs.clone()).map_err(|err| {
                    ApiError::internal(format!(
                        "refreshing the mount at {}: {err}",
                        e.path.display()
                    ))
                })?;
            }
        }
        Ok(())
    }

    /// Runs `f` (a reset of `branch`) with the mount table locked, then makes
    /// every mount showing that branch drop its cached view.
    pub fn reset<T>(
        &self,
        dot: &DotName,
        branch: &str,
        f: impl FnOnce() -> ApiResult<T>,
    ) -> ApiResult<T> {
        let entries = self.lock();
        // Write back what the kernel still holds dirty (shared mmaps) before
        // the reset, so it lands in the state being discarded and not, by a
        // later writeback, on top of the restored one.
        for e in entries
            .iter()
            .filter(|e| &e.volume.dot == dot && e.mount.branch() == branch)
        {
            if let Err(err) = e.mount.sync() {
                tracing::warn!("syncing {} before a reset: {err}", e.path.display());
            }
        }
        let shown: Vec<&Entry> = entries
            .iter()
            .filter(|e| &e.volume.dot == dot && e.mount.branch() == branch)
            .collect();
        // Their requests wait while the branch is reset: one that raced
        // the reset reached the reset state by a node id the switch then
        // found stale (see `Mount::freeze`).
        let frozen: Vec<_> = shown.iter().map(|e| e.mount.freeze()).collect();
        let out = f()?;
        if !shown.is_empty() {
            let fs = self.store.branch_fs(dot, branch)?;
            for (e, frozen) in shown.into_iter().zip(frozen) {
                fs.subdot_ino(&e.volume.subdot, true)?;
                e.mount.switch_frozen(frozen, fs.clone()).map_err(|err| {
                    ApiError::internal(format!(
                        "refreshing the mount at {}: {err}",
                        e.path.display()
                    ))
                })?;
            }
        }
        Ok(out)
    }

    /// Unmounts everything (server shutdown). The table stays saved so the
    /// mounts come back at the next start.
    pub fn shutdown(&self) {
        let mut entries = self.lock();
        // Saved as stopped: the paths of the user's are plain directories
        // from now on (see `Record::stopped`).
        let mut records: Vec<Record> = entries.iter().map(Entry::record).collect();
        records.extend(self.unrestored_lock().iter().cloned());
        for r in &mut records {
            r.stopped = true;
        }
        for e in entries.drain(..) {
            let path = e.path.clone();
            let open = e.mount.open_files();
            if open > 0 {
                tracing::warn!(
                    "unmounting {} with {open} file{} still open: their next requests fail (ESHUTDOWN while the server stops, ENOTCONN once it is gone) for the processes using {} (`fuser -vm` named them)",
                    path.display(),
                    if open == 1 { "" } else { "s" },
                    if open == 1 { "it" } else { "them" }
                );
            }
            if let Err(err) = e.mount.unmount() {
                tracing::warn!("unmounting {}: {err}", path.display());
            } else {
                if e.managed {
                    self.remove_mount_point(&path, &e.volume);
                }
                tracing::info!("unmounted {}", path.display());
            }
        }
        self.save_records(&records);
    }
}

/// Detaches the dm mount at `path` if its server is gone (ENOTCONN, or
/// no answer within 5 s); true when it did.
fn detach_dead(path: &Path) -> bool {
    match dm_fs::cleanup_stale_mount(path) {
        Ok(dm_fs::Leftover::Detached) => {
            tracing::info!(
                "detached the dead dm mount at {} (its server is gone; it was in no server's table)",
                path.display()
            );
            true
        }
        Ok(_) => false,
        Err(e) => {
            tracing::warn!("detaching the dead mount at {}: {e}", path.display());
            false
        }
    }
}

/// Open files a mount must leave the server: for its API socket, its
/// clients, the store's files (RocksDB opens more as it grows) and
/// transfers.
const OPEN_FILES_RESERVE: u64 = 128;

/// Refuses a mount that would leave the server fewer than
/// [`OPEN_FILES_RESERVE`] open files (each mount takes a few `/dev/fuse`
/// descriptors): past its limit the server failed to open its own socket
/// at the next start and exited, leaving dead mounts behind.
fn check_open_file_room(volume: &VolumeName) -> ApiResult<()> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct passed.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Ok(());
    }
    let Ok(fds) = std::fs::read_dir("/proc/self/fd") else {
        return Ok(());
    };
    let open = fds.count() as u64;
    if open + OPEN_FILES_RESERVE <= lim.rlim_cur {
        return Ok(());
    }
    Err(ApiError::conflict(format!(
        "not mounting {volume}: the dm server has {open} of its {} open files in use (each mount takes a few, \
         and {OPEN_FILES_RESERVE} stay for its clients and its store); raise the server's open-file limit \
         (`ulimit -n` before `dm server`, LimitNOFILE= in a systemd unit) and restart it, or unmount others",
        lim.rlim_cur
    )))
}

/// The first of `make("")`, `make("-2")`, `make("-3")`... that names
/// nothing yet (the first when all of 99 do): never onto an earlier
/// lost+found (two stops or crashes in a second).
fn first_free(make: impl Fn(&str) -> PathBuf) -> PathBuf {
    (1..100)
        .map(|n| match n {
            1 => make(""),
            n => make(&format!("-{n}")),
        })
        .find(|d| std::fs::symlink_metadata(d).is_err())
        .unwrap_or_else(|| make(""))
}

/// Seconds since 1970, naming the lost+found directories.
fn unix_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The refusal to unmount, or mount again, a mount that another file
/// system covers (what either did to the path would hit the one on top).
fn covered(path: &Path) -> ApiError {
    ApiError::conflict(format!(
        "another file system is mounted over dm's mount at {}: unmount that first (`umount {}`)",
        path.display(),
        path.display()
    ))
}

/// How long `dm mount` waits for a path of the user's to answer.
const PATH_PATIENCE: std::time::Duration = std::time::Duration::from_secs(5);

/// Refuses a mount path that does not answer within [`PATH_PATIENCE`]: one
/// inside a file system that hangs (another FUSE server, stopped) blocks
/// whoever looks at it, and `dm mount` looked with the mount table (and
/// Docker's) locked, which held every other command up until that server
/// went on, and then mounted there after the client had given up. Call
/// before taking those locks.
pub fn check_answers(path: &Path) -> ApiResult<()> {
    if answers_soon(path) {
        return Ok(());
    }
    Err(ApiError::conflict(format!(
        "{} does not answer within {} s: it is in a file system that hangs (another FUSE \
         server that stopped?); give a path elsewhere",
        path.display(),
        PATH_PATIENCE.as_secs()
    )))
}

/// Whether the nearest directory at or above `path` that exists can be
/// listed within [`PATH_PATIENCE`] (a listing asks the file system; a
/// `stat` may be answered from the kernel's cache). The thread that asks
/// stays behind if it cannot, until the file system answers.
fn answers_soon(path: &Path) -> bool {
    let (tx, rx) = std::sync::mpsc::channel();
    let p = path.to_path_buf();
    let asked = std::thread::Builder::new()
        .name("dm-path-probe".into())
        .spawn(move || {
            let mut at = p.as_path();
            loop {
                match std::fs::read_dir(at) {
                    Ok(mut entries) => {
                        let _ = entries.next();
                        break;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => match at.parent() {
                        Some(parent) => at = parent,
                        None => break,
                    },
                    // A file, or no permission: it answered.
                    Err(_) => break,
                }
            }
            let _ = tx.send(());
        });
    // No thread to spare: go on (the mount then looks at the path itself,
    // as it did before this check).
    if asked.is_err() {
        return true;
    }
    rx.recv_timeout(PATH_PATIENCE).is_ok()
}

/// Whether `a` and `b` are the same directory (device and inode: a data
/// dir reached through a symlink or a bind mount is the same one).
fn same_dir(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The table lists a dot's mounts until its delete is done, and keeps
    /// them when the delete fails: saved before the delete, a server killed
    /// in between came back with the dot and without its mounts.
    #[test]
    fn a_dot_delete_saves_the_table_once_the_dot_is_gone() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 || !Path::new("/dev/fuse").exists() {
            eprintln!("skipping: needs root and /dev/fuse");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("store")).unwrap();
        let dot = DotName::new("gone").unwrap();
        store.create_dot(&dot, None).unwrap();
        let state = dir.path().join("mounts.json");
        let m = MountManager::new(store.clone(), &dir.path().join("mnt"), &state);
        let user = dir.path().join("user");
        m.mount("gone", Some(user.clone())).unwrap();
        let path = m.mount("gone", None).unwrap().path;
        let saved = || {
            let mut p = saved_paths(&state);
            p.sort();
            p
        };
        let both = saved();
        assert_eq!(both.len(), 2, "{both:?}");
        let failed = m.unmount_dot_then(&dot, || -> ApiResult<()> {
            assert_eq!(saved(), both, "saved before the delete");
            Err(ApiError::internal("the delete failed".to_string()))
        });
        assert!(failed.is_err());
        assert_eq!(saved(), both, "a failed delete forgot the mounts");
        assert_eq!(m.unrestored_of(&dot).len(), 2);
        assert!(!dm_fs::fuse_mount_points().unwrap().contains(&user));
        m.unmount_dot_then(&dot, || Ok(store.delete_dot(&dot)?))
            .unwrap();
        assert!(saved().is_empty());
        assert!(m.unrestored_of(&dot).is_empty());
        assert!(!Path::new(&path).exists());
    }
}
