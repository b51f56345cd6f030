//! `dm remote`: the remotes (hubs) known to this client. Client-side state
//! only; push/pull will use them.

use super::Ctx;
use crate::cli::RemoteCommand;
use crate::config::Remote;
use anyhow::{anyhow, bail, Result};

/// Parses `USER@HOST[:PORT]`.
fn parse_target(target: &str) -> Result<Remote> {
    let (user, host) = target.split_once('@').ok_or_else(|| {
        anyhow!("remote {target:?} is not USER@HOST[:PORT] (e.g. alice@dothub.com)")
    })?;
    let port = |p: &str| {
        p.parse::<u16>()
            .map_err(|_| anyhow!("bad port {p:?} in remote {target:?}"))
    };
    let (hostname, port) = if let Some(rest) = host.strip_prefix('[') {
        // An IPv6 address, as in URLs: [::1] or [::1]:PORT.
        let (h, after) = rest.split_once(']').ok_or_else(|| {
            anyhow!(
                "remote {target:?}: an IPv6 address needs its closing ] (e.g. alice@[::1]:32607)"
            )
        })?;
        match after.strip_prefix(':') {
            Some(p) => (h, Some(port(p)?)),
            None if after.is_empty() => (h, None),
            None => bail!("remote {target:?}: expected :PORT after ]"),
        }
    } else if host.parse::<std::net::Ipv6Addr>().is_ok() {
        // A bare IPv6 address: no port (that needs the brackets).
        (host, None)
    } else if host.matches(':').count() > 1 {
        bail!("remote {target:?} is not USER@HOST[:PORT] (an IPv6 address goes in brackets: alice@[::1]:32607)");
    } else {
        match host.rsplit_once(':') {
            Some((h, p)) => (h, Some(port(p)?)),
            None => (host, None),
        }
    };
    if user.is_empty() || hostname.is_empty() {
        bail!("remote {target:?} is not USER@HOST[:PORT] (e.g. alice@dothub.com)");
    }
    dm_store::names::validate("user", user).map_err(|e| anyhow!("{e}"))?;
    Ok(Remote {
        user: user.to_string(),
        hostname: hostname.to_string(),
        port,
    })
}

pub fn run(ctx: &mut Ctx, verbose: bool, command: Option<RemoteCommand>) -> Result<()> {
    match command {
        None => {
            for (name, r) in &ctx.config.remotes {
                let mark = if ctx.config.current_remote.as_deref() == Some(name) {
                    "* "
                } else {
                    "  "
                };
                if verbose {
                    let fp = super::sync::fingerprint_of(ctx, name)
                        .map(|f| format!("\t{f}"))
                        .unwrap_or_default();
                    println!("{mark}{name}\t{}{fp}", r.target());
                } else {
                    println!("{mark}{name}");
                }
            }
            Ok(())
        }
        Some(RemoteCommand::Add { name, target, ca }) => {
            dm_store::names::validate("remote", &name).map_err(|e| anyhow!("{e}"))?;
            let remote = parse_target(&target)?;
            if let Some(old) = ctx.config.remotes.get(&name) {
                if *old != remote {
                    bail!(
                        "remote {name} already exists as {}; `dm remote set-url {name} {target}` changes it \
                         (keeping the upstreams recorded on it), or add it under another name",
                        old.target()
                    );
                }
                // The same remote again: a new key (and the hub's
                // fingerprint checked again); its upstreams stay.
                super::sync::remote_added(ctx, &name, ca.as_deref())?;
                println!("Remote {name}: new key saved (upstreams kept)");
                return Ok(());
            }
            ctx.config.remotes.insert(name.clone(), remote.clone());
            // API key and the hub's pinned fingerprint (fails: nothing saved).
            super::sync::remote_added(ctx, &name, ca.as_deref())?;
            ctx.update_config(|c| {
                c.remotes.insert(name.clone(), remote);
                if c.current_remote.is_none() {
                    c.current_remote = Some(name);
                }
            })
        }
        Some(RemoteCommand::SetUrl { name, target, ca }) => {
            let Some(old) = ctx.config.remotes.get(&name).cloned() else {
                bail!("no remote named {name} (see `dm remote -v`, add it with `dm remote add {name} {target}`)");
            };
            let new = parse_target(&target)?;
            super::sync::remote_moved(ctx, &name, &old, &new, ca.as_deref())?;
            println!("Remote {name} is now {} (upstreams kept)", new.target());
            ctx.update_config(|c| {
                c.remotes.insert(name, new);
            })
        }
        Some(RemoteCommand::Rm { name }) => {
            if !ctx.config.remotes.contains_key(&name) {
                bail!("no remote named {name} (see `dm remote -v`)");
            }
            super::sync::remote_removed(ctx, &name)?;
            ctx.update_config(|c| {
                c.remotes.remove(&name);
                if c.current_remote.as_deref() == Some(&name) {
                    c.current_remote = None;
                }
            })
        }
        Some(RemoteCommand::Switch { name }) => {
            if !ctx.config.remotes.contains_key(&name) {
                bail!("no remote named {name} (see `dm remote -v`, add it with `dm remote add {name} USER@HOST`)");
            }
            ctx.update_config(|c| c.current_remote = Some(name))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets() {
        let r = parse_target("alice@dothub.com").unwrap();
        assert_eq!(
            (r.user.as_str(), r.hostname.as_str(), r.port),
            ("alice", "dothub.com", None)
        );
        let r = parse_target("bob@10.0.0.1:6969").unwrap();
        assert_eq!(r.port, Some(6969));
        assert!(parse_target("dothub.com").is_err());
        assert!(parse_target("a@h:x").is_err());
        assert!(parse_target("@h").is_err());
        // IPv6, bracketed as in URLs (with a port) or bare (without).
        for (t, host, port) in [
            ("c@[::1]:41003", "::1", Some(41003)),
            ("c@[fe80::2]", "fe80::2", None),
            ("c@::1", "::1", None),
        ] {
            let r = parse_target(t).unwrap();
            assert_eq!((r.hostname.as_str(), r.port), (host, port), "{t}");
        }
        assert_eq!(
            parse_target("c@[::1]:41003").unwrap().target(),
            "c@[::1]:41003"
        );
        assert!(parse_target("c@[::1").is_err());
        assert!(parse_target("c@[::1]x").is_err());
        assert!(parse_target("c@host:1:5").is_err());
    }
}
