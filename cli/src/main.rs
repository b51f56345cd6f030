//! `dm`: the command line of dm (git for data) and its daemon, `dm server`.

mod alloc;
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

/// jemalloc instead of glibc's malloc: under PostgreSQL on a dot the
/// server's resident set grew about 50 MiB a minute with glibc, the caches'
/// bounds notwithstanding (freed memory kept in its arenas), and 4-35 MiB
/// a minute with jemalloc, less as the caches fill to their bounds
/// (`WORKLOAD=pgbench bash bench/mem/rss.sh`, bench/results/2026-12-04).
/// Zeroed blocks are zeroed without `madvise` (see [`alloc`]).
///
/// jemalloc also serves RocksDB's C++ (`unprefixed_malloc_on_supported_platforms`:
/// it defines `malloc` and `free` for the whole process) and gives freed
/// memory back from a thread of its own (`background_threads`): with
/// RocksDB on glibc's arenas, rounds of 100,000 small files created,
/// committed and deleted took the server from 186 to 393 MiB in 11 rounds,
/// still climbing; with one allocator it stayed at 250-290 MiB over 16
/// (`WORKLOAD=smallfiles`, bench/results/2026-12-06).
#[global_allocator]
static ALLOCATOR: alloc::Allocator = alloc::Allocator;

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
        // Descriptors inherited from the caller (a shell's `exec 7<FILE`)
        // are of no use to a client, and one on a dot's mount made the
        // client name itself among the processes that hold files open
        // there ("dm (pid N) has ... open"). Nothing is open yet but the
        // standard streams; a kernel without close_range keeps them.
        // SAFETY: a plain syscall on descriptors this process does not use.
        unsafe {
            libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32);
        }
    }
    if let Err(e) = commands::run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
