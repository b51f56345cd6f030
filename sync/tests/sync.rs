//! Push, pull and clone between in-process dm servers on 127.0.0.1.

mod common;

use common::*;
use dm_sync::proto::{DotRef, ErrorCode, Request};
use dm_sync::{Error, Progress, Remote, TransferOptions};

fn opts() -> TransferOptions {
    TransferOptions::default()
}

fn stash() -> TransferOptions {
    TransferOptions {
        stash_on_divergence: true,
        ..TransferOptions::default()
    }
}

fn code(e: &Error) -> Option<ErrorCode> {
    e.code().cloned()
}

/// The seed's example: A, B on master; newbranch from B with C, E; D on
/// master. Alice pushes newbranch (A, B, C, E go), bob clones, commits,
/// pushes back, alice pulls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_clone_commit_push_pull() {
    let hub = Node::start();
    let alice = Node::start();
    let bob = Node::start();
    let akey = hub.add_user("alice");
    let bkey = hub.add_user("bob");
    let app = dot("app");
    alice.store.create_dot(&app, None).unwrap();
    write(&alice.store, &app, "master", "f", 0, b"A");
    let a = commit(&alice.store, &app, "master", "A");
    write(&alice.store, &app, "master", "f", 0, b"B");
    let b = commit(&alice.store, &app, "master", "B");
    alice.store.create_branch(&app, "newbranch", None).unwrap();
    write(&alice.store, &app, "newbranch", "f", 0, b"C");
    let c = commit(&alice.store, &app, "newbranch", "C");
    write(&alice.store, &app, "master", "f", 0, b"D");
    let d = commit(&alice.store, &app, "master", "D");
    write(&alice.store, &app, "newbranch", "f", 0, b"E");
    let e = commit(&alice.store, &app, "newbranch", "E");

    let ra = hub.connect("alice", &akey).await;
    let rep = push(&alice, &ra, "app", "newbranch", "alice/app", &opts())
        .await
        .unwrap();
    assert_eq!(rep.commits, 4, "A, B, C and E go");
    let h = dot("alice/app");
    let log: Vec<_> = hub
        .store
        .log(&h, "newbranch")
        .unwrap()
        .into_iter()
        .map(|c| c.id)
        .collect();
    assert_eq!(log, vec![a, b, c, e]);
    // The branch it grew from exists on the hub at the fork commit.
    assert_eq!(hub.store.branch_info(&h, "master").unwrap().head, Some(b));
    let rep = push(&alice, &ra, "app", "master", "alice/app", &opts())
        .await
        .unwrap();
    assert_eq!(rep.commits, 1, "only D is new");
    assert_eq!(hub.store.branch_info(&h, "master").unwrap().head, Some(d));
    let rep = push(&alice, &ra, "app", "master", "alice/app", &opts())
        .await
        .unwrap();
    assert!(rep.up_to_date);

    // Bob has no access until alice adds him.
    let rb = hub.connect("bob", &bkey).await;
    let err = pull(&bob, &rb, "app", "master", "alice/app", &opts())
        .await
        .unwrap_err();
    assert_eq!(code(&err), Some(ErrorCode::NoAccess), "{err}");
    dm_sync::users::add_collaborator(&hub.store, &h, "bob").unwrap();
    let rep = pull(&bob, &rb, "app", "master", "alice/app", &opts())
        .await
        .unwrap();
    assert_eq!(rep.commits, 3);
    assert_eq!(read(&bob.store, &app, "master", "f"), b"D");
    pull(&bob, &rb, "app", "newbranch", "alice/app", &opts())
        .await
        .unwrap();
    assert_eq!(read(&bob.store, &app, "newbranch", "f"), b"E");
    assert!(bob.store.fsck().unwrap().is_clean());

    // Bob commits and pushes back; alice pulls.
    write(&bob.store, &app, "master", "g", 0, b"from bob");
    let f = commit(&bob.store, &app, "master", "F");
    let rep = push(&bob, &rb, "app", "master", "alice/app", &opts())
        .await
        .unwrap();
    assert_eq!(rep.commits, 1);
    let rep = pull(&alice, &ra, "app", "master", "alice/app", &opts())
        .await
        .unwrap();
    assert_eq!(rep.commits, 1);
    assert_eq!(
        alice.store.branch_info(&app, "master").unwrap().head,
        Some(f)
    );
    assert_eq!(read(&alice.store, &app, "master", "g"), b"from bob");
    // Pulling again: nothing to do.
    assert!(
        pull(&alice, &ra, "app", "master", "alice/app", &opts())
            .await
            .unwrap()
            .up_to_date
    );
    // A pull never overwrites uncommitted changes.
    write(&bob.store, &app, "master", "h", 0, b"bob 2");
    commit(&bob.store, &app, "master", "G");
    push(&bob, &rb, "app", "master", "alice/app", &opts())
        .await
        .unwrap();
    write(&alice.store, &app, "master", "dirty", 0, b"uncommitted");
    let err = pull(&alice, &ra, "app", "master", "alice/app", &opts())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("uncommitted"), "{err}");
    assert_eq!(
        alice.store.branch_info(&app, "master").unwrap().head,
        Some(f)
    );
    assert_eq!(read(&alice.store, &app, "master", "dirty"), b"uncommitted");
}

