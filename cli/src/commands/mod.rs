//! The client commands: each turns arguments into API calls and prints the
//! answer.

mod admin;
mod dots;
mod history;
mod mounts;
mod remotes;
pub mod sync;

use crate::api::{self, DotDetail, DotSummary};
use crate::cli::{Cli, Command, DotCommand};
use crate::client::Client;
use crate::config::Config;
use anyhow::{anyhow, bail, Result};
use dm_store::DotName;
use std::path::PathBuf;

/// Says a note on stderr when a request is still waiting after 2 s;
/// dropped when it ends. A checkout or reset stops the containers using
/// the dot and waits for Docker's stop timeout (10 s by default for one
/// that ignores SIGTERM) with nothing shown: it looked hung.
pub(crate) struct SlowNote(Option<(std::sync::mpsc::Sender<()>, std::thread::JoinHandle<()>)>);

impl SlowNote {
    pub(crate) fn after_2s(note: String) -> SlowNote {
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let t = std::thread::spawn(move || {
            if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                rx.recv_timeout(std::time::Duration::from_secs(2))
            {
                eprintln!("{note}");
            }
        });
        SlowNote(Some((tx, t)))
    }

    /// For a switch of `dot` that stops `containers` (none: no note). An
    /// interruption of the client meanwhile (Ctrl-C, SIGTERM, SIGHUP) says
    /// that the switch goes on in the server: it ended the client without
    /// a word, and the dot changed branch a few seconds later.
    pub(crate) fn for_containers(dot: &DotName, containers: &[String]) -> SlowNote {
        if containers.is_empty() {
            return SlowNote(None);
        }
        say_when_interrupted();
        SlowNote::after_2s(format!(
            "waiting for the containers using {dot} to stop ({}): Docker gives each its stop \
             timeout (10 s unless `docker run --stop-timeout`) to exit on its stop signal (SIGTERM unless the image sets another)...",
            containers
                .iter()
                .map(|c| c.trim_start_matches('/'))
                .collect::<Vec<_>>()
                .join(", ")
        ))
    }
}

/// From now on SIGINT, SIGTERM and SIGHUP end the client saying that the
/// server goes on with the switch it asked for (see
/// [`SlowNote::for_containers`]).
fn say_when_interrupted() {
    extern "C" fn say(_: libc::c_int) {
        const NOTE: &[u8] = b"\ndm: interrupted; the server goes on with the switch (it waits for \
            the containers to stop, then starts them on the new state): `dm branch` and \
            `dm log` tell when it is done\n";
        // SAFETY: write(2) and _exit(2) are async-signal-safe; NOTE is a
        // static buffer of NOTE.len() bytes.
        unsafe {
            libc::write(2, NOTE.as_ptr().cast(), NOTE.len());
            libc::_exit(130);
        }
    }
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: the struct is zeroed, then filled as sigaction(2)
        // describes; the handler only makes async-signal-safe calls.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = say as *const () as libc::sighandler_t;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
}

impl Drop for SlowNote {
    fn drop(&mut self) {
        if let Some((tx, t)) = self.0.take() {
            drop(tx);
            let _ = t.join();
        }
    }
}

/// What every command needs: the config and a way to reach the server.
pub struct Ctx {
    /// Where the config lives.
    pub config_path: PathBuf,
    /// The loaded config.
    pub config: Config,
    socket: PathBuf,
    client: Option<Client>,
    /// `--dot`: overrides the current dot.
    on_dot: Option<String>,
}

impl Ctx {
    /// The API client (connected lazily).
    pub fn client(&mut self) -> Result<&Client> {
        if self.client.is_none() {
            self.client = Some(Client::new(&self.socket)?);
        }
        Ok(self.client.as_ref().expect("just set"))
    }

