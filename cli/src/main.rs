//! `dm`: the command line of dm (git for data) and its daemon, `dm server`.

mod api;
mod cli;
mod client;
mod commands;
mod config;
mod format;
mod mounts;
mod paths;
mod server;

use clap::Parser;

fn main() {
    let cli = cli::Cli::parse();
    if !matches!(
        cli.command,
        cli::Command::Server { .. } | cli::Command::PluginProxy { .. }
    ) {
        // Let `dm log | head` end quietly instead of panicking on EPIPE.
        // SAFETY: resetting a signal disposition at startup, single-threaded.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    if let Err(e) = commands::run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