/// A hub; alice's dot `app` with one commit (`base`, file `f`) on `branch`
/// (forked from master when not master), pushed to `alice/app`; and bob, a
/// collaborator of it, who pulled the branch.
struct Shared {
    hub: Node,
    alice: Node,
    bob: Node,
    ra: Remote,
    rb: Remote,
    app: dm_store::DotName,
    h: dm_store::DotName,
    base: dm_store::Id,
}

async fn shared_dot(branch: &str) -> Shared {
    let hub = Node::start();
    let alice = Node::start();
    let bob = Node::start();
    let akey = hub.add_user("alice");
    let bkey = hub.add_user("bob");
    let app = dot("app");
    let h = dot("alice/app");
    alice.store.create_dot(&app, None).unwrap();
    write(&alice.store, &app, "master", "f", 0, b"base");
    let base = commit(&alice.store, &app, "master", "base");
    if branch != "master" {
        alice.store.create_branch(&app, branch, Some(base)).unwrap();
    }
    let ra = hub.connect("alice", &akey).await;
    push(&alice, &ra, "app", branch, "alice/app", &opts())
        .await
        .unwrap();
    dm_sync::users::add_collaborator(&hub.store, &h, "bob").unwrap();
    let rb = hub.connect("bob", &bkey).await;
    pull(&bob, &rb, "app", branch, "alice/app", &opts())
        .await
        .unwrap();
    Shared {
        hub,
        alice,
        bob,
        ra,
        rb,
        app,
        h,
        base,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn divergence_both_ways_and_stash() {
    let Shared {
        hub,
        alice,
        bob,
        ra,
        rb,
        app,
        h,
        base,
    } = shared_dot("master").await;
    // Both commit; bob pushes first.
    write(&alice.store, &app, "master", "f", 0, b"alice");
    let ac = commit(&alice.store, &app, "master", "alice's");
    write(&bob.store, &app, "master", "f", 0, b"bob");
    let bc = commit(&bob.store, &app, "master", "bob's");
    push(&bob, &rb, "app", "master", "alice/app", &opts())
        .await
        .unwrap();
    // Alice's push and pull are refused, naming the common commit.
    let err = push(&alice, &ra, "app", "master", "alice/app", &opts())
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("diverged") && msg.contains(&base.to_hex()),
        "{msg}"
    );
    assert!(msg.contains("--stash-on-divergence"), "{msg}");
    let err = pull(&alice, &ra, "app", "master", "alice/app", &opts())
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("diverged") && msg.contains(&base.to_hex()),
        "{msg}"
    );
    // Pull with stash: alice's work is kept on master-DIVERGED-*.
    let rep = pull(&alice, &ra, "app", "master", "alice/app", &stash())
        .await
        .unwrap();
    let stashed = rep.stashed.unwrap();
    assert!(stashed.starts_with("master-DIVERGED-"));
    assert_eq!(
        alice.store.branch_info(&app, "master").unwrap().head,
        Some(bc)
    );
    assert_eq!(
        alice.store.branch_info(&app, &stashed).unwrap().head,
        Some(ac)
    );
    assert_eq!(read(&alice.store, &app, &stashed, "f"), b"alice");

    // The other way: bob commits again, alice (now at bc) commits, pushes
    // first; bob's push is refused, then succeeds with --stash-on-divergence
    // (the hub keeps alice's commit on master-DIVERGED-*).
    write(&alice.store, &app, "master", "f", 0, b"alice 2");
    let ac2 = commit(&alice.store, &app, "master", "alice 2");
    push(&alice, &ra, "app", "master", "alice/app", &opts())
        .await
        .unwrap();
    write(&bob.store, &app, "master", "f", 0, b"bob 2");
    let bc2 = commit(&bob.store, &app, "master", "bob 2");
    let err = push(&bob, &rb, "app", "master", "alice/app", &opts())
        .await
        .unwrap_err();
    assert!(err.to_string().contains(&bc.to_hex()), "{err}");
    let rep = push(&bob, &rb, "app", "master", "alice/app", &stash())
        .await
        .unwrap();
    let stashed = rep.stashed.unwrap();
    assert_eq!(hub.store.branch_info(&h, "master").unwrap().head, Some(bc2));
    assert_eq!(hub.store.branch_info(&h, &stashed).unwrap().head, Some(ac2));
    // Destination ahead: push is refused with "pull first", pull is a no-op.
    pull(&alice, &ra, "app", "master", "alice/app", &stash())
        .await
        .unwrap();
    write(&bob.store, &app, "master", "f", 0, b"bob 3");
    commit(&bob.store, &app, "master", "bob 3");
    push(&bob, &rb, "app", "master", "alice/app", &opts())
        .await
        .unwrap();
    let err = push(&alice, &ra, "app", "master", "alice/app", &opts())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("pull` first"), "{err}");
    let rep = pull(&bob, &rb, "app", "master", "alice/app", &opts())
        .await
        .unwrap();
    assert!(rep.up_to_date);
    // Unrelated histories: no common commit.
    let other = dot("other");
    alice.store.create_dot(&other, None).unwrap();
    write(&alice.store, &other, "master", "f", 0, b"unrelated");
    commit(&alice.store, &other, "master", "unrelated");
    let err = push(&alice, &ra, "other", "master", "alice/app", &opts())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("shares no commit"), "{err}");
    let err = pull(&alice, &ra, "other", "master", "alice/app", &opts())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("shares no commit"), "{err}");
}