    /// The dot a command works on: `given`, else the current dot.
    pub fn dot(&self, given: Option<&str>) -> Result<DotName> {
        let name = match given.or(self.on_dot.as_deref()) {
            Some(d) => d.to_string(),
            None => self.config.current_dot.clone().ok_or_else(|| {
                anyhow!("no current dot: choose one with `dm switch DOT` (see `dm list`), or create one with `dm init DOT` and then `dm switch DOT`")
            })?,
        };
        if let Some((dot, branch)) = name.split_once('@') {
            anyhow::bail!(
                "{name:?}: commands take a dot here, not a dot@branch (that names a mount or a Docker volume); \
                 to work on branch {branch}, `dm switch {dot}` then `dm checkout {branch}`"
            );
        }
        DotName::parse(&name).map_err(|e| anyhow!("{e}"))
    }

    /// The details of a dot, with an error that says what to do when it is missing.
    pub fn dot_detail(&mut self, dot: &DotName) -> Result<DotDetail> {
        self.dot_detail_of(dot, None)
    }

    /// [`Ctx::dot_detail`] with the current branch's details only (the
    /// summary still names every branch).
    pub fn dot_brief(&mut self, dot: &DotName) -> Result<DotDetail> {
        self.dot_detail_of(dot, Some(""))
    }

    /// [`Ctx::dot_detail`] with the details of the current branch and of
    /// `branch` only (`summary.branches` still names them all): what a
    /// command about one branch needs, at a cost that does not grow with
    /// the number of branches.
    pub fn dot_detail_of(&mut self, dot: &DotName, branch: Option<&str>) -> Result<DotDetail> {
        let current = self.config.current_dot.clone();
        let mut path = api::dot_path(&dot.namespace, &dot.name);
        if let Some(b) = branch {
            path.push_str(&format!("?branch={}", api::encode(b)));
        }
        let client = self.client()?;
        client.get(&path).map_err(|e| {
            let msg = e.to_string();
            if !msg.contains("not found") {
                return e;
            }
            // The same name in another namespace (`dm switch d` for ns1/d).
            let elsewhere: Vec<String> = client
                .get::<Vec<DotSummary>>("/v1/dots")
                .unwrap_or_default()
                .into_iter()
                .filter(|d| d.name == dot.name && d.namespace != dot.namespace)
                .map(|d| d.full_name)
                .collect();
            let hint = match elsewhere.as_slice() {
                [] => String::new(),
                names => format!(
                    "; in another namespace: {} (a namespace is part of the name)",
                    names.join(", ")
                ),
            };
            if current.as_deref() == Some(&dot.to_string()) {
                anyhow!("{msg}: the current dot {dot} does not exist any more; choose another with `dm switch DOT` (see `dm list`){hint}")
            } else {
                anyhow!("{msg} (see `dm list`, or create it with `dm init {dot}`){hint}")
            }
        })
    }

    /// Changes the config file with `f` (under its lock, on what the file
    /// holds now: another dm command may have changed it since this one
    /// read it) and keeps the result.
    pub fn update_config(&mut self, f: impl FnOnce(&mut Config)) -> Result<()> {
        self.config = Config::update(&self.config_path, f)?;
        Ok(())
    }
}

