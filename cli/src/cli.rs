//! The command line grammar (clap derive).

use clap::{Parser, Subcommand};
use std::path::PathBuf;

/// dm: git for data. Datadots with commits, branches and subdots, mounted
/// through FUSE.
#[derive(Parser, Debug)]
#[command(name = "dm", version, about, propagate_version = true)]
pub struct Cli {
    /// Client config file (current dot, remotes).
    #[arg(long, global = true, env = "DM_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// The server's API socket.
    #[arg(long, global = true, env = "DM_SOCKET", value_name = "SOCKET")]
    pub server: Option<PathBuf>,
    /// Work on this dot instead of the current one (`dm switch`).
    #[arg(
        long = "dot",
        id = "on_dot",
        global = true,
        env = "DM_DOT",
        value_name = "DOT"
    )]
    pub on_dot: Option<String>,
    /// The command.
    #[command(subcommand)]
    pub command: Command,
}

/// Every `dm` command.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the daemon: the store, the mounts and the local API.
    Server {
        /// RocksDB and server state [default: /var/lib/dm as root, else
        /// $XDG_DATA_HOME/dm or ~/.local/share/dm]
        #[arg(long, value_name = "DIR")]
        data_dir: Option<PathBuf>,
        /// Where volumes are mounted [default: /run/dm/mnt as root, else
        /// $XDG_RUNTIME_DIR/dm/mnt or /tmp/dm-UID/mnt]
        #[arg(long, value_name = "DIR")]
        mount_dir: Option<PathBuf>,
        /// The local API socket [default: /run/dm/dm.sock as root, else
        /// $XDG_RUNTIME_DIR/dm/dm.sock or /tmp/dm-UID/dm.sock]
        #[arg(long, value_name = "PATH")]
        socket: Option<PathBuf>,
        /// Docker volume plugin socket [default: /run/docker/plugins/dm.sock as root, none otherwise]
        #[arg(long, value_name = "PATH")]
        plugin_socket: Option<PathBuf>,
        /// Do not serve the Docker volume plugin.
        #[arg(long, conflicts_with = "plugin_socket")]
        no_plugin: bool,
        /// The Docker daemon's API socket (containers using dots).
        #[arg(
            long,
            value_name = "PATH",
            env = "DM_DOCKER_SOCKET",
            default_value = "/var/run/docker.sock"
        )]
        docker_socket: PathBuf,
        /// UDP port (or ADDR:PORT) of the hub endpoint for push/pull; `off` disables it.
        #[arg(long, value_name = "PORT", env = "DM_LISTEN", default_value = "32607")]
        listen: String,
        /// Run `dm gc` by itself once the store grew by a quarter and at
        /// least SIZE since the last one (data written over leaves dead
        /// chunks), after a dot or branch is deleted, and every minute
        /// while the disk is full; `off`: only when asked.
        #[arg(long, value_name = "SIZE", env = "DM_AUTO_GC", default_value = "512M", value_parser = parse_auto_gc)]
        auto_gc: AutoGc,
    },
    /// (internal) Hold Docker's plugin socket and forward to a dm server.
    #[command(hide = true)]
    PluginProxy {
        /// Docker's plugin socket.
        #[arg(long, value_name = "PATH")]
        listen: PathBuf,
        /// The dm server's internal plugin socket.
        #[arg(long, value_name = "PATH")]
        upstream: PathBuf,
    },
    /// Send the commits a remote lacks: `dm push REMOTE [DOT [BRANCH]]`.
    Push(crate::commands::sync::PushArgs),
    /// Fetch new commits from a remote: `dm pull REMOTE [DOT [BRANCH]]`.
    Pull(crate::commands::sync::PushPullArgs),
    /// First download of a dot: `dm clone REMOTE [NS/]DOT [BRANCH]`.
    Clone(crate::commands::sync::CloneArgs),
    /// Users of this server's hub (admin, over the local socket).
    User {
        /// The user command.
        #[command(subcommand)]
        command: crate::commands::sync::UserCommand,
    },
    /// Create an empty dot.
    Init {
        /// `[namespace/]dot`
        dot: String,
        /// Block size of the dot's files, fixed at creation: a power of two
        /// from 4K to 4M (e.g. 16K, 65536). Default 64K.
        #[arg(long, value_name = "SIZE", value_parser = parse_block_size)]
        block_size: Option<u32>,
    },
    /// List the dots.
    #[command(visible_alias = "ls")]
    List {
        /// Scripting output: tab-separated, raw byte counts, no header.
        #[arg(short = 'H')]
        scripting: bool,
    },
    /// Make DOT the current dot.
    Switch {
        /// The dot.
        dot: String,
    },
    /// Snapshot the whole current dot (all subdots) on its current branch.
    Commit {
        /// Commit message; several -m are joined as paragraphs (as git).
        #[arg(short, long, required = true, allow_hyphen_values = true)]
        message: Vec<String>,
        /// Metadata `key=value` (keys start lowercase); repeatable.
        #[arg(short = 'd', long = "metadata", value_name = "KEY=VALUE")]
        metadata: Vec<String>,
        /// Commit this branch of the dot instead of the current one (what a
        /// pinned `dot@BRANCH` mount or container wrote).
        #[arg(long, value_name = "BRANCH")]
        branch: Option<String>,
        /// The commit's author, as `dm log` shows it [default: `admin` for
        /// root, else the user name], as git's `--author`; a team sharing
        /// a hub sets it (or DM_AUTHOR) to tell its commits apart.
        #[arg(long, env = "DM_AUTHOR", value_name = "NAME", hide_env_values = true)]
        author: Option<String>,
    },
    /// Show the commits of the current branch (or BRANCH), oldest first.
    Log {
        /// A branch of the current dot [default: the current branch], or a
        /// revision (`HEAD~2`, `feature^`, a commit id): the commits up to
        /// it.
        #[arg(value_name = "BRANCH|REV")]
        branch: Option<String>,
        /// Only the N latest commits.
        #[arg(short = 'n', long = "max-count", value_name = "N")]
        max_count: Option<usize>,
        /// One line per commit: the id's first 12 digits and the message's
        /// first line.
        #[arg(long)]
        oneline: bool,
    },
    /// List branches; `dm branch NAME` makes branch NAME at the current
    /// head (staying on the current branch, as git); -d deletes one.
    Branch {
        /// Delete branch NAME (`dm branch -d NAME`, flags in any order, as in
        /// git); refused when it has commits no other branch has, or
        /// uncommitted changes.
        #[arg(short = 'd', long = "delete", requires = "name", group = "deleting")]
        delete: bool,
        /// Delete even if it has commits no other branch has, uncommitted
        /// changes, other branches grew from it, or it is mounted (`-d -f`).
        #[arg(short = 'D', requires = "name", group = "deleting")]
        force_delete: bool,
        /// With -d: as -D.
        #[arg(short, long, requires = "delete")]
        force: bool,
        /// The branch to make, or with -d/-D to delete.
        #[arg(value_name = "NAME")]
        name: Option<String>,
        /// Where the new branch starts: a commit or revision [default: HEAD].
        #[arg(value_name = "START", requires = "name", conflicts_with = "deleting")]
        start: Option<String>,
    },
    /// Switch the current dot to BRANCH (moving unpinned mounts with it).
    ///
    /// Uncommitted changes stay on the branch they were made on.
    Checkout {
        /// Create the branch first, at START or the current head.
        #[arg(short = 'b')]
        create: bool,
        /// The branch; `-` is the branch checked out before this one.
        branch: String,
        /// With -b: where the new branch starts, a commit or revision (e.g. an
        /// id from `dm log`, or another branch) [default: HEAD].
        #[arg(value_name = "START", requires = "create")]
        start: Option<String>,
    },
    /// Move the current branch to REF (back, or forward along a branch grown
    /// from it); its files become REF's (dm has no mixed reset).
    Reset {
        /// Destroy uncommitted changes and later commits no other branch has
        /// (without it the reset is refused when it would destroy any).
        #[arg(long)]
        hard: bool,
        /// git's; refused with what dm does instead.
        #[arg(long, hide = true, conflicts_with = "hard")]
        soft: bool,
        /// git's; refused with what dm does instead.
        #[arg(long, hide = true, conflicts_with = "hard")]
        mixed: bool,
        /// HEAD, HEAD^, HEAD^^, HEAD~N, a branch, a commit id or unique prefix.
        #[arg(value_name = "REF", default_value = "HEAD")]
        rev: String,
    },
    /// Paths changed between two commits, or between a commit and the working state.
    Diff {
        /// From this commit [default: HEAD].
        from: Option<String>,
        /// To this commit [default: the working state].
        to: Option<String>,
    },
    /// Uncommitted changes of the current branch.
    Status,
    /// Dot management.
    Dot {
        /// The dot command.
        #[command(subcommand)]
        command: DotCommand,
    },
    /// Remotes (hubs) to push to and pull from: list, add, set-url, rm, switch.
    Remote {
        /// Show the user and host of each remote.
        #[arg(short, long)]
        verbose: bool,
        /// The remote command (none = list).
        #[command(subcommand)]
        command: Option<RemoteCommand>,
    },
    /// Mount DOT[@BRANCH][.SUBDOT] at PATH (printed; default under the server's mount dir).
    Mount {
        /// `[namespace/]dot[@branch][.subdot]`
        volume: String,
        /// Host path.
        path: Option<PathBuf>,
    },
    /// Unmount a dm mount.
    #[command(alias = "umount")]
    Unmount {
        /// The mount path.
        path: PathBuf,
        /// Unmount even while processes have files open there (it is
        /// detached at once; they keep those files until they close them).
        #[arg(short, long)]
        force: bool,
    },
    /// Reclaim space no commit or branch uses.
    Gc,
    /// Verify the store.
    Fsck,
    /// Client and server versions.
    Version,
    /// Print shell completions.
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
}