fn unix_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A stash never lands on a branch that already exists (two diverged pulls
/// in the same second, or a leftover name): the local commits stay on a
/// branch of their own, and existing branches are left alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stash_on_pull_never_reuses_an_existing_branch() {
    let Shared {
        alice,
        bob,
        ra,
        rb,
        app,
        base,
        ..
    } = shared_dot("master").await;
    // The names a stash would take during the next seconds exist already.
    let now = unix_secs();
    let taken: Vec<String> = (now..now + 10)
        .map(|t| format!("master-DIVERGED-{t}"))
        .collect();
    for name in &taken {
        alice.store.create_branch(&app, name, Some(base)).unwrap();
    }
    let mut stashes = Vec::new();
    for round in 0..2 {
        write(&alice.store, &app, "master", "f", 0, b"alice");
        let ac = commit(&alice.store, &app, "master", &format!("alice {round}"));
        write(&bob.store, &app, "master", "f", 0, b"bob");
        let bc = commit(&bob.store, &app, "master", &format!("bob {round}"));
        push(&bob, &rb, "app", "master", "alice/app", &opts())
            .await
            .unwrap();
        let rep = pull(&alice, &ra, "app", "master", "alice/app", &stash())
            .await
            .unwrap();
        let stashed = rep.stashed.unwrap();
        assert!(stashed.starts_with("master-DIVERGED-"), "{stashed}");
        assert!(!taken.contains(&stashed), "{stashed} existed already");
        assert!(!stashes.contains(&stashed), "{stashed} was used twice");
        assert_eq!(
            alice.store.branch_info(&app, &stashed).unwrap().head,
            Some(ac),
            "round {round}: alice's commit is on {stashed}"
        );
        assert_eq!(
            alice.store.branch_info(&app, "master").unwrap().head,
            Some(bc)
        );
        stashes.push(stashed);
    }
    for name in &taken {
        assert_eq!(
            alice.store.branch_info(&app, name).unwrap().head,
            Some(base),
            "{name} was left alone"
        );
    }
    alice.store.gc().unwrap();
    assert!(alice.store.fsck().unwrap().is_clean());
}

