//! The local API as the Docker plugin and other clients see it: raw HTTP,
//! JSON bodies, `{"error": ...}` with meaningful status codes.

use dm_tests::{write_synced, Server};
use std::path::PathBuf;

const DM: &str = env!("CARGO_BIN_EXE_dm");

#[test]
fn api_contract() {
    let s = Server::start(DM);
    let (st, v) = s.api("GET", "/v1/version", None);
    assert_eq!(st, 200);
    assert_eq!(v["api_version"], 1);

    let (st, v) = s.api("POST", "/v1/dots", Some(r#"{"name":"myapp"}"#));
    assert_eq!(st, 201, "{v}");
    assert_eq!(v["full_name"], "myapp");
    assert_eq!(v["current_branch"], "master");
    assert!(v["containers"].as_array().unwrap().is_empty());

    let (st, v) = s.api("POST", "/v1/dots", Some(r#"{"name":"myapp"}"#));
    assert_eq!(st, 409, "{v}");
    assert!(v["error"].as_str().unwrap().contains("myapp"), "{v}");

    let (st, v) = s.api("POST", "/v1/dots", Some(r#"{"name":"bad name"}"#));
    assert_eq!(st, 400, "{v}");
    assert!(v["error"].as_str().unwrap().contains("invalid"), "{v}");

    let (st, v) = s.api("POST", "/v1/dots", Some("not json"));
    assert!((400..500).contains(&st), "{st} {v}");
    assert!(v["error"].is_string(), "{v}");
    let (st, v) = s.api("PUT", "/v1/dots", Some("{}"));
    assert_eq!(st, 405, "{v}");
    assert!(v["error"].is_string(), "{v}");

    let (st, v) = s.api("GET", "/v1/dots/admin/nosuch", None);
    assert_eq!(st, 404, "{v}");
    assert!(v["error"].as_str().unwrap().contains("nosuch"), "{v}");

    let (st, v) = s.api("GET", "/v1/nothing-here", None);
    assert_eq!(st, 404, "{v}");
    assert!(v["error"].is_string());

    // Mount without a path: the server picks one; again = same mount.
    let (st, m) = s.api("POST", "/v1/mounts", Some(r#"{"volume":"myapp"}"#));
    assert_eq!(st, 200, "{m}");
    assert_eq!(m["pinned"], false);
    assert_eq!(m["subdot"], "__default__");
    let path = PathBuf::from(m["path"].as_str().unwrap());
    let (_, m2) = s.api("POST", "/v1/mounts", Some(r#"{"volume":"myapp"}"#));
    assert_eq!(m, m2);
    let (_, list) = s.api("GET", "/v1/mounts", None);
    assert_eq!(list.as_array().unwrap().len(), 1);

    write_synced(&path.join("f"), b"one");
    let commits = "/v1/dots/admin/myapp/branches/master/commits";
    let (st, c1) = s.api(
        "POST",
        commits,
        Some(r#"{"message":"one","metadata":{"ticket":"1"}}"#),
    );
    assert_eq!(st, 201, "{c1}");
    assert_eq!(c1["author"], "admin");
    assert_eq!(c1["generation"], 1);
    write_synced(&path.join("f"), b"two");

    let (st, v) = s.api("GET", "/v1/dots/admin/myapp/branches/master/status", None);
    assert_eq!(st, 200);
    assert_eq!(v["dirty"], true, "{v}");

    let (st, v) = s.api(
        "POST",
        "/v1/dots/admin/myapp/branches/master/reset",
        Some(r#"{"rev":"HEAD","hard":false}"#),
    );
    assert_eq!(st, 409, "{v}");
    assert!(v["error"].as_str().unwrap().contains("--hard"), "{v}");

    let (st, c2) = s.api("POST", commits, Some(r#"{"message":"two"}"#));
    assert_eq!(st, 201, "{c2}");
    let (st, v) = s.api(
        "GET",
        "/v1/dots/admin/myapp/branches/master/resolve?rev=HEAD%5E",
        None,
    );
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["id"], c1["id"]);
    let (st, v) = s.api(
        "GET",
        "/v1/dots/admin/myapp/branches/master/resolve?rev=HEAD%5E%5E%5E",
        None,
    );
    assert_eq!(st, 400, "{v}");

    let (_, log) = s.api("GET", commits, None);
    let log = log.as_array().unwrap();
    assert_eq!(log.len(), 2);
    assert_eq!(log[0]["message"], "one");
    assert_eq!(log[0]["metadata"]["ticket"], "1");

    let (st, v) = s.api(
        "GET",
        "/v1/dots/admin/myapp/branches/master/diff?from=HEAD%5E&to=HEAD",
        None,
    );
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["changes"][0]["kind"], "modified", "{v}");

    let (st, b) = s.api(
        "POST",
        "/v1/dots/admin/myapp/checkout",
        Some(r#"{"branch":"dev","create":true}"#),
    );
    assert_eq!(st, 200, "{b}");
    assert_eq!(b["current"], true);
    assert_eq!(b["origin"]["branch"], "master");
    let (_, m) = s.api("GET", "/v1/mounts", None);
    assert_eq!(
        m[0]["branch"], "dev",
        "unpinned mount follows checkout: {m}"
    );

    // A dot's details, all branches' or those asked for (commands about
    // one branch ask for it alone).
    for b in ["qa", "staging"] {
        let (st, v) = s.api(
            "POST",
            "/v1/dots/admin/myapp/branches",
            Some(&format!(r#"{{"name":"{b}"}}"#)),
        );
        assert_eq!(st, 201, "{v}");
    }
    let details = |query: &str| -> Vec<String> {
        let (st, v) = s.api("GET", &format!("/v1/dots/admin/myapp{query}"), None);
        assert_eq!(st, 200, "{v}");
        assert_eq!(
            v["branches"],
            serde_json::json!(["dev", "master", "qa", "staging"]),
            "{v}"
        );
        v["branch_details"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b["name"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(details(""), ["dev", "master", "qa", "staging"]);
    assert_eq!(details("?branch="), ["dev"]);
    assert_eq!(details("?branch=qa"), ["dev", "qa"]);
    assert_eq!(details("?branch=dev"), ["dev"]);
    assert_eq!(details("?branch=nosuch"), ["dev"]);

    let (st, v) = s.api(
        "POST",
        "/v1/mounts/unmount",
        Some(&format!(r#"{{"path":"{}"}}"#, path.display())),
    );
    assert_eq!(st, 200, "{v}");
    let (_, list) = s.api("GET", "/v1/mounts", None);
    assert!(list.as_array().unwrap().is_empty());

    let (st, v) = s.api("POST", "/v1/fsck", Some("{}"));
    assert_eq!(st, 200, "{v}");
    assert!(v["problems"].as_array().unwrap().is_empty(), "{v}");
}