/// `dm dot ...`.
#[derive(Subcommand, Debug)]
pub enum DotCommand {
    /// Details of a dot (the current one by default).
    Show {
        /// Scripting output: `key<TAB>value` lines, raw numbers; a path or
        /// message holding a tab or newline is double-quoted, C-escaped.
        #[arg(short = 'H')]
        scripting: bool,
        /// The dot.
        dot: Option<String>,
    },
    /// Default upstream for push/pull: `dm dot set-upstream [DOT] REMOTE REMOTE_DOT`.
    #[command(override_usage = "dm dot set-upstream [OPTIONS] [DOT] <REMOTE> <REMOTE_DOT>")]
    SetUpstream {
        /// `[DOT] REMOTE REMOTE_DOT` (DOT: the current dot when left out).
        #[arg(num_args = 2..=3, required = true, value_name = "ARG")]
        args: Vec<String>,
    },
    /// Collaborators of a dot on this server's hub.
    Collaborator {
        /// The collaborator command.
        #[command(subcommand)]
        command: crate::commands::sync::CollaboratorCommand,
    },
    /// Delete a dot, its branches and commits.
    Delete {
        /// Do not ask for confirmation.
        #[arg(short, long)]
        force: bool,
        /// The dot.
        dot: String,
    },
}

/// `dm remote ...` (client-side state in the config file).
#[derive(Subcommand, Debug)]
pub enum RemoteCommand {
    /// Add a remote `USER@HOST[:PORT]`: checks the API key (`dm user add`
    /// on the hub printed it), read from DM_API_KEY, stdin or a prompt, and
    /// pins the hub's certificate.
    Add {
        /// Local name of the remote.
        name: String,
        /// `USER@HOST[:PORT]`.
        target: String,
        /// Trust hub certificates issued by this CA (PEM) instead of pinning
        /// the hub's self-signed certificate.
        #[arg(long, value_name = "FILE")]
        ca: Option<PathBuf>,
    },
    /// Change a remote's `USER@HOST[:PORT]` (a hub that moved, or a new
    /// hub certificate to pin), keeping its key (for the same user; a new
    /// one from DM_API_KEY when set) and its upstreams.
    SetUrl {
        /// The remote.
        name: String,
        /// The new `USER@HOST[:PORT]`.
        target: String,
        /// Trust hub certificates issued by this CA (PEM) [default: the CA
        /// the remote trusted, else pin the hub's certificate].
        #[arg(long, value_name = "FILE")]
        ca: Option<PathBuf>,
    },
    /// Forget a remote.
    #[command(alias = "remove")]
    Rm {
        /// The remote.
        name: String,
    },
    /// Make NAME the current remote.
    Switch {
        /// The remote.
        name: String,
    },
}