/// A branch whose name leaves no room for the stash suffix is refused up
/// front, with a clear message, and nothing moves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stash_of_a_long_branch_name_is_refused_before_anything_moves() {
    let long = "b".repeat(60);
    let Shared {
        hub,
        alice,
        bob,
        ra,
        rb,
        app,
        h,
        ..
    } = shared_dot(&long).await;
    write(&alice.store, &app, &long, "f", 0, b"alice");
    let ac = commit(&alice.store, &app, &long, "alice");
    write(&bob.store, &app, &long, "f", 0, b"bob");
    let bc = commit(&bob.store, &app, &long, "bob");
    push(&bob, &rb, "app", &long, "alice/app", &opts())
        .await
        .unwrap();
    let local_branches = alice.store.list_branches(&app).unwrap().len();
    let hub_branches = hub.store.list_branches(&h).unwrap().len();
    let err = pull(&alice, &ra, "app", &long, "alice/app", &stash())
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::Refused(_)), "{err:?}");
    assert!(msg.contains("stash") && msg.contains(&long), "{msg}");
    assert_eq!(alice.store.branch_info(&app, &long).unwrap().head, Some(ac));
    assert_eq!(
        alice.store.list_branches(&app).unwrap().len(),
        local_branches
    );
    // The same on push: nothing is sent, the hub's branch stays.
    let err = push(&alice, &ra, "app", &long, "alice/app", &stash())
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::Refused(_)), "{err:?}");
    assert!(msg.contains("stash") && msg.contains(&long), "{msg}");
    assert_eq!(hub.store.branch_info(&h, &long).unwrap().head, Some(bc));
    assert_eq!(hub.store.list_branches(&h).unwrap().len(), hub_branches);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_pushes_one_wins() {
    let hub = Node::start();
    let a = Node::start();
    let b = Node::start();
    let key = hub.add_user("alice");
    let app = dot("app");
    a.store.create_dot(&app, None).unwrap();
    write(&a.store, &app, "master", "f", 0, b"base");
    commit(&a.store, &app, "master", "base");
    let ra = hub.connect("alice", &key).await;
    push(&a, &ra, "app", "master", "alice/app", &opts())
        .await
        .unwrap();
    let rb = hub.connect("alice", &key).await;
    pull(&b, &rb, "app", "master", "alice/app", &opts())
        .await
        .unwrap();
    // Each side commits 4 MiB of different data, then both push at once.
    write(&a.store, &app, "master", "f", 0, &random_bytes(1, 4 << 20));
    commit(&a.store, &app, "master", "a");
    write(&b.store, &app, "master", "f", 0, &random_bytes(2, 4 << 20));
    commit(&b.store, &app, "master", "b");
    let o = opts();
    let (x, y) = tokio::join!(
        push(&a, &ra, "app", "master", "alice/app", &o),
        push(&b, &rb, "app", "master", "alice/app", &o)
    );
    assert!(x.is_ok() != y.is_ok(), "exactly one wins: {x:?} {y:?}");
    let e = x.err().or(y.err()).unwrap().to_string();
    assert!(
        e.contains("pull first") || e.contains("diverged"),
        "loser is told to pull: {e}"
    );

    // The compare-and-swap itself: a stale expectation is refused.
    let head = hub
        .store
        .branch_info(&dot("alice/app"), "master")
        .unwrap()
        .head
        .unwrap();
    let base = hub.store.commit_info(&head).unwrap().parents[0];
    let err = ra
        .call(&Request::SetHead {
            dot: DotRef {
                namespace: "alice".into(),
                name: "app".into(),
            },
            branch: "master".into(),
            expected: Some(base),
            new: base,
            block_size: 65536,
        })
        .await
        .unwrap_err();
    assert_eq!(code(&err), Some(ErrorCode::Moved { actual: Some(head) }));
    assert!(err.to_string().contains("pull first"), "{err}");
    // A block size no dot can have is refused before anything is created.
    let err = ra
        .call(&Request::SetHead {
            dot: DotRef {
                namespace: "alice".into(),
                name: "weird".into(),
            },
            branch: "master".into(),
            expected: None,
            new: head,
            block_size: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(code(&err), Some(ErrorCode::BadRequest), "{err}");
    assert!(hub.store.dot_info(&dot("alice/weird")).is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interrupted_push_resumes_without_resending() {
    let hub = Node::start();
    let a = Node::start();
    let key = hub.add_user("alice");
    let app = dot("app");
    a.store.create_dot(&app, None).unwrap();
    let data = random_bytes(3, 16 << 20);
    write(&a.store, &app, "master", "big", 0, &data);
    commit(&a.store, &app, "master", "big");
    let r = hub.connect("alice", &key).await;
    let interrupted = TransferOptions {
        fail_after_chunk_bytes: Some(8 << 20),
        streams: 2,
        ..TransferOptions::default()
    };
    let before = r.bytes_sent();
    assert!(push(&a, &r, "app", "master", "alice/app", &interrupted)
        .await
        .is_err());
    let first = r.bytes_sent() - before;
    // Nothing is visible on the hub.
    assert!(hub.store.list_dots().unwrap().is_empty());
    // The connection ends and a GC runs on the hub (its own, set off by
    // what arrived): what arrived stays for the rerun (a GC took it, and
    // the rerun resent everything, or failed at its end).
    r.close().await;
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    hub.store.gc().unwrap();
    let r = hub.connect("alice", &key).await;
    let (before, lost_before) = (r.bytes_sent(), r.bytes_lost());
    let rep = push(&a, &r, "app", "master", "alice/app", &opts())
        .await
        .unwrap();
    let lost = r.bytes_lost() - lost_before;
    let second = r.bytes_sent() - before;
    println!(
        "interrupted run sent {first} bytes, the resumed run {second} ({lost} of them lost and \
         sent again; chunks {})",
        rep.chunk_bytes
    );
    assert!(first >= 8 << 20);
    // Half the data, and the protocol around it: a whole resend would be
    // over 16 MiB. QUIC's retransmissions are not counted: a loaded
    // machine drops UDP packets (13.8 MB on the wire once, for 8 MiB).
    assert!(
        second - lost < (11 << 20),
        "resumed push resent data: {second} bytes sent, {lost} of them lost"
    );
    assert!(rep.chunk_bytes < (9 << 20));
    assert_eq!(read(&hub.store, &dot("alice/app"), "master", "big"), data);
    // Also from a new connection (the hub's session ended).
    let a2 = Node::start();
    a2.store.create_dot(&app, None).unwrap();
    let r2 = hub.connect("alice", &key).await;
    pull(&a2, &r2, "app", "master", "alice/app", &interrupted)
        .await
        .unwrap_err();
    assert!(a2.store.branch_info(&app, "master").unwrap().head.is_none());
    a2.store.gc().unwrap();
    let rep = pull(&a2, &r2, "app", "master", "alice/app", &opts())
        .await
        .unwrap();
    assert!(
        rep.chunk_bytes < (12 << 20),
        "resumed pull refetched: {}",
        rep.chunk_bytes
    );
    assert_eq!(read(&a2.store, &app, "master", "big"), data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupted_chunks_are_rejected() {
    let hub = Node::start();
    let a = Node::start();
    let key = hub.add_user("alice");
    let app = dot("app");
    a.store.create_dot(&app, None).unwrap();
    write(&a.store, &app, "master", "f", 0, &random_bytes(4, 1 << 20));
    commit(&a.store, &app, "master", "one");
    let r = hub.connect("alice", &key).await;
    let bad = TransferOptions {
        corrupt_chunks: true,
        ..TransferOptions::default()
    };
    let err = push(&a, &r, "app", "master", "alice/app", &bad)
        .await
        .unwrap_err();
    assert_eq!(code(&err), Some(ErrorCode::Corrupt), "{err}");
    assert!(hub.store.list_dots().unwrap().is_empty());
    let gc = hub.store.gc().unwrap();
    assert_eq!(gc.chunks_kept, 0);
    // A clean push then works.
    push(&a, &r, "app", "master", "alice/app", &opts())
        .await
        .unwrap();
    assert!(hub.store.fsck().unwrap().is_clean());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_key_no_access_unknown_dot() {
    let hub = Node::start();
    let a = Node::start();
    let key = hub.add_user("alice");
    let bkey = hub.add_user("bob");
    // Wrong key, unknown user.
    for (u, k) in [
        ("alice", "nope"),
        ("mallory", "x"),
        ("alice", bkey.as_str()),
    ] {
        let err = Remote::connect(&hub.spec(u, k)).await.err().unwrap();
        assert_eq!(code(&err), Some(ErrorCode::BadKey), "{err}");
        assert!(err.to_string().contains("wrong API key"), "{err}");
    }
    // The admin key from the root-only file works.
    let path = dm_sync::users::admin_key_path(hub.dir.path());
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o600
    );
    hub.connect("admin", &hub.admin_key()).await;
    // Pinned fingerprint mismatch.
    let mut spec = hub.spec("alice", &key);
    spec.trust = dm_sync::Trust::Pinned("sha256:00".into());
    let err = Remote::connect(&spec).await.err().unwrap();
    assert!(err.to_string().contains("fingerprint"), "{err}");
    assert_eq!(
        dm_sync::probe_fingerprint("127.0.0.1", hub.hub.local_addr().unwrap().port())
            .await
            .unwrap(),
        hub.hub.fingerprint()
    );
    // Unknown dot, and no access to another's namespace.
    let r = hub.connect("alice", &key).await;
    let err = pull(&a, &r, "app", "master", "alice/nothing", &opts())
        .await
        .unwrap_err();
    assert_eq!(code(&err), Some(ErrorCode::UnknownDot), "{err}");
    let app = dot("app");
    a.store.create_dot(&app, None).unwrap();
    write(&a.store, &app, "master", "f", 0, b"x");
    commit(&a.store, &app, "master", "x");
    let err = push(&a, &r, "app", "master", "bob/app", &opts())
        .await
        .unwrap_err();
    assert_eq!(code(&err), Some(ErrorCode::NoAccess), "{err}");
    assert!(
        err.to_string().contains("collaborator add bob/app alice"),
        "{err}"
    );
    assert!(hub.store.list_dots().unwrap().is_empty());

    // A grant is for the dot it was given on: bob may pull alice/app, but
    // not a new dot of that name once the hub deleted the old one.
    push(&a, &r, "app", "master", "alice/app", &opts())
        .await
        .unwrap();
    let shared = dot("alice/app");
    dm_sync::users::add_collaborator(&hub.store, &shared, "bob").unwrap();
    let b = Node::start();
    let rb = hub.connect("bob", &bkey).await;
    pull(&b, &rb, "app", "master", "alice/app", &opts())
        .await
        .unwrap();
    hub.store.delete_dot(&shared).unwrap();
    let secret = dot("secret");
    a.store.create_dot(&secret, None).unwrap();
    write(&a.store, &secret, "master", "s", 0, b"secret");
    commit(&a.store, &secret, "master", "s");
    push(&a, &r, "secret", "master", "alice/app", &opts())
        .await
        .unwrap();
    let err = pull(&b, &rb, "stolen", "master", "alice/app", &opts())
        .await
        .unwrap_err();
    assert_eq!(code(&err), Some(ErrorCode::NoAccess), "{err}");
    assert!(dm_sync::users::collaborators(&hub.store, &shared)
        .unwrap()
        .is_empty());

    // Uncommitted changes made on the hub are said to be the hub's.
    write(&hub.store, &shared, "master", "dirty", 0, b"on the hub");
    write(&a.store, &secret, "master", "s", 0, b"more");
    commit(&a.store, &secret, "master", "more");
    let err = push(&a, &r, "secret", "master", "alice/app", &opts())
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("uncommitted changes on the hub"),
        "{err}"
    );
}

/// A hub with users alice and bob, each with a dot pushed from a node of
/// their own: alice/app (commits `first`, whose file is `alice_first`,
/// then `second`, "ALICE'S") and bob/own (`bobs`).
struct Two {
    hub: Node,
    a: Node,
    b: Node,
    akey: String,
    ra: Remote,
    rb: Remote,
    first: dm_store::Id,
    second: dm_store::Id,
    bobs: dm_store::Id,
}

async fn two_users(alice_first: &[u8]) -> Two {
    let hub = Node::start();
    let (a, b) = (Node::start(), Node::start());
    let akey = hub.add_user("alice");
    let bkey = hub.add_user("bob");
    let ra = hub.connect("alice", &akey).await;
    let rb = hub.connect("bob", &bkey).await;
    let (app, own) = (dot("app"), dot("own"));
    a.store.create_dot(&app, None).unwrap();
    write(&a.store, &app, "master", "secret", 0, alice_first);
    let first = commit(&a.store, &app, "master", "one");
    write(&a.store, &app, "master", "secret", 0, b"ALICE'S");
    let second = commit(&a.store, &app, "master", "two");
    push(&a, &ra, "app", "master", "alice/app", &opts())
        .await
        .unwrap();
    b.store.create_dot(&own, None).unwrap();
    write(&b.store, &own, "master", "f", 0, b"bob's");
    let bobs = commit(&b.store, &own, "master", "b");
    push(&b, &rb, "own", "master", "bob/own", &opts())
        .await
        .unwrap();
    Two {
        hub,
        a,
        b,
        akey,
        ra,
        rb,
        first,
        second,
        bobs,
    }
}

/// A user allowed on one dot gets no history of another dot's commits by
/// naming their ids under the dot they may read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ancestry_only_of_commits_of_the_named_dot() {
    let Two {
        hub: _hub,
        ra,
        rb,
        first,
        second,
        bobs,
        ..
    } = two_users(b"alice's").await;
    let ancestry = |dot: &str, head| Request::Ancestry {
        dot: DotRef {
            namespace: dot.split('/').next().unwrap().into(),
            name: dot.split('/').nth(1).unwrap().into(),
        },
        head,
    };
    // Bob's own dot, alice's head or an older commit of hers: refused.
    for head in [second, first] {
        let e = rb.call(&ancestry("bob/own", head)).await.unwrap_err();
        assert_eq!(code(&e), Some(ErrorCode::UnknownDot), "{e}");
        assert!(e.to_string().contains("no commit"), "{e}");
    }
    // Alice's dot by name: no access.
    let e = rb.call(&ancestry("alice/app", second)).await.unwrap_err();
    assert_eq!(code(&e), Some(ErrorCode::NoAccess), "{e}");
    // What each may ask still works: heads, and older commits of the dot.
    match rb.call(&ancestry("bob/own", bobs)).await.unwrap() {
        dm_sync::proto::Response::Ids(ids) => assert_eq!(ids, vec![bobs]),
        other => panic!("unexpected {other:?}"),
    }
    match ra.call(&ancestry("alice/app", first)).await.unwrap() {
        dm_sync::proto::Response::Ids(ids) => assert_eq!(ids, vec![first]),
        other => panic!("unexpected {other:?}"),
    }
    // Nor can bob fetch alice's commits or data by id through his own dot.
    let own_ref = DotRef {
        namespace: "bob".into(),
        name: "own".into(),
    };
    let secret_chunk = blake3_of(b"ALICE'S");
    for req in [
        Request::GetObjects {
            dot: own_ref.clone(),
            ids: vec![second],
        },
        Request::GetChunks {
            dot: own_ref.clone(),
            ids: vec![secret_chunk],
        },
    ] {
        let e = rb.call(&req).await.unwrap_err();
        assert_eq!(code(&e), Some(ErrorCode::UnknownDot), "{e}");
        assert!(e.to_string().contains("not part of what"), "{e}");
    }
    // His own commit, once shown (by the ancestry above), he can fetch.
    let got = rb
        .call(&Request::GetObjects {
            dot: own_ref,
            ids: vec![bobs],
        })
        .await
        .unwrap();
    assert!(matches!(got, dm_sync::proto::Response::Blobs(b) if b.len() == 1 && b[0].0 == bobs));
}

/// Knowing a commit id of a dot one may not read (from a pasted `dm log`)
/// gives nothing: no branch of one's own can be pointed at it, nor at a
/// commit made on top of it, and the hub does not say it has it. Pushing
/// the same commits under a second name still works (they are sent again,
/// the chunks are not).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn known_commit_ids_of_unreadable_dots_give_nothing() {
    let Two {
        hub,
        a,
        b,
        akey,
        ra: _,
        rb,
        first,
        second,
        bobs,
    } = two_users(&random_bytes(7, 300_000)).await;
    let c = Node::start();
    let app = dot("app");
    let steal = DotRef {
        namespace: "bob".into(),
        name: "steal".into(),
    };
    // A branch of his own at alice's commit: refused, and nothing made.
    for new in [second, first] {
        let e = rb
            .call(&Request::SetHead {
                dot: steal.clone(),
                branch: "master".into(),
                expected: None,
                new,
                block_size: 65536,
            })
            .await
            .unwrap_err();
        assert_eq!(code(&e), Some(ErrorCode::Refused), "{e}");
        assert!(e.to_string().contains("neither sent"), "{e}");
    }
    assert!(hub.store.dot_info(&dot("bob/steal")).is_err());
    // The hub does not say it has her commits (his own, he sent).
    match rb
        .call(&Request::HasObjects {
            ids: vec![second, bobs],
        })
        .await
        .unwrap()
    {
        dm_sync::proto::Response::Bools(b) => assert_eq!(b, vec![false, true]),
        other => panic!("unexpected {other:?}"),
    }
    // A commit of his own on top of hers: refused.
    let parent = hub.store.commit_record(&second).unwrap();
    let forged = dm_store::object::Commit {
        root: b.store.commit_record(&bobs).unwrap().root,
        parents: vec![second],
        author: "bob".into(),
        message: "mine now".into(),
        timestamp_ns: 1,
        metadata: Default::default(),
        generation: parent.generation + 1,
        size: 0,
    };
    let (fid, fbytes) = dm_store::object::encode(dm_store::object::KIND_COMMIT, &forged);
    let e = rb
        .call(&Request::PutObjects {
            dot: steal.clone(),
            items: vec![(fid, fbytes)],
        })
        .await
        .unwrap_err();
    assert!(e.to_string().contains("neither sent"), "{e}");
    assert!(!hub.store.has_objects(&[fid]).unwrap()[0]);
    // The same commits pushed again under another name, on a new
    // connection: the commits go again (the hub may not vouch for them),
    // no chunk does, and the copy clones whole.
    let ra2 = hub.connect("alice", &akey).await;
    let r = push(&a, &ra2, "app", "master", "alice/copy", &opts())
        .await
        .unwrap();
    assert_eq!((r.commits, r.chunks), (2, 0), "{r:?}");
    // A new branch of a dot the hub has, on a new connection: only its
    // own commit goes (the hub shows the dot's history to whoever may
    // read it).
    a.store.create_branch(&app, "feature", None).unwrap();
    write(&a.store, &app, "feature", "g", 0, b"feature");
    commit(&a.store, &app, "feature", "f");
    let ra3 = hub.connect("alice", &akey).await;
    let r = push(&a, &ra3, "app", "feature", "alice/app", &opts())
        .await
        .unwrap();
    assert_eq!(r.commits, 1, "{r:?}");
    let rc = hub.connect("alice", &akey).await;
    pull(&c, &rc, "copy", "master", "alice/copy", &opts())
        .await
        .unwrap();
    assert_eq!(
        read(&c.store, &dot("copy"), "master", "secret")[..7],
        *b"ALICE'S"
    );
}

/// Bytes on the wire: a 1 MiB change to a large dot sends < 2 MiB; a second
/// dot with content the hub already has sends almost no chunk data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_on_the_wire() {
    let size: usize = std::env::var("DM_SYNC_TEST_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256)
        << 20;
    let hub = Node::start();
    let a = Node::start();
    let key = hub.add_user("alice");
    let app = dot("app");
    a.store.create_dot(&app, None).unwrap();
    let data = random_bytes(5, size);
    write(&a.store, &app, "master", "big", 0, &data);
    commit(&a.store, &app, "master", "big");
    let r = hub.connect("alice", &key).await;
    let t = std::time::Instant::now();
    let before = r.bytes_sent();
    push(&a, &r, "app", "master", "alice/app", &opts())
        .await
        .unwrap();
    let first = r.bytes_sent() - before;
    let secs = t.elapsed().as_secs_f64();
    println!(
        "first push of {} MiB: {first} bytes on the wire in {secs:.2} s ({:.0} MiB/s)",
        size >> 20,
        size as f64 / secs / 1048576.0
    );
    assert!(first >= size as u64);
    // 1 MiB change in the middle.
    write(
        &a.store,
        &app,
        "master",
        "big",
        (size / 2) as u64,
        &random_bytes(6, 1 << 20),
    );
    commit(&a.store, &app, "master", "1 MiB change");
    let before = r.bytes_sent();
    let rep = push(&a, &r, "app", "master", "alice/app", &opts())
        .await
        .unwrap();
    let change = r.bytes_sent() - before;
    println!(
        "push of a 1 MiB change: {change} bytes on the wire ({} chunk bytes, {} object bytes)",
        rep.chunk_bytes, rep.object_bytes
    );
    assert!(change < 2 << 20, "1 MiB change sent {change} bytes");
    // A second dot with the same content.
    let copy = dot("copy");
    a.store.create_dot(&copy, None).unwrap();
    write(&a.store, &copy, "master", "same", 0, &data);
    commit(&a.store, &copy, "master", "same data");
    let before = r.bytes_sent();
    let rep = push(&a, &r, "copy", "master", "alice/copy", &opts())
        .await
        .unwrap();
    let dup = r.bytes_sent() - before;
    println!(
        "push of a second dot with the same {} MiB: {dup} bytes on the wire ({} chunk bytes)",
        size >> 20,
        rep.chunk_bytes
    );
    assert_eq!(rep.chunk_bytes, 0);
    assert!(dup < (size as u64) / 50, "duplicate dot sent {dup} bytes");
    // Pull throughput: a fresh node clones.
    let b = Node::start();
    let rb = hub.connect("alice", &key).await;
    let t = std::time::Instant::now();
    let before = rb.bytes_received();
    pull(&b, &rb, "app", "master", "alice/app", &opts())
        .await
        .unwrap();
    let got = rb.bytes_received() - before;
    let secs = t.elapsed().as_secs_f64();
    println!(
        "clone of {} MiB: {got} bytes on the wire in {secs:.2} s ({:.0} MiB/s)",
        size >> 20,
        size as f64 / secs / 1048576.0
    );
    assert_eq!(
        blake3_of(&read(&b.store, &app, "master", "big")),
        blake3_of(&read(&a.store, &app, "master", "big"))
    );
}

fn blake3_of(b: &[u8]) -> dm_store::Id {
    dm_store::Id::of(b)
}

/// A CA-issued hub certificate (PEM files in the data dir) and clients that
/// trust the CA instead of pinning.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ca_issued_certificate() {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .signed_by(&leaf_key, &ca, &ca_key)
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("hub-cert.pem"), leaf.pem()).unwrap();
    std::fs::write(dir.path().join("hub-key.pem"), leaf_key.serialize_pem()).unwrap();
    let store = dm_store::Store::open(dir.path()).unwrap();
    let hub =
        dm_sync::Hub::start(store.clone(), dir.path(), "127.0.0.1:0".parse().unwrap()).unwrap();
    let key = dm_sync::users::add_user(&store, "alice").unwrap();
    let mut spec = dm_sync::RemoteSpec {
        host: "localhost".into(),
        port: hub.local_addr().unwrap().port(),
        user: "alice".into(),
        key,
        trust: dm_sync::Trust::Ca(ca.pem()),
    };
    let r = Remote::connect(&spec).await.unwrap();
    assert_eq!(r.fingerprint(), hub.fingerprint());
    // Another CA is not trusted.
    let other_key = rcgen::KeyPair::generate().unwrap();
    let mut other = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    other.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    spec.trust = dm_sync::Trust::Ca(other.self_signed(&other_key).unwrap().pem());
    assert!(Remote::connect(&spec).await.is_err());
}

/// Peers that have not authenticated cannot hold the hub's memory or
/// connections: a `Hello` larger than a name and a key ends the
/// connection at once, and one that says nothing is closed after
/// `HELLO_TIMEOUT`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthenticated_peers_are_bounded() {
    let hub = Node::start();
    let (cfg, _) =
        dm_sync::tls::client_config(dm_sync::Trust::Pinned(hub.hub.fingerprint().into())).unwrap();
    let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    ep.set_default_client_config(cfg);
    let addr = hub.hub.local_addr().unwrap();
    let connect = || async {
        ep.connect(addr, dm_sync::tls::SERVER_NAME)
            .unwrap()
            .await
            .unwrap()
    };
    let big = connect().await;
    let (mut send, _recv) = big.open_bi().await.unwrap();
    send.write_all(&(1u32 << 20).to_be_bytes()).await.unwrap();
    let _ = send.write_all(&[0u8; 4096]).await;
    tokio::time::timeout(std::time::Duration::from_secs(5), big.closed())
        .await
        .expect("a 1 MiB Hello ends the connection at once");
    let silent = connect().await;
    let t = std::time::Instant::now();
    tokio::time::timeout(
        dm_sync::server::HELLO_TIMEOUT + std::time::Duration::from_secs(5),
        silent.closed(),
    )
    .await
    .expect("a connection without Hello is closed");
    assert!(t.elapsed() + std::time::Duration::from_secs(1) >= dm_sync::server::HELLO_TIMEOUT);
    // Others still get in.
    let k = hub.add_user("carol");
    hub.connect("carol", &k).await;
}