/// Runs one parsed command line.
pub fn run(cli: Cli) -> Result<()> {
    let socket = cli
        .server
        .clone()
        .unwrap_or_else(crate::paths::default_socket);
    if let Command::Server {
        data_dir,
        mount_dir,
        socket: server_socket,
        plugin_socket,
        no_plugin,
        docker_socket,
        listen,
        auto_gc,
    } = cli.command
    {
        return crate::server::run(crate::server::ServerOptions {
            data_dir: data_dir.unwrap_or_else(crate::paths::default_data_dir),
            mount_dir: mount_dir.unwrap_or_else(crate::paths::default_mount_dir),
            socket: server_socket.unwrap_or(socket),
            plugin_socket: if no_plugin {
                None
            } else {
                plugin_socket.or_else(crate::paths::default_plugin_socket)
            },
            docker_socket,
            listen: sync::parse_listen(&listen)?,
            auto_gc: auto_gc.0,
        });
    }
    if let Command::PluginProxy { listen, upstream } = &cli.command {
        return crate::server::plugin_proxy::run(listen, upstream);
    }
    if let Command::Completions { shell } = cli.command {
        return admin::completions(shell);
    }
    let config_path = cli.config.clone().unwrap_or_else(Config::default_path);
    let config = Config::load(&config_path)?;
    let mut ctx = Ctx {
        config_path,
        config,
        socket,
        client: None,
        on_dot: cli.on_dot,
    };
    match cli.command {
        Command::Server { .. } | Command::Completions { .. } | Command::PluginProxy { .. } => {
            unreachable!("handled above")
        }
        Command::Push(a) if a.delete => sync::delete_remote_branch(&mut ctx, a.common),
        Command::Push(a) => sync::transfer(&mut ctx, true, a.common.into()),
        Command::Pull(a) => sync::transfer(&mut ctx, false, a.into()),
        Command::Clone(a) => sync::clone_cmd(&mut ctx, a),
        Command::User { command } => sync::user_cmd(&mut ctx, command),
        Command::Init { dot, block_size } => dots::init(&mut ctx, &dot, block_size),
        Command::List { scripting } => dots::list(&mut ctx, scripting),
        Command::Switch { dot } => dots::switch(&mut ctx, &dot),
        Command::Dot { command } => match command {
            DotCommand::Show { scripting, dot } => dots::show(&mut ctx, dot.as_deref(), scripting),
            DotCommand::Delete { force, dot } => dots::delete(&mut ctx, &dot, force),
            DotCommand::SetUpstream { args } => sync::set_upstream_cmd(&mut ctx, &args),
            DotCommand::Collaborator { command } => sync::collaborator_cmd(&mut ctx, command),
        },
        Command::Commit {
            message,
            metadata,
            branch,
            author,
        } => {
            // Empty -m paragraphs are dropped, as git drops them.
            let paragraphs: Vec<&str> = message
                .iter()
                .map(|m| m.trim_end())
                .filter(|m| !m.trim().is_empty())
                .collect();
            history::commit(
                &mut ctx,
                &paragraphs.join("\n\n"),
                &metadata,
                branch.as_deref(),
                author.as_deref(),
            )
        }
        Command::Log {
            branch,
            max_count,
            oneline,
        } => history::log(&mut ctx, branch.as_deref(), max_count, oneline),
        Command::Branch {
            delete,
            force_delete,
            force,
            name,
            start,
        } => match name {
            // clap requires NAME with -d and -D.
            Some(name) if delete || force_delete => {
                history::delete_branch(&mut ctx, &name, force || force_delete)
            }
            Some(name) => history::create_branch(&mut ctx, &name, start.as_deref()),
            None => history::list_branches(&mut ctx),
        },
        Command::Checkout {
            create,
            branch,
            start,
        } => history::checkout(&mut ctx, &branch, create, start.as_deref()),
        Command::Reset {
            soft, mixed, rev, ..
        } if soft || mixed => bail!(
            "dm has no --{} reset: a branch's files are its head's plus its uncommitted \
             changes, so `dm reset {rev}` moves the branch and its files there when \
             that loses nothing (else it is refused, saying what would be lost), and `dm reset --hard {rev}` also discards \
             the uncommitted changes",
            if soft { "soft" } else { "mixed" }
        ),
        Command::Reset { hard, rev, .. } => history::reset(&mut ctx, &rev, hard),
        Command::Diff { from, to } => history::diff(&mut ctx, from.as_deref(), to.as_deref()),
        Command::Status => history::status(&mut ctx),
        Command::Remote { verbose, command } => remotes::run(&mut ctx, verbose, command),
        Command::Mount { volume, path } => mounts::mount(&mut ctx, &volume, path),
        Command::Unmount { path, force } => mounts::unmount(&mut ctx, &path, force),
        Command::Gc => admin::gc(&mut ctx),
        Command::Fsck => admin::fsck(&mut ctx),
        Command::Version => admin::version(&mut ctx),
    }
}