/// Parses a size (`what`, for errors): bytes, or a number with
/// K/KiB/M/MiB/G/GiB.
fn parse_size(s: &str, what: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, mult) = match t.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => {
            if t[i..].starts_with('.') {
                return Err(format!(
                    "{what} {s:?}: whole numbers only (1536M, not 1.5G)"
                ));
            }
            let unit = t[i..].to_ascii_lowercase();
            let m = match unit.as_str() {
                "k" | "kb" | "kib" => 1 << 10,
                "m" | "mb" | "mib" => 1 << 20,
                "g" | "gb" | "gib" => 1 << 30,
                _ => {
                    return Err(format!(
                        "unknown unit {:?} in {what} {s:?}: use K, M or G",
                        &t[i..]
                    ))
                }
            };
            (&t[..i], m)
        }
        None => (t, 1),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{what} {s:?} is not a number"))?;
    n.checked_mul(mult)
        .ok_or_else(|| format!("{what} {s:?} is too large"))
}

/// Parses a block size: bytes, or a number with K/KiB/M/MiB.
pub fn parse_block_size(s: &str) -> Result<u32, String> {
    parse_size(s, "block size")?
        .try_into()
        .ok()
        .filter(|b: &u32| b.is_power_of_two() && (4096..=4 << 20).contains(b))
        .ok_or_else(|| format!("block size {s:?} must be a power of two from 4K to 4M"))
}