/// The progress of a push and of a pull of compressible data ends at its
/// total: chunks count as a block each in both (the bar stopped at 48%,
/// its total counting blocks and its progress the compressed bytes sent).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_of_compressible_data_ends_at_its_total() {
    let hub = Node::start();
    let a = Node::start();
    let b = Node::start();
    let key = hub.add_user("alice");
    let app = dot("app");
    a.store.create_dot(&app, None).unwrap();
    let text: Vec<u8> = (0..400_000u32)
        .flat_map(|i| format!("line {i} of a log\n").into_bytes())
        .collect();
    write(&a.store, &app, "master", "log", 0, &text);
    // Small files: a chunk each, far less than a block of data (the total
    // counted a whole block per chunk, 5x too high for a dot of 2-30 KB
    // files).
    let mut data = text.len() as u64;
    for i in 0..200u32 {
        let small = format!("small file {i}\n").repeat(60).into_bytes();
        data += small.len() as u64;
        write(&a.store, &app, "master", &format!("small-{i}"), 0, &small);
    }
    commit(&a.store, &app, "master", "log");
    let r = hub.connect("alice", &key).await;
    let progress = Progress::new();
    let rep = dm_sync::push(
        a.store.clone(),
        &r,
        &app,
        "master",
        &dot("alice/app"),
        &opts(),
        &progress,
    )
    .await
    .unwrap();
    assert!(
        rep.chunk_bytes * 2 < text.len() as u64,
        "compressed: {rep:?}"
    );
    let (done, total) = progress.get();
    assert!(total > 0 && done == total, "push: {done} of {total}");
    // The data, plus the tree nodes and commits.
    assert!(
        total >= data && total < data + (1 << 20),
        "push: a total of {total} for {data} bytes of data"
    );
    b.store.create_dot(&app, None).unwrap();
    let progress = Progress::new();
    dm_sync::pull(
        b.store.clone(),
        &r,
        &app,
        "master",
        &dot("alice/app"),
        &opts(),
        &progress,
    )
    .await
    .unwrap();
    let (done, total) = progress.get();
    assert!(
        total == data && done == total,
        "pull: {done} of {total} for {data}"
    );
    assert_eq!(read(&b.store, &app, "master", "log"), text);
}

/// A port where nothing listens, or where another service answers, is
/// named as such at once: both waited 15 s for "no answer from the hub".
/// A hub, which ignores the probe's datagram, still connects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_port_without_a_hub_is_named_at_once() {
    let hub = Node::start();
    let key = hub.add_user("alice");
    let mut spec = hub.spec("alice", &key);
    let free = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    spec.port = free.local_addr().unwrap().port();
    drop(free);
    let t = std::time::Instant::now();
    let err = Remote::connect(&spec).await.err().unwrap();
    assert!(err.to_string().contains("nothing listens"), "{err}");
    assert!(
        t.elapsed() < std::time::Duration::from_secs(5),
        "{:?}",
        t.elapsed()
    );
    // An echo service.
    let echo = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    spec.port = echo.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while let Ok((n, from)) = echo.recv_from(&mut buf) {
            let _ = echo.send_to(&buf[..n], from);
        }
    });
    let err = Remote::connect(&spec).await.err().unwrap();
    assert!(err.to_string().contains("something else answers"), "{err}");
    hub.connect("alice", &key).await;
}
