//! Users, API keys (stored as argon2 hashes) and collaborators of a hub,
//! kept in the store's settings. A user owns the namespace of their name;
//! `admin` may do anything; collaborators of a dot may read and write it.

use crate::error::{Error, Result};
use crate::proto::ErrorCode;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use dm_store::{DotName, Store};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The administrator's user name.
pub const ADMIN: &str = "admin";

/// A user record (setting `user/NAME`).
#[derive(Clone, Debug, Serialize, Deserialize)]
struct UserRec {
    /// PHC string of the argon2id hash of the API key.
    key_hash: String,
    admin: bool,
}

/// An authenticated user.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct User {
    /// User name.
    pub name: String,
    /// Administrator: may read and write every dot.
    pub admin: bool,
}

fn user_key(name: &str) -> String {
    format!("user/{name}")
}

fn collab_key(dot: &DotName, user: &str) -> String {
    format!("collab/{}/{}/{user}", dot.namespace, dot.name)
}

fn new_key() -> String {
    let mut b = [0u8; 24];
    rand::rngs::OsRng.fill_bytes(&mut b);
    hex::encode(b)
}

fn hash_key(key: &str) -> Result<String> {
    let mut salt = [0u8; 16];
    rand::rngs::OsRng.fill_bytes(&mut salt);
    let salt = SaltString::encode_b64(&salt).map_err(|e| Error::Refused(format!("salt: {e}")))?;
    Argon2::default()
        .hash_password(key.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| Error::Refused(format!("hashing the key: {e}")))
}

fn put_user(store: &Store, name: &str, key: &str, admin: bool) -> Result<()> {
    let rec = UserRec {
        key_hash: hash_key(key)?,
        admin,
    };
    let bytes = postcard::to_stdvec(&rec).map_err(|e| Error::Refused(e.to_string()))?;
    store.set_setting(&user_key(name), &bytes)?;
    Ok(())
}

/// The file the admin key is written to: `DATA_DIR/admin-key`.
pub fn admin_key_path(data_dir: &Path) -> PathBuf {
    data_dir.join("admin-key")
}

/// Creates the `admin` user on first start, writing its key to
/// [`admin_key_path`] (mode 0600). Returns the key when it was created.
pub fn ensure_admin(store: &Store, data_dir: &Path) -> Result<Option<String>> {
    if store.setting(&user_key(ADMIN))?.is_some() {
        return Ok(None);
    }
    let key = new_key();
    crate::tls::write_private(&admin_key_path(data_dir), format!("{key}\n").as_bytes())?;
    put_user(store, ADMIN, &key, true)?;
    Ok(Some(key))
}

/// Adds user `name` (owner of namespace `name`) and returns their new API
/// key. Refused for an existing user: a second `add` by mistake would lock
/// them out everywhere (see [`new_key_for`]).
pub fn add_user(store: &Store, name: &str) -> Result<String> {
    set_key(store, name, false)
}

/// Gives existing user `name` a new API key and returns it; the old one
/// stops working.
pub fn new_key_for(store: &Store, name: &str) -> Result<String> {
    set_key(store, name, true)
}

fn set_key(store: &Store, name: &str, existing: bool) -> Result<String> {
    if existing {
        dm_store::names::validate("user", name)?;
    } else {
        // A user's name is a namespace: `-x/app` would read as an option.
        dm_store::names::validate_new("user", name)?;
    }
    if name == ADMIN {
        return Err(Error::Refused(
            "the admin user's key is made at the first start (see DATA_DIR/admin-key)".into(),
        ));
    }
    match (store.setting(&user_key(name))?.is_some(), existing) {
        (true, false) => {
            return Err(Error::Refused(format!(
                "user {name} exists; `dm user add {name} --new-key` gives them a new API key (the one they use now stops working)"
            )))
        }
        (false, true) => {
            return Err(Error::Refused(format!(
                "no user {name} on this server; add it with `dm user add {name}`"
            )))
        }
        _ => {}
    }
    let key = new_key();
    put_user(store, name, &key, false)?;
    Ok(key)
}

/// Removes user `name`: their API key stops working and their grants
/// as a collaborator go. The dots of their namespace stay (the admin
/// reaches them; `dm dot delete` deletes them), and a user added again
/// under the name owns them again. Grants are checked at each request,
/// so a transfer of theirs under way into a shared dot fails at its next
/// one. Returns how many grants went.
pub fn remove_user(store: &Store, name: &str) -> Result<usize> {
    dm_store::names::validate("user", name)?;
    if name == ADMIN {
        return Err(Error::Refused(
            "the admin user cannot be removed (its key is in DATA_DIR/admin-key)".into(),
        ));
    }
    if store.setting(&user_key(name))?.is_none() {
        return Err(Error::Refused(format!(
            "no user {name} on this server (see `dm user list`)"
        )));
    }
    store.delete_setting(&user_key(name))?;
    let suffix = format!("/{name}");
    let mut grants = 0;
    for (k, _) in store.settings_with_prefix("collab/")? {
        // collab/NS/DOT/USER: names have no `/`, so the last part is the user.
        if k.ends_with(&suffix) && k.matches('/').count() == 3 {
            store.delete_setting(&k)?;
            grants += 1;
        }
    }
    Ok(grants)
}

