//! Users and keys on a store.
#[test]
fn add_and_authenticate() {
    let d = tempfile::tempdir().unwrap();
    let s = dm_store::Store::open(d.path()).unwrap();
    let k = dm_sync::users::add_user(&s, "alice").unwrap();
    dm_sync::users::authenticate(&s, "alice", &k).unwrap();
    assert!(dm_sync::users::authenticate(&s, "alice", "x").is_err());
    // A second add is refused (the key stays); --new-key replaces it.
    let e = dm_sync::users::add_user(&s, "alice").unwrap_err();
    assert!(e.to_string().contains("--new-key"), "{e}");
    dm_sync::users::authenticate(&s, "alice", &k).unwrap();
    let k2 = dm_sync::users::new_key_for(&s, "alice").unwrap();
    assert!(dm_sync::users::authenticate(&s, "alice", &k).is_err());
    dm_sync::users::authenticate(&s, "alice", &k2).unwrap();
    assert!(dm_sync::users::new_key_for(&s, "nobody").is_err());
    // A name that would read as an option (`dm dot show -x/app`) is refused.
    let e = dm_sync::users::add_user(&s, "-x").unwrap_err();
    assert!(e.to_string().contains("option"), "{e}");
    let admin = dm_sync::users::ensure_admin(&s, d.path()).unwrap().unwrap();
    assert!(dm_sync::users::ensure_admin(&s, d.path())
        .unwrap()
        .is_none());
    assert!(
        dm_sync::users::authenticate(&s, "admin", &admin)
            .unwrap()
            .admin
    );
    assert_eq!(
        dm_sync::users::list_users(&s).unwrap(),
        vec!["admin", "alice"]
    );
}