/// When `dm server` runs GC by itself: once the store grew by this many
/// bytes (and a quarter), or never.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AutoGc(pub Option<u64>);

/// Parses `--auto-gc`: a size, or `off`.
pub fn parse_auto_gc(s: &str) -> Result<AutoGc, String> {
    if s.trim().eq_ignore_ascii_case("off") {
        return Ok(AutoGc(None));
    }
    parse_size(s, "--auto-gc size").map(|n| AutoGc(Some(n)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_units_and_say_what_is_wrong() {
        assert_eq!(parse_block_size("8K"), Ok(8192));
        assert_eq!(parse_block_size("65536"), Ok(65536));
        assert!(parse_block_size("3K").unwrap_err().contains("power of two"));
        assert!(parse_block_size("1G").unwrap_err().contains("power of two"));
        assert!(parse_block_size("8Q").unwrap_err().contains("unknown unit"));
        assert_eq!(parse_auto_gc("512M"), Ok(AutoGc(Some(512 << 20))));
        assert_eq!(parse_auto_gc("2GiB"), Ok(AutoGc(Some(2 << 30))));
        assert_eq!(parse_auto_gc("off"), Ok(AutoGc(None)));
        assert!(parse_auto_gc("lots").unwrap_err().contains("unknown unit"));
        assert!(parse_auto_gc("M").unwrap_err().contains("not a number"));
        assert!(parse_auto_gc("1.5G").unwrap_err().contains("whole numbers"));
        assert!(parse_auto_gc("99999999999G")
            .unwrap_err()
            .contains("too large"));
    }
}