/// The user names of the hub.
pub fn list_users(store: &Store) -> Result<Vec<String>> {
    Ok(store
        .settings_with_prefix("user/")?
        .into_iter()
        .map(|(k, _)| k["user/".len()..].to_string())
        .collect())
}

/// Grants `user` read-write access to `dot`.
pub fn add_collaborator(store: &Store, dot: &DotName, user: &str) -> Result<()> {
    if store.setting(&user_key(user))?.is_none() {
        return Err(Error::Refused(format!(
            "no user {user} on this server; add it with `dm user add {user}`"
        )));
    }
    let id = match store.dot_info(dot) {
        Ok(d) => d.id,
        Err(e) if e.is_not_found() => {
            return Err(Error::Refused(format!(
                "no dot {}/{} on this server: a dot of user {} appears here with their first \
                 `dm push` to it; add collaborators after that",
                dot.namespace, dot.name, dot.namespace
            )))
        }
        Err(e) => return Err(e.into()),
    };
    if user == dot.namespace || user == ADMIN {
        return Err(Error::Refused(format!(
            "{user} may push to and pull from {}/{} already (as {}); collaborators are other users",
            dot.namespace,
            dot.name,
            if user == ADMIN {
                "the hub's admin"
            } else {
                "its owner"
            }
        )));
    }
    store.set_setting(&collab_key(dot, user), &id.to_le_bytes())?;
    Ok(())
}

/// Takes back `user`'s access to `dot` (refused when it had none).
pub fn remove_collaborator(store: &Store, dot: &DotName, user: &str) -> Result<()> {
    if !collaborators(store, dot)?.iter().any(|u| u == user) {
        return Err(Error::Refused(format!(
            "{user} is not a collaborator of {}/{} (see `dm dot collaborator list {}/{}`)",
            dot.namespace, dot.name, dot.namespace, dot.name
        )));
    }
    store.delete_setting(&collab_key(dot, user))?;
    Ok(())
}

/// Whether a grant (the value of a `collab/` setting) is for the dot with
/// id `id`: a grant names the dot it was given for, so that a dot deleted
/// and made again under the same name is not shared with the old one's
/// collaborators. Grants stored before they named one (empty) count.
fn grant_is_for(value: &[u8], id: u64) -> bool {
    match <[u8; 8]>::try_from(value) {
        Ok(b) => u64::from_le_bytes(b) == id,
        Err(_) => value.is_empty(),
    }
}

/// The collaborators of `dot`.
pub fn collaborators(store: &Store, dot: &DotName) -> Result<Vec<String>> {
    let id = store.dot_info(dot)?.id;
    let prefix = format!("collab/{}/{}/", dot.namespace, dot.name);
    Ok(store
        .settings_with_prefix(&prefix)?
        .into_iter()
        .filter(|(_, v)| grant_is_for(v, id))
        .map(|(k, _)| k[prefix.len()..].to_string())
        .collect())
}

/// Checks a user's API key (argon2 verify). Unknown users and wrong keys
/// get the same answer.
pub fn authenticate(store: &Store, name: &str, key: &str) -> Result<User> {
    let bad = || {
        Error::Remote {
        code: ErrorCode::BadKey,
        message: format!(
            "wrong API key for user {name:?}, or no such user on the hub (never added, or removed with `dm user rm`; the hub does not say which): ask the hub's admin for a key (on the hub, `dm user add {name} --new-key` gives an existing user a new one, `dm user add {name}` makes a new user)"
        ),
    }
    };
    let Some(bytes) = store.setting(&user_key(name))? else {
        return Err(bad());
    };
    let rec: UserRec = postcard::from_bytes(&bytes)
        .map_err(|e| Error::Refused(format!("user record of {name} does not decode: {e}")))?;
    let hash = PasswordHash::new(&rec.key_hash).map_err(|_| bad())?;
    Argon2::default()
        .verify_password(key.as_bytes(), &hash)
        .map_err(|_| bad())?;
    Ok(User {
        name: name.to_string(),
        admin: rec.admin,
    })
}

/// True when `user` may read and write `dot` (owner, admin or collaborator).
pub fn may_access(store: &Store, user: &User, dot: &DotName) -> Result<bool> {
    if user.admin || user.name == dot.namespace {
        return Ok(true);
    }
    let Some(grant) = store.setting(&collab_key(dot, &user.name))? else {
        return Ok(false);
    };
    match store.dot_info(dot) {
        Ok(info) => Ok(grant_is_for(&grant, info.id)),
        // No such dot (any more): the grant was for another.
        Err(e) if e.is_not_found() => Ok(false),
        Err(e) => Err(e.into()),
    }
}
